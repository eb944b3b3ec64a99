"""
Checks run on reward functions at trainer construction and around each call.

TRL 1.16 already names `functools.partial` objects and callable instances (`trl.trainer.utils.get_callable_name`,
the fix for the `partial` crash of TRL issue #6313) and awaits async reward functions on a daemon event loop
(`GRPOTrainer._calculate_rewards`). The helpers here mirror that behaviour, so that code calling reward functions
outside `_calculate_rewards` (e.g. scoring teacher samples) gets the same names and the same async support, and add
two things TRL lacks: unique names (two partials of one function would otherwise share a metric key) and error
messages that name the offending function.

This module is deliberately free of torch/TRL imports: it is also imported by the math verification worker process.
"""

import asyncio
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


__all__ = [
    "call_reward_safely",
    "check_reward_outputs",
    "ensure_sync",
    "get_reward_func_name",
    "is_async_reward_func",
    "validate_reward_funcs",
    "weighted_reward_sum",
]


def _unwrap_partial(func: Any) -> Any:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def get_reward_func_name(func: Any) -> str:
    """
    Return the display name of a reward function, matching the name GRPO uses for its `rewards/<name>/mean` metrics.

    Handles, in this order:
    - a string (a reward model id, loaded by TRL): the last path component, as TRL does;
    - a model (anything with a `config` carrying `_name_or_path`): the last component of the model id, as TRL does;
    - a `functools.partial`: an explicit `__name__` set on the partial object wins (so that two partials of one
      function can be told apart); otherwise the wrapped callable's name, as TRL's `get_callable_name`;
    - a function, coroutine function or lambda: its `__name__`;
    - a callable instance: its `__name__` attribute if it has one (TRL's built-in reward classes and
      [`RewardFunction`] set it), else its class name.

    Args:
        func: The reward function (or reward model id).

    Returns:
        `str`: The name.
    """
    if isinstance(func, str):
        return func.split("/")[-1]
    config = getattr(func, "config", None)
    model_id = getattr(config, "_name_or_path", None)
    if isinstance(model_id, str) and model_id:
        return model_id.split("/")[-1]
    # A name the user set on the partial object itself takes precedence over the wrapped function's name.
    if isinstance(func, functools.partial):
        explicit = func.__dict__.get("__name__")
        if isinstance(explicit, str) and explicit:
            return explicit
        func = _unwrap_partial(func)
    name = getattr(func, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(func).__name__


def is_async_reward_func(func: Any) -> bool:
    """
    Whether calling `func` returns a coroutine. Same rule as TRL's `is_async_callable`: functions, partials (unwrapped)
    and callable instances whose `__call__` is `async def`.
    """
    func = _unwrap_partial(func)
    # Look `__call__` up statically on the type: an `async def __call__` (possibly inherited) makes instances async.
    call = inspect.getattr_static(type(func), "__call__", None)
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


def _run_coroutine_sync(coro: Any) -> Any:
    """Run an awaitable to completion from synchronous code, whether or not this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(coro))
    # This thread is inside a running loop, which we must not block re-entrantly: use a short-lived helper thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _await(coro)).result()


async def _await(awaitable: Any) -> Any:
    # `asyncio.run` accepts only coroutines; this also admits other awaitables (futures, custom objects).
    return await awaitable


def ensure_sync(func: Callable) -> Callable:
    """
    Return a synchronous version of `func`.

    GRPO awaits async reward functions itself, so this is only needed where reward functions are called directly. A
    synchronous `func` is returned unchanged; an async one is wrapped, and the wrapper keeps `func`'s name (see
    [`get_reward_func_name`]) so metrics stay keyed the same.
    """
    if not is_async_reward_func(func):
        return func

    def sync_wrapper(*args, **kwargs):
        return _run_coroutine_sync(func(*args, **kwargs))

    # Not `functools.wraps`: it would set `__wrapped__`, through which `inspect` still reports a coroutine function.
    sync_wrapper.__name__ = sync_wrapper.__qualname__ = get_reward_func_name(func)
    sync_wrapper.__doc__ = getattr(_unwrap_partial(func), "__doc__", None)
    return sync_wrapper


def validate_reward_funcs(reward_funcs: Any) -> list[str]:
    """
    Validate reward functions at trainer construction and return one unique name per function.

    Args:
        reward_funcs:
            `None`, a single reward function, or a list of them. Each must be a callable (function,
            `functools.partial`, callable instance, async function, model) or a string (a reward model id: left
            alone, TRL loads it).

    Returns:
        `list[str]`: The names, in order. When several functions would get the same name (e.g. two partials of one
        function with different arguments), the later ones get a `_2`, `_3`, ... suffix, since GRPO keys its
        `rewards/<name>/*` metrics and completion-table columns by name and would otherwise merge them.

    Raises:
        `TypeError`: if an entry is neither callable nor a string; the message gives its index and type.
    """
    if reward_funcs is None:
        return []
    if not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    names: list[str] = []
    seen: dict[str, int] = {}
    for index, func in enumerate(reward_funcs):
        if not isinstance(func, str) and not callable(func):
            raise TypeError(
                f"reward_funcs[{index}] must be a callable or a reward model id (str), got {type(func).__name__}: "
                f"{func!r:.100}"
            )
        name = get_reward_func_name(func)
        if name in seen:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
            while candidate in seen:  # e.g. an explicit `f_2` already present
                seen[name] += 1
                candidate = f"{name}_{seen[name]}"
            name = candidate
        seen[name] = 1
        names.append(name)
    return names


def check_reward_outputs(name: str, outputs: Any, expected_len: int | None) -> list[float | None]:
    """
    Check what a reward function returned and normalize it to `list[float | None]`.

    GRPO's contract: one value per completion, each a real number or `None` (meaning "no reward for this completion";
    GRPO turns it into NaN and ignores it in the weighted sum). Tensors and arrays are accepted and converted.

    Args:
        name: The reward function's name, used in error messages.
        outputs: What it returned.
        expected_len: The number of completions it was given (`None` skips the length check).

    Returns:
        `list[float | None]`: The outputs as Python floats (or `None`).

    Raises:
        `ValueError`: naming the function, if the outputs are not a sequence, have the wrong length, or contain a value
        that is not a real number or `None`, or an infinite one.
    """
    if hasattr(outputs, "tolist") and not isinstance(outputs, (list, tuple)):  # torch.Tensor, np.ndarray
        outputs = outputs.tolist()
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        raise ValueError(
            f"reward function '{name}' returned a {type(outputs).__name__}; expected a list of float or None, one per "
            f"completion"
        )
    if expected_len is not None and len(outputs) != expected_len:
        raise ValueError(
            f"reward function '{name}' returned {len(outputs)} values for {expected_len} completions; it must return "
            f"exactly one value (float or None) per completion"
        )
    checked: list[float | None] = []
    for index, value in enumerate(outputs):
        if hasattr(value, "item") and not isinstance(value, numbers.Number):  # 0-dim tensor / numpy scalar
            value = value.item()
        if value is None:
            checked.append(None)
        elif isinstance(value, numbers.Real):
            value = float(value)
            if math.isinf(value):
                # an infinite reward turns weighted sums, group statistics and reward-ordered pairs into NaN
                raise ValueError(
                    f"reward function '{name}' returned {value} at index {index}; rewards must be finite (return None "
                    "for a completion that gets no reward)"
                )
            checked.append(value)  # NaN is kept: GRPO treats it like None
        else:
            raise ValueError(
                f"reward function '{name}' returned a non-numeric value {value!r:.50} ({type(value).__name__}) at "
                f"index {index}; expected a float or None"
            )
    return checked


def call_reward_safely(name: str, func: Callable, **kwargs: Any) -> list[float | None]:
    """
    Call a reward function with GRPO's keyword arguments, awaiting it if it is async, and check what it returns.

    Args:
        name: The reward function's name, used in error messages.
        func: The reward function.
        **kwargs: Passed through: `prompts`, `completions`, `completion_ids`, dataset columns, `trainer_state`,
            `log_extra`, `log_metric`, ...

    Returns:
        `list[float | None]`: The outputs, checked with [`check_reward_outputs`] against `len(kwargs["completions"])`
        when `completions` is given (otherwise only converted).

    Raises:
        `RuntimeError`: `reward function '<name>' raised <ExceptionType>: <message>`, chained from the original
        exception (`__cause__`), if the function raises.
        `ValueError`: from [`check_reward_outputs`], if the outputs are malformed.
    """
    try:
        outputs = func(**kwargs)
        if inspect.isawaitable(outputs):
            outputs = _run_coroutine_sync(outputs)
    except Exception as exc:
        raise RuntimeError(f"reward function '{name}' raised {type(exc).__name__}: {exc}") from exc
    completions = kwargs.get("completions")
    return check_reward_outputs(name, outputs, len(completions) if completions is not None else None)


def weighted_reward_sum(
    outputs_per_func: Sequence[Sequence[float | None]], weights: Sequence[float]
) -> list[float | None]:
    """
    Weighted sum over reward functions of their outputs, per completion, as GRPO's `nansum(rewards * reward_weights)`.

    A `None` (or NaN) output leaves that function out of that completion's sum; a completion for which every function
    returned `None` gets `None`. Used wherever this package combines reward functions: [`CombinedReward`], the trainer's
    per-sample rewards and the Avg@k evaluation.
    """
    totals: list[float | None] = [None] * (len(outputs_per_func[0]) if outputs_per_func else 0)
    for outputs, weight in zip(outputs_per_func, weights, strict=True):
        for i, value in enumerate(outputs):
            if value is not None and not math.isnan(value):
                totals[i] = (totals[i] or 0.0) + float(weight) * value
    return totals
