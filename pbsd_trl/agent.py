"""Agent training: teacher samples through GRPO's own multi-turn loop (`tools`, `environment_factory`, `rollout_func`).

GRPOTrainer's `_generate` runs the whole rollout: generation, tool calls, tool results appended, generation again, up
to `max_tool_calling_iterations`; or the user's `rollout_func`. PBSD calls the same `_generate` for the teacher, with
the teacher prompts, so a teacher sample is a full episode exactly like a student sample. What the loop keeps per row
(the environment instances and the tool dicts bound to them) is indexed by the rows passed to `_generate`, so the
teacher call sees the teacher rows' slice of it; each teacher row's environment is `reset` again with its dataset row
before the teacher episode (the student's episode has moved it), and must give the observation the student saw.

Tool-result tokens are context, not the model's own tokens: like GRPO's `tool_mask`, the teacher's mask keeps them
attended to and out of every log-prob sum (teacher and student scoring of both sample sets).

Beyond GRPO: a tool call that outlives `tool_call_timeout` returns a tool error to the model instead of blocking the
run, and what a `rollout_func` returns is checked on every call, student's and teacher's, with errors that name it.
"""

import asyncio
import contextlib
import copy
import inspect
import threading

import torch


def _timed_tool(tool, name: str, seconds: float):
    """`tool` bounded to `seconds`: past them it raises `TimeoutError`, which GRPO's loop hands back to the model as
    the tool's error. Python cannot stop a thread, so a sync call that never returns is left running in a daemon
    thread (it does not keep the process alive)."""
    message = f"tool '{name}' did not return within tool_call_timeout={seconds:g} s"
    if inspect.iscoroutinefunction(tool):

        async def timed(**kwargs):
            try:
                return await asyncio.wait_for(tool(**kwargs), seconds)
            except asyncio.TimeoutError:
                raise TimeoutError(message) from None

        return timed

    def timed(**kwargs):
        outcome, done = {}, threading.Event()

        def run():
            try:
                outcome["value"] = tool(**kwargs)
            except BaseException as exc:  # relayed to the caller's thread, as the tool's own error
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"pbsd-tool-{name}", daemon=True).start()
        if not done.wait(seconds):
            raise TimeoutError(message)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return timed


def _check_rollout_output(output, num_prompts: int, where: str) -> None:
    """What GRPO reads from a `rollout_func`'s output, checked before GRPO or a reward function trips over it."""
    if not isinstance(output, dict):
        raise TypeError(
            f"{where} returned {type(output).__name__} {output!r:.60}; it must return a dict with 'prompt_ids', "
            "'completion_ids' and 'logprobs' (one entry per prompt; 'logprobs' may be None)."
        )
    missing = [key for key in ("prompt_ids", "completion_ids", "logprobs") if key not in output]
    if missing:
        raise ValueError(f"{where} returned a dict without {missing} (keys: {sorted(output)}).")
    for key in ("prompt_ids", "completion_ids", "logprobs", "env_mask"):
        value = output.get(key)
        if value is None and key in ("logprobs", "env_mask"):
            continue
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
            raise TypeError(f"{where}: '{key}' must be a list with one entry per prompt, got {type(value).__name__}.")
        if len(value) != num_prompts:
            raise ValueError(
                f"{where} returned {len(value)} rows of '{key}' for {num_prompts} prompts: it must return one per "
                "prompt, in the order of the prompts."
            )
    for key in ("logprobs", "env_mask"):
        rows = output.get(key)
        for i, (row, ids) in enumerate(zip(rows or [], output["completion_ids"] if rows else [], strict=True)):
            if row is not None and len(row) != len(ids):
                raise ValueError(
                    f"{where}: row {i} of '{key}' has {len(row)} entries for {len(ids)} completion tokens."
                )


def checked_rollout_func(rollout_func):
    """`rollout_func` with its output checked on every call; None stays None."""
    if rollout_func is None:
        return None
    name = getattr(rollout_func, "__name__", type(rollout_func).__name__)

    def checked(prompts, trainer):
        output = rollout_func(prompts, trainer)
        call = "the teacher's call, on the teacher prompts" if getattr(trainer, "_teacher_rollout", False) else None
        where = f"`rollout_func` '{name}'" + (f" ({call})" if call else "")
        _check_rollout_output(output, len(prompts), where)
        return output

    checked.__name__ = checked.__qualname__ = name
    return checked


class AgentRollouts:
    """Mixin for [`PBSDTrainer`]: the teacher's side of GRPO's tool/environment loop. Reads GRPOTrainer's attributes."""

    _PER_ROW_STATE = ("environments", "_batch_environments", "_sync_tool_dicts", "_async_tool_dicts")

    def _generate(self, prompts):
        # GRPO builds the student prompts (an environment's observation appended) inside its own step: keep them, the
        # teacher prompt is composed around the prompt the student actually saw
        self._rollout_prompts = copy.deepcopy(prompts)
        return super()._generate(prompts)

    @property
    def _is_agent(self) -> bool:
        return bool(self.tools) or self.environment_factories is not None or self.rollout_func is not None

    @contextlib.contextmanager
    def _teacher_rows_state(self, rows):
        """Per-row rollout state (environments, bound tool dicts) cut to `rows` for the duration of a teacher call."""
        saved = {name: getattr(self, name, None) for name in self._PER_ROW_STATE}
        for name, value in saved.items():
            if isinstance(value, list):
                setattr(self, name, [value[i] for i in rows])
        self._teacher_rollout = True  # how a `rollout_func` error says which call it was
        try:
            yield
        finally:
            self._teacher_rollout = False
            for name, value in saved.items():
                setattr(self, name, value)

    def _tool_call_loop(self, *args, **kwargs):
        # GRPO builds the per-row tool dicts for each batch: bound them for the duration of this loop only
        seconds = getattr(self.args, "tool_call_timeout", None)
        if seconds is None:
            return super()._tool_call_loop(*args, **kwargs)
        saved = self._sync_tool_dicts, self._async_tool_dicts
        self._sync_tool_dicts, self._async_tool_dicts = (
            [{name: _timed_tool(tool, name, seconds) for name, tool in tools.items()} for tools in dicts]
            for dicts in saved
        )
        try:
            return super()._tool_call_loop(*args, **kwargs)
        finally:
            self._sync_tool_dicts, self._async_tool_dicts = saved

    def _student_prompts_seen(self, prompts):
        """The prompts the student was generated from: the dataset's, or with the environment's observation appended."""
        if self.environment_factories is None:
            return prompts
        return self._rollout_prompts

    def _reset_teacher_environments(self, inputs, rows, student_prompts):
        """Reset each teacher row's environment with its row, as GRPO does, and check it is the student's episode."""
        if not self.environments:
            return
        originals = [x.get("prompt", [{"role": "user", "content": ""}]) for x in inputs]
        for i in rows:
            x = inputs[i]
            reset_kwargs = {k: v for k, v in x.items() if k != "environment"} if self._multi_environment else x
            observation = self.environments[i].reset(**reset_kwargs)
            expected = originals[i]
            if observation is not None:
                content = expected[-1]["content"]
                if isinstance(observation, list) and isinstance(content, str):
                    content = [{"type": "text", "text": content}]
                if isinstance(observation, str) and isinstance(content, list):
                    observation = [{"type": "text", "text": observation}]
                expected = expected[:-1] + [{**expected[-1], "content": content + observation}]
            if expected != student_prompts[i]:
                raise ValueError(
                    f"The environment of row {i} returned a different observation from `reset()` for the teacher's "
                    "episode than for the student's. PBSD compares a teacher and a student episode of the same task, so "
                    "`reset(**row)` must be a deterministic function of the row (seed any randomness from the row)."
                )

    def _teacher_reward_rows(self, inputs, rows, extra_fields):
        """Dataset rows for the teacher's reward call, with the teacher rollout's extra fields (as GRPO merges the
        student's into `inputs`)."""
        reward_rows = [dict(inputs[i]) for i in rows]
        for j, row in enumerate(reward_rows):
            for key, values in (extra_fields or {}).items():
                if isinstance(values, list) and j < len(values):
                    row[key] = values[j]
                elif not isinstance(values, list):
                    row[key] = values
        return reward_rows

    @staticmethod
    def _pad_tool_mask(tool_mask_rows, num_rows, rows, device, width):
        """`(B, width)` tool mask of the teacher samples: 0 on tool results, 1 elsewhere (padding included, as GRPO)."""
        mask = torch.ones(num_rows, width, dtype=torch.long, device=device)
        for i, row_mask in zip(rows, tool_mask_rows, strict=True):
            mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.long, device=device)
        return mask
