"""Teacher weights: `base`, `live` or `ema`, with or without PEFT, and the EMA state that checkpoints carry.

| kind   | PEFT student                            | full-model student                               |
|--------|-----------------------------------------|--------------------------------------------------|
| `base` | the adapter disabled                    | a frozen copy of the initial model               |
| `live` | the current weights (no gradient)       | the current weights (no gradient)                |
| `ema`  | a second adapter, EMA of the student's  | a second model, EMA of the student's parameters  |

The frozen copy is built like GRPO's reference model: loaded again from the model's path when the student's
parameters are already ZeRO-3 partitioned (a deepcopy of empty shards would be useless), copied otherwise, and
prepared for DeepSpeed/FSDP in evaluation mode. The EMA adapter is initialized from the student's adapter (LoRA's
zero-initialized `B` makes that the base model) and updated tensor by tensor; note that EMA(B)·EMA(A) is not EMA(BA).
"""

import contextlib
import copy
import logging

import torch
from transformers import TrainerCallback
from trl.models.utils import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, use_adapter


logger = logging.getLogger(__name__)

TEACHER_ADAPTER_NAME = "pbsd_teacher"
TEACHER_STATE_FILE = "pbsd_teacher_state.pt"


def _is_zero3_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Gather ZeRO-3 partitioned parameters for direct access; a null context otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class TeacherWeights:
    """Selects the teacher's weights for generation and scoring, keeps the EMA teacher in sync, and (de)serializes it.

    Args:
        trainer: the `PBSDTrainer` (its `model`, `accelerator`, `args` are read lazily, after preparation).
        kind: `"base"`, `"live"` or `"ema"`.
        is_peft: whether the student is a PEFT model.
    """

    def __init__(self, trainer, kind: str, is_peft: bool):
        self.trainer = trainer
        self.kind = kind
        self.is_peft = is_peft
        self.model = None  # the separate teacher model, when there is one
        self._teacher_params: list[torch.nn.Parameter] | None = None  # EMA targets
        self._student_params: list[torch.nn.Parameter] | None = None  # EMA sources, same order

        if kind == "live":
            return
        peft_model = trainer.model if is_peft else None
        if is_peft and kind == "ema":
            self._add_teacher_adapter(peft_model)
        elif not is_peft:
            self.model = self._build_separate_model(trainer)

    @property
    def uses_separate_model(self) -> bool:
        return self.model is not None

    # ---- construction -------------------------------------------------------------------------------------------
    def _add_teacher_adapter(self, model) -> None:
        config = model.peft_config[model.active_adapter]
        model.add_adapter(TEACHER_ADAPTER_NAME, config)
        student, teacher = self._adapter_param_pairs(model)
        with torch.no_grad():
            for s, t in zip(student, teacher, strict=True):
                t.data.copy_(s.data)
                t.requires_grad_(False)
        self._student_params, self._teacher_params = student, teacher

    @staticmethod
    def _adapter_param_pairs(model) -> tuple[list, list]:
        active = model.active_adapter
        student, teacher = [], []
        params = dict(model.named_parameters())
        for name, param in params.items():
            if f".{active}." in name:
                teacher_name = name.replace(f".{active}.", f".{TEACHER_ADAPTER_NAME}.")
                if teacher_name not in params:
                    raise ValueError(
                        f"The EMA teacher needs a pure adapter (LoRA-style) model; {name!r} has no teacher counterpart. "
                        "Adapters with `modules_to_save` are not supported with teacher_model_kind='ema'."
                    )
                student.append(param)
                teacher.append(params[teacher_name])
        return student, teacher

    def _build_separate_model(self, trainer) -> torch.nn.Module:
        student = trainer.model
        if _is_zero3_partitioned(student):
            args = trainer.args
            init_kwargs = dict(args.model_init_kwargs or {})
            init_kwargs.setdefault("dtype", student.dtype)
            init_kwargs["device_map"] = None
            teacher = create_model_from_path(student.config._name_or_path, **init_kwargs)
        else:
            teacher = copy.deepcopy(student)
            # GRPOTrainer has already patched the student's `forward` (fused LM head) with a closure over the
            # *student's* original bound forward; a copy would keep computing with the student's weights.
            # Dropping the instance attribute restores the class forward of the copy; the trainer re-adds the heads.
            teacher.__dict__.pop("forward", None)
        teacher.requires_grad_(False)
        teacher.eval()
        disable_dropout_in_model(teacher)
        return teacher

    def prepare(self) -> None:
        """Wrap the separate teacher for the distributed backend (call after the trainer's accelerator exists)."""
        if self.model is None:
            return
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            self.model = prepare_deepspeed(self.model, trainer.accelerator)
        elif trainer.is_fsdp_enabled:
            self.model = prepare_fsdp(self.model, trainer.accelerator)
        else:
            self.model = trainer.accelerator.prepare_model(self.model, evaluation_mode=True)
        if self.kind == "ema":
            self._student_params = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
            self._teacher_params = list(trainer.accelerator.unwrap_model(self.model).parameters())

    # ---- use ----------------------------------------------------------------------------------------------------
    def scoring_model(self, student_model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward scores completions as the teacher (inside [`active`])."""
        return self.model if self.model is not None else student_model

    @contextlib.contextmanager
    def active(self):
        """Within this context the trainer's model (PEFT kinds) computes with the teacher's weights."""
        if self.kind == "live" or not self.is_peft:
            yield
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        adapter = None if self.kind == "base" else TEACHER_ADAPTER_NAME
        # set_adapter flips requires_grad on the adapters: remember the student's flags and put them back
        flags = [p.requires_grad for p in model.parameters()]
        try:
            with use_adapter(model, adapter):
                yield
        finally:  # also when interrupted (Ctrl-C in a notebook): the student's trainable set stays the student's
            for param, flag in zip(model.parameters(), flags, strict=True):
                param.requires_grad_(flag)

    @torch.no_grad()
    def ema_update(self) -> None:
        """`θ_T ← (1-α)·θ_T + α·θ` for every teacher tensor (ZeRO-3: gathered, modified on rank 0, re-partitioned)."""
        if self.kind != "ema":
            return
        rate = self.trainer.args.teacher_update_rate
        params = self._teacher_params + self._student_params
        zero3 = any(hasattr(p, "ds_id") for p in params)
        with _gathered(params, modifier_rank=0):
            if not zero3 or _is_rank_zero():
                for t, s in zip(self._teacher_params, self._student_params, strict=True):
                    t.data.mul_(1.0 - rate).add_(s.data.to(t.dtype), alpha=rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full (gathered) EMA teacher tensors, on CPU; `None` for kinds without state."""
        if self.kind != "ema":
            return None
        with _gathered(self._teacher_params):
            return {f"teacher.{i}": t.detach().to("cpu", copy=True) for i, t in enumerate(self._teacher_params)}

    def check_state_dict(self, state, source: str = "the checkpoint") -> None:
        """Raise an error naming `source` unless `state` holds one tensor of the right shape per EMA teacher tensor."""
        expected = {f"teacher.{i}" for i in range(len(self._teacher_params))}
        if not isinstance(state, dict) or set(state) != expected:
            count = len(state) if isinstance(state, dict) else 0
            raise ValueError(
                f"{source} does not hold this model's EMA teacher: {count} tensors for {len(expected)} expected. It "
                "was written for another model or adapter configuration; resume with the configuration that wrote "
                "it, or start a new run."
            )
        for i, param in enumerate(self._teacher_params):
            shape = tuple(getattr(param, "ds_shape", param.shape))  # the full shape under ZeRO-3
            if tuple(state[f"teacher.{i}"].shape) != shape:
                raise ValueError(
                    f"{source}: EMA teacher tensor {i} has shape {tuple(state[f'teacher.{i}'].shape)}, this model's "
                    f"has {shape}. It was written for another model or adapter configuration; resume with the "
                    "configuration that wrote it, or start a new run."
                )

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Restore the EMA teacher; `source` (the file) is named in the error when `state` does not fit this model."""
        if self.kind != "ema":
            return
        self.check_state_dict(state, source)
        for i in range(len(self._teacher_params)):
            if not torch.isfinite(state[f"teacher.{i}"]).all():
                raise ValueError(
                    f"{source}: EMA teacher tensor {i} holds NaN or inf; resume from an earlier checkpoint."
                )
        zero3 = any(hasattr(p, "ds_id") for p in self._teacher_params)
        with _gathered(self._teacher_params, modifier_rank=0):
            if not zero3 or _is_rank_zero():
                for i, t in enumerate(self._teacher_params):
                    t.data.copy_(state[f"teacher.{i}"].to(t.device, t.dtype))


class TeacherEMACallback(TrainerCallback):
    """Runs [`TeacherWeights.ema_update`] every `teacher_sync_steps` optimizer steps."""

    def __init__(self, teacher: TeacherWeights, sync_steps: int):
        self.teacher = teacher
        self.sync_steps = sync_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.sync_steps == 0:
            self.teacher.ema_update()
