"""Mixin for [`PBSDTrainer`]: GRPO's reward tables for both sample sets, failures raised on every process, and
the teacher's reward calls kept out of the student's logs."""

import contextlib
from collections import defaultdict

import torch
from accelerate.utils import gather_object

from .validation import weighted_reward_sum


class RewardTables:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if not self.reward_funcs:
            # Role-labelled PBSD without reward functions: an empty (rows, 0) table, no collective needed
            rewards = torch.zeros(len(prompts) * self.accelerator.num_processes, 0, device=self.accelerator.device)
        else:
            self._reward_failures.clear()
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._raise_reward_failures()
        self._last_rewards_per_func = rewards
        return rewards

    def _raise_reward_failures(self) -> None:
        """Raise the first reward-function error of any process on every process, with the same type and message.

        The guarded functions record their errors instead of raising, so every process reaches GRPO's gather; one
        flag all-reduce then tells every process whether to stop, instead of the healthy ones waiting in the next
        collective until its timeout.
        """
        local = self._reward_failures[0] if self._reward_failures else None
        self._reward_failures.clear()
        world = self.accelerator.num_processes
        if world == 1:
            if local is not None:
                raise local
            return
        flag = torch.tensor([float(local is not None)], device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() == 0:
            return
        report = None if local is None else (type(local).__name__, str(local))
        reports = gather_object([report])
        rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
        error_type = ValueError if kind == "ValueError" else RuntimeError
        raise error_type(f"{message} [on process {rank} of {world}; every process stops]") from local

    def _weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """Weighted sum over reward functions per row (NaN where every function returned None); None without any."""
        if rewards_per_func.size(1) == 0:
            return None
        totals = weighted_reward_sum(rewards_per_func.T.tolist(), self.reward_weights.tolist())
        values = [torch.nan if total is None else total for total in totals]
        return torch.tensor(values, dtype=torch.float32, device=rewards_per_func.device)

    @contextlib.contextmanager
    def _isolated_reward_logs(self):
        """Teacher reward calls must not flush `log_extra`/`log_metric` entries into the student's table."""
        saved = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            yield
        finally:
            self._pending_extra_logs, self._pending_metrics = saved
