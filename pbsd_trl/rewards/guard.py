"""Reward functions wrapped so that a failure names the function, whichever process and sample set it happens on."""

from typing import Any

import torch

from .validation import (
    call_reward_safely,
    check_reward_outputs,
    is_async_reward_func,
    validate_reward_funcs,
)


def guard_reward_funcs(reward_funcs: list[Any], failures: list[Exception] | None = None) -> list[Any]:
    """Wrap each callable so that an exception or a malformed output raises an error naming it.

    GRPO itself checks the length of a synchronous function's output, but an exception inside a reward function (or a
    wrong value type) surfaces as a bare traceback from deep inside a training step, and under several processes the
    other ranks hang in the next collective. The wrappers keep the function's name (GRPO keys its metrics by it) and
    its sync/async nature (GRPO awaits async functions on its own event loop). Reward models (`str` ids or modules)
    are left to TRL.

    With `failures`, a wrapper does not raise: it appends the named error there and returns placeholder rewards, so
    that every process still reaches GRPO's gather of the rewards; the caller then raises the error on every process
    (see `PBSDTrainer._raise_reward_failures`).
    """
    names = validate_reward_funcs(reward_funcs)
    return [_guard(func, name, failures) for func, name in zip(reward_funcs, names, strict=True)]


def guard_environment_rewards(
    reward_funcs: list[Any], names: list[str], failures: list[Exception] | None = None
) -> list[Any]:
    """GRPO's reward sources made of environments' `get_reward` (named after the environment class), guarded like
    reward functions: an error names `<Environment>.get_reward` and, with `failures`, reaches every process."""
    return [_guard(func, f"{name}.get_reward", failures) for func, name in zip(reward_funcs, names, strict=True)]


def _guard(func: Any, name: str, failures: list[Exception] | None) -> Any:
    if isinstance(func, (str, torch.nn.Module)):
        return func

    def deferred(err: Exception, kwargs: dict) -> list[float]:
        if failures is None:
            raise err
        failures.append(err)
        return [0.0] * len(kwargs["completions"])

    if is_async_reward_func(func):

        async def guarded(**kwargs):
            try:
                try:
                    outputs = await func(**kwargs)
                except Exception as exc:
                    raise RuntimeError(f"reward function '{name}' raised {type(exc).__name__}: {exc}") from exc
                return check_reward_outputs(name, outputs, len(kwargs["completions"]))
            except (RuntimeError, ValueError) as err:
                return deferred(err, kwargs)

    else:

        def guarded(**kwargs):
            try:
                return call_reward_safely(name, func, **kwargs)
            except (RuntimeError, ValueError) as err:
                return deferred(err, kwargs)

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__wrapped_reward__ = func
    return guarded
