"""Agent training: teacher samples through GRPO's own multi-turn loop (`tools`, `environment_factory`, `rollout_func`).

GRPOTrainer's `_generate` runs the whole rollout: generation, tool calls, tool results appended, generation again, up
to `max_tool_calling_iterations`; or the user's `rollout_func`. PBSD calls the same `_generate` for the teacher, with
the teacher prompts, so a teacher sample is a full episode exactly like a student sample. What the loop keeps per row
(the environment instances and the tool dicts bound to them) is indexed by the rows passed to `_generate`, so the
teacher call sees the teacher rows' slice of it; each teacher row's environment is `reset` again with its dataset row
before the teacher episode (the student's episode has moved it), and must give the observation the student saw.

Tool-result tokens are context, not the model's own tokens: like GRPO's `tool_mask`, the teacher's mask keeps them
attended to and out of every log-prob sum (teacher and student scoring of both sample sets).
"""

import contextlib
import copy

import torch


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
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

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
