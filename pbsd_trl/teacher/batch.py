"""A step's teacher batch: which rows carry a teacher sample, what the teacher drew for them, and its padded tensors.

GRPO lays a generation batch out as prompt groups of `num_generations` rows each. PBSD's teacher samples ride on the
first `G_T` rows of each group (all of them with matched pairs), so a row carries one student sample and at most one
teacher sample of the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..logprobs import pad_token_lists


@dataclass(frozen=True)
class TeacherRows:
    """Attributes:
    row_index: `(n,)` global id of each of this process's rows (`process index × n + local index`).
    has_teacher: `(n,)` bool, whether the row carries a teacher sample.
    group_size: rows per prompt group.
    """

    row_index: torch.Tensor
    has_teacher: torch.Tensor
    group_size: int

    @classmethod
    def of_batch(
        cls, num_rows: int, group_size: int, teacher_group_size: int, rank: int, device: torch.device
    ) -> TeacherRows:
        row_index = torch.arange(rank * num_rows, (rank + 1) * num_rows, device=device)
        has_teacher = (row_index % group_size) < teacher_group_size
        if not bool(has_teacher.any()):
            raise ValueError(
                f"This process holds no row that carries a teacher sample ({num_rows} rows, groups of {group_size}, "
                f"{teacher_group_size} teacher samples per group): make each process's batch hold whole prompt groups."
            )
        return cls(row_index, has_teacher, group_size)

    @property
    def rows(self) -> list[int]:
        """Local indices of the rows that carry a teacher sample."""
        return self.has_teacher.nonzero().flatten().tolist()

    @property
    def num_rows(self) -> int:
        return self.row_index.numel()

    def scatter(self, values: list, empty=None) -> list:
        """One entry per row: `values` (one per teacher row) on the teacher rows, `empty` on the others."""
        out = [empty() if callable(empty) else empty for _ in range(self.num_rows)]
        for i, value in zip(self.rows, values, strict=True):
            out[i] = value
        return out


@dataclass(frozen=True)
class TeacherDraw:
    """The teacher's samples for its rows, from the pool, the one generation pass or its own `generate` call.

    Attributes:
        ids: completion token ids, one list per teacher row.
        completions: the decoded completions (GRPO's format: text or messages).
        rewards: GRPO's gathered `(teacher rows of every process, reward functions)` reward table, or `None`.
        pool_logps: the pool's teacher log-prob of each sample (only when the pool served them).
        rollout_prompt_ids: the prompts a `rollout_func` tokenized itself, one per row.
        tool_mask_rows: GRPO's per-row tool masks (tool results are attended to but not scored).
    """

    ids: list[list[int]]
    completions: list
    rewards: torch.Tensor | None
    pool_logps: list[float] | None = None
    rollout_prompt_ids: list[list[int]] | None = None
    tool_mask_rows: list | None = None


@dataclass
class TeacherBatch:
    """The teacher's padded tensors for every row (an empty completion on rows without a teacher sample) and the
    teacher's log-probs of both sample sets, filled in once scored."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps_teacher_samples: torch.Tensor | None = None
    logps_student_samples: torch.Tensor | None = None

    @classmethod
    def pad(
        cls,
        prompt_lists: list[list[int]],
        completion_lists: list[list[int]],
        pad_id: int,
        device,
        multiple: int | None,
        end_ids: list[int] | None = None,
    ) -> TeacherBatch:
        """Left-padded prompts and right-padded completions; with `end_ids`, a completion that ends in none of them
        (truncated) is masked out, as GRPO's `mask_truncated_completions` does for the student's."""
        prompt_ids, prompt_mask = pad_token_lists(prompt_lists, pad_id, "left", device, multiple)
        completion_ids, completion_mask = pad_token_lists(completion_lists, pad_id, "right", device, multiple)
        if end_ids is not None:
            clipped = torch.tensor([bool(ids) and ids[-1] not in end_ids for ids in completion_lists], device=device)
            completion_mask = completion_mask * (~clipped).unsqueeze(1).int()
        return cls(prompt_ids, prompt_mask, completion_ids, completion_mask)

    def outputs(self) -> dict[str, torch.Tensor]:
        """The trainer's per-row input fields."""
        return {
            "teacher_prompt_ids": self.prompt_ids,
            "teacher_prompt_mask": self.prompt_mask,
            "teacher_completion_ids": self.completion_ids,
            "teacher_completion_mask": self.completion_mask,
            "teacher_logps_teacher_samples": self.logps_teacher_samples,
            "teacher_logps_student_samples": self.logps_student_samples,
        }
