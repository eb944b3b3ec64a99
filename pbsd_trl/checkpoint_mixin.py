"""Mixin for [`PBSDTrainer`]: checkpoints checked before they are loaded, with the EMA teacher and the pool's
visit counters saved and restored."""

import os

import torch

from .checkpoint import CheckpointError, check_checkpoint, checkpoint_info, write_checkpoint_info
from .pool.state import load_pool_state, save_pool_state
from .teacher.weights import TEACHER_STATE_FILE


class PBSDCheckpoints:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Check the checkpoint before anything of it is loaded, so that a bad file fails with its name
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: transformers raises its own error
        if isinstance(checkpoint, (str, os.PathLike)):
            check_checkpoint(checkpoint, self._checkpoint_info())
            if self.teacher.kind == "ema":  # memory-mapped: the shapes are read, not the tensors
                path = os.path.join(checkpoint, TEACHER_STATE_FILE)
                self.teacher.check_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        # A `train()` interrupted mid-step (Ctrl-C in a notebook) leaves that step's partial metrics, completions
        # table, pair table and buffered generation batch behind: a new run starts without them, as a new trainer
        # would (the Trainer builds a new `TrainerState` too, so the token counts restart with it).
        for metrics in self._metrics.values():
            metrics.clear()
        for logs in self._logs.values():
            for values in logs.values() if isinstance(logs, dict) else [logs]:
                values.clear()
        self._pair_table.clear()
        self._teacher_tokens_seen = 0
        self._step, self._buffered_inputs = 0, None
        if self._teacher_pool is not None:  # a resume restores the checkpoint's counters
            self._teacher_pool.visits.clear()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _checkpoint_info(self) -> dict:
        return checkpoint_info(self.teacher.kind, self.teacher.is_peft)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.teacher.state_dict()  # collective under ZeRO-3: every process calls it
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self._teacher_pool is not None:  # a gather: every process calls it
            save_pool_state(self._teacher_pool, folder, self.accelerator, self.args.should_save)
        if self.args.should_save:
            if state is not None:
                torch.save(state, os.path.join(folder, TEACHER_STATE_FILE))
            write_checkpoint_info(folder, self._checkpoint_info())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._teacher_pool is not None:
            load_pool_state(self._teacher_pool, checkpoint, self.accelerator)
        if checkpoint is None or self.teacher.kind != "ema":
            return
        path = os.path.join(checkpoint, TEACHER_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {TEACHER_STATE_FILE}: it was not written by a PBSD run with an EMA teacher, so "
                "the teacher cannot be restored. Resume from a PBSD checkpoint or start a new run."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupt or truncated. Resume from an "
                "earlier checkpoint."
            ) from err
        self.teacher.load_state_dict(state, source=path)
