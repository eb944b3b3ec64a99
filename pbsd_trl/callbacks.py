"""Interrupt-safe training: on SIGTERM or Ctrl-C, save a resumable checkpoint at the end of the step and stop."""

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback


logger = logging.getLogger(__name__)


class SignalCheckpointCallback(TrainerCallback):
    """Saves a checkpoint and stops training at the end of the current step after SIGTERM or SIGINT (Ctrl-C).

    The signal handler only sets a flag; at the next `on_step_end` the callback sets `control.should_save` and
    `control.should_training_stop`, so the Trainer writes a regular, resumable `checkpoint-<step>` (model, optimizer,
    scheduler, RNG and trainer state) and returns from `train()`. A second signal restores the previous handler and
    re-raises it (hard stop). Under several processes the flag is OR-reduced across them every step, so all stop and
    save at the same step. Call [`~SignalCheckpointCallback.request_stop`] to trigger the same path programmatically.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.stop_requested = False
        self.received: int | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handlers ------------------------------------------------------------------------------------------------
    def _handler(self, signum, frame):
        if self.stop_requested:  # second signal: give up gracefully saving
            self.uninstall()
            if callable(self._previous.get(signum)):
                self._previous[signum](signum, frame)
            raise KeyboardInterrupt
        self.stop_requested = True
        self.received = signum
        name = signal.Signals(signum).name
        sys.stderr.write(
            f"\n[pbsd] {name} received: saving a checkpoint at the end of this step, then stopping "
            "(send it again to stop now).\n"
        )
        sys.stderr.flush()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("SignalCheckpointCallback: not on the main thread, signal handlers not installed.")
            return
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._handler)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover
                pass
        self._previous = {}

    def request_stop(self) -> None:
        self.stop_requested = True

    # -- trainer events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def _synced_flag(self) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return self.stop_requested

    def on_step_end(self, args, state, control, **kwargs):
        if self._synced_flag():
            self.stop_requested = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()
