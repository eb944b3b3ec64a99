"""
Seconds per optimizer step and peak memory of GRPO vs PBSD at the same number of sampled completions per prompt.

Contenders, built in one process on the same model weights, prompts (same seed, same prompts per step) and generation
settings, and stepped round-robin (order rotated every round) so that their ratios share the host's noise:

- `GRPO G=8`: TRL's `GRPOTrainer`, 8 completions per prompt;
- `PBSD 4+4`: `PBSDTrainer`, G_S=4 student + G_T=4 teacher samples per prompt (8 sampled completions), with
  pbsd-trl's fused log-prob kernel (`use_fused_logprob_kernel=True`, the default on CPU);
- `PBSD 4+4 TRL head`: the same with `use_fused_logprob_kernel=False` (TRL's fused LM head scores the completions);
- `PBSD 8+8`: G_S=G_T=8, twice the samples, for reference;
- `PBSD 4+4 pool` / `PBSD 8+8 pool`: the same with a teacher-sample pool (`teacher_pool`, K=8 samples per row, built
  once before the rounds with `pbsd_trl.pool.build_teacher_pool`; its build is timed separately);
- `PBSD 4+4 live 1-pass`: `teacher_model_kind="live"`, student and teacher samples in one `generate` call;
- `LoRA GRPO G=8` and `PBSD 4+4 LoRA 1-pass`: LoRA students (r=16 on every linear layer), PBSD with the `base`
  teacher (adapter disabled) through per-row adapters in one `generate` call;
- `PBSD 4+4 live 2-pass` / `PBSD 4+4 LoRA 2-pass`: the same with `one_generation_pass=False` (two calls);
- `PBSD 4+4 repeated cache` / `PBSD 4+4 live 1-pass repeated cache`: the same steps with each prompt's KV cache
  repeated per row in every `generate` call, without shared-prefix attention (each prompt's cache attended to once
  for its samples, on CPU);
- `PBSD 4+4 plain generate`: PBSD 4+4 with `share_prompt_prefill=False` (transformers' `generate` as GRPO calls it),
  and `GRPO G=8 prefill once`: TRL's GRPOTrainer with PBSDTrainer's `generate` (each distinct prompt prefilled
  once into a preallocated cache, and on CPU attended to once for its samples), so that the gain of these changes
  is shown apart from PBSD's.

One step is what `Trainer._inner_training_loop` does per optimizer step with `gradient_accumulation_steps=1`:
`trainer.training_step` (generation, rewards, teacher scoring, loss forward, backward), gradient clipping, the
optimizer and scheduler steps and `zero_grad`. Trainer methods are wrapped with timers for the breakdown:
`_generate` (first call of a step: student samples, second: teacher samples), `_calculate_rewards`,
`_sequence_logps` outside the loss (teacher scoring), the rest of `_generate_and_score_completions` (tokenization,
padding, decoding, metrics), `compute_loss` (loss forward), `accelerator.backward`, and the remainder (clipping,
optimizer). Peak memory is the process's resident high-water mark during the step minus the resident size before it
(`PeakMemory` of `harness/system.py`), plus the persistent state each trainer holds (parameters, the
separate teacher copy, optimizer state).

Usage:
    python benchmarks/step_cost.py                       # full run, writes benchmarks/results/step_cost.{md,json,png}
    python benchmarks/step_cost.py --quick --output_dir /tmp/x
    python benchmarks/step_cost.py --device cuda          # on a GPU, bf16: writes step_cost_cuda_<gpu>.{md,json,png}
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from harness.system import PeakMemory, machine_description, pyplot, report_header, result_stem, touch_free_memory

from pbsd_trl.recipes.models import load_model_and_tokenizer
from pbsd_trl.rewards import math_accuracy_reward


TARGET_RATIO = 1.3
# Both clocks are recorded for every step and every bucket. `cpu` (the process's CPU time, all threads) is the primary
# one: the host is shared, and wall time also counts the time slices other jobs take from this process.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PRIMARY = "cpu"
# `--device cuda` sets these: steps in bf16 on the GPU, timers that wait for its queue, and wall time as the clock
# (a GPU step's CPU time only counts the host's side of it)
DEVICE = "cpu"
BASE_STEPS = None  # warm-start steps of the built-in model (`--base_steps`; None: the built-in default)


def _now():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return {clock: fn() for clock, fn in CLOCKS.items()}


def _since(start):
    now = _now()
    return {clock: now[clock] - start[clock] for clock in CLOCKS}


BUCKETS = (
    "gen_student",
    "gen_teacher",
    "rewards",
    "teacher_scoring",
    "prep_other",
    "loss_forward",
    "backward",
    "optimizer_other",
)
BUCKET_TITLES = {
    "gen_student": "gen student",
    "gen_teacher": "gen teacher",
    "rewards": "rewards",
    "teacher_scoring": "teacher scoring",
    "prep_other": "other prep",
    "loss_forward": "loss fwd",
    "backward": "backward",
    "optimizer_other": "optim+other",
}

# (name, trainer, student generations G_S, teacher generations G_T, fused kernel, options)
CONTENDERS = (
    ("GRPO G=8", "grpo", 8, 0, None, {}),
    ("PBSD 4+4", "pbsd", 4, 4, True, {}),
    ("PBSD 4+4 TRL head", "pbsd", 4, 4, False, {}),
    ("PBSD 8+8", "pbsd", 8, 8, True, {}),
    ("PBSD 4+4 pool", "pbsd", 4, 4, True, {"pool": True}),
    ("PBSD 8+8 pool", "pbsd", 8, 8, True, {"pool": True}),
    ("PBSD 4+4 live 1-pass", "pbsd", 4, 4, True, {"teacher_model_kind": "live"}),
    ("PBSD 4+4 live 2-pass", "pbsd", 4, 4, True, {"teacher_model_kind": "live", "one_generation_pass": False}),
    # the teacher samples of the one pass scored again instead of read off the decoding logits
    (
        "PBSD 4+4 live 1-pass rescored",
        "pbsd",
        4,
        4,
        True,
        {"teacher_model_kind": "live", "teacher_logps_from_generation": False},
    ),
    ("LoRA GRPO G=8", "grpo", 8, 0, None, {"peft": True}),
    ("PBSD 4+4 LoRA 1-pass", "pbsd", 4, 4, True, {"peft": True}),
    ("PBSD 4+4 LoRA 2-pass", "pbsd", 4, 4, True, {"peft": True, "one_generation_pass": False}),
    # what pbsd-trl's generation changes bring on their own: off for PBSD, on for TRL's GRPO
    # without shared-prefix attention (each row reads its own copy of the prompt's cache)
    ("PBSD 4+4 repeated cache", "pbsd", 4, 4, True, {"repeated_cache": True}),
    (
        "PBSD 4+4 live 1-pass repeated cache",
        "pbsd",
        4,
        4,
        True,
        {"teacher_model_kind": "live", "repeated_cache": True},
    ),
    ("PBSD 4+4 plain generate", "pbsd", 4, 4, True, {"share_prompt_prefill": False}),
    ("GRPO G=8 prefill once", "grpo", 8, 0, None, {"prefill": True}),
)
MATCHED = "PBSD 4+4"
MATCHED_UNFUSED = "PBSD 4+4 TRL head"
BASELINE = "GRPO G=8"
POOL_SAMPLES = 8  # K of the benchmark's pool: serves G_T = 4 and 8
# (contender, reference, target ratio of cpu time per step)
ACCEPTANCE = (
    ("PBSD 4+4", BASELINE, TARGET_RATIO),
    ("PBSD 4+4 pool", BASELINE, 1.0),
    ("PBSD 8+8 pool", BASELINE, 1.9),
    ("PBSD 4+4 live 1-pass", BASELINE, 1.2),
    ("PBSD 4+4 LoRA 1-pass", "LoRA GRPO G=8", 1.25),
)

# Full run. `math-tiny`: the built-in warm-started base model (105-token character vocabulary, H=128, 4 layers) with
# the default math job's settings (8 prompts per step, 56 completion tokens). `vocab-151k`: a random Qwen2 with
# Qwen's vocabulary size, where the LM head is most of the compute; a random model samples to the length limit.
CONFIGS = {
    "math-tiny": dict(
        model="base",
        prompts=8,
        max_completion_length=56,
        rounds=10,
        warmup=1,
        description="built-in tiny base model (`get_base_model('math')`), V=105, H=128, 4 layers; 8 prompts/step",
    ),
    "vocab-151k": dict(
        model="random",
        vocab_size=151_936,
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        prompts=4,
        max_completion_length=32,
        rounds=4,
        warmup=1,
        description="random Qwen2, V=151,936, H=128, 2 layers (LM head, tied to the embeddings, 19.4M of 20.0M parameters); 4 prompts/step",
    ),
}
# GPU run: the tiny model again (where the per-call overheads dominate) and a random model of Qwen2.5-0.5B's shape
CUDA_CONFIGS = {
    "math-tiny": CONFIGS["math-tiny"],
    "qwen2.5-0.5b-shape": dict(
        model="random",
        vocab_size=151_936,
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        prompts=8,
        max_completion_length=128,
        rounds=5,
        warmup=1,
        description="random Qwen2 of Qwen2.5-0.5B's shape (V=151,936, H=896, 24 layers, 494M parameters); 8 prompts/step",
    ),
}
QUICK_CONFIGS = {
    "math-tiny": dict(
        model="random",
        vocab_size=None,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        prompts=2,
        max_completion_length=8,
        rounds=2,
        warmup=1,
        description="random test-size model (quick mode), character vocabulary; 2 prompts/step",
    ),
    "vocab-4k": dict(
        model="random",
        vocab_size=4096,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        prompts=2,
        max_completion_length=8,
        rounds=2,
        warmup=1,
        description="random model, V=4,096 (quick mode); 2 prompts/step",
    ),
}


# ------------------------------------------------------------------------------------------------------------- models
def build_model(spec, seed=0):
    """(model, tokenizer) of a configuration."""
    from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model

    if spec["model"] == "base":
        from pbsd_trl.recipes.tiny import get_base_model

        return load_model_and_tokenizer(get_base_model("math", steps=BASE_STEPS), dtype=torch.float32)
    tokenizer = build_char_tokenizer()
    fields = {
        k: spec[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    model = build_random_model(tokenizer, size="base", seed=seed, vocab_size=spec.get("vocab_size"), **fields)
    return model, tokenizer


def lora_config():
    from peft import LoraConfig

    from pbsd_trl.recipes.example_args import LORA_TARGET_MODULES

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES))


def pool_args(spec, output_dir):
    """The generation and teacher-prompt settings of the PBSD contenders, for the pool build."""
    from pbsd_trl import PBSDConfig
    from pbsd_trl.recipes.data.math_task import MATH_TEACHER_TEMPLATE

    return PBSDConfig(
        output_dir=output_dir,
        max_completion_length=spec["max_completion_length"],
        temperature=1.0,
        teacher_prompt_template=MATH_TEACHER_TEMPLATE,
        use_cpu=DEVICE == "cpu",
        bf16=DEVICE == "cuda",
        report_to=[],
    )


def grpo_with_prefill():
    """TRL's GRPOTrainer with PBSDTrainer's `generate` (each distinct prompt prefilled once, preallocated cache; on
    CPU each prompt's cache attended to once for its samples)."""
    from trl import GRPOTrainer

    from pbsd_trl.kernels.shared_prefix import shared_prompt_prefill

    class GRPOPrefillOnce(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):
            with shared_prompt_prefill(self.accelerator.unwrap_model(self.model_wrapped)):
                return super()._generate_single_turn(*args, **kwargs)

    return GRPOPrefillOnce


def pbsd_with_repeated_cache():
    """PBSDTrainer whose `generate` calls repeat each prompt's cache per row (no shared-prefix attention)."""
    from pbsd_trl import PBSDTrainer

    class PBSDRepeatedCache(PBSDTrainer):
        def _shared_prompt_prefill(self, images, select_rows=None, share_attention=None):
            return super()._shared_prompt_prefill(images, select_rows, share_attention=False)

    return PBSDRepeatedCache


def build_trainer(kind, num_generations, fused, model, tokenizer, dataset, spec, max_steps, output_dir, options=None):
    from trl import GRPOConfig, GRPOTrainer

    from pbsd_trl import PBSDConfig, PBSDTrainer
    from pbsd_trl.recipes.data.math_task import MATH_TEACHER_TEMPLATE

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["prompts"] * num_generations,
        num_generations=num_generations,
        gradient_accumulation_steps=1,
        max_completion_length=spec["max_completion_length"],
        temperature=1.0,
        pad_to_multiple_of=16,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        gradient_checkpointing=False,
        bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    options = dict(options or {})
    peft_config = lora_config() if options.pop("peft", False) else None
    if kind == "grpo":
        args = GRPOConfig(**common, beta=0.0)
        trainer_class = grpo_with_prefill() if options.pop("prefill", False) else GRPOTrainer
        return trainer_class(
            model,
            [math_accuracy_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    trainer_class = pbsd_with_repeated_cache() if options.pop("repeated_cache", False) else PBSDTrainer
    args = PBSDConfig(
        **common,
        num_teacher_generations=num_generations,
        use_fused_logprob_kernel=fused,
        teacher_prompt_template=MATH_TEACHER_TEMPLATE,
        **options,
    )
    return trainer_class(
        model,
        [math_accuracy_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# ------------------------------------------------------------------------------------------------------------- probes
class StepProbe:
    """Per-step seconds in each bucket, from timers wrapped around the trainer's methods (instance attributes)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.current = {clock: defaultdict(float) for clock in CLOCKS}
        self.generate_calls = 0
        self.in_loss = False
        self._wrap(trainer, "_generate", self._on_generate)
        self._wrap(trainer, "_calculate_rewards", lambda s: self._add("rewards", s))
        self._wrap(
            trainer,
            "_generate_and_score_completions",
            lambda s: self._add("gen_and_score", s),
            on_result=self._on_output,
        )
        self._wrap(trainer, "compute_loss", lambda s: self._add("loss_forward", s), flag="in_loss")
        self._wrap(trainer.accelerator, "backward", lambda s: self._add("backward", s))
        if hasattr(trainer, "_sequence_logps"):
            self._wrap(trainer, "_sequence_logps", self._on_sequence_logps)
            self._wrap(
                trainer,
                "_teacher_sequence_logps",
                lambda s: self._add("teacher_scoring", s),
                flag="in_teacher_scoring",
            )
        self.in_teacher_scoring = False

    def _wrap(self, obj, name, record, flag=None, on_result=None):
        original = getattr(obj, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if flag:
                setattr(self, flag, True)
            start = _now()
            try:
                result = original(*args, **kwargs)
                if on_result is not None:
                    on_result(result)
                return result
            finally:
                record(_since(start))
                if flag:
                    setattr(self, flag, False)

        setattr(obj, name, timed)

    def _add(self, bucket, seconds):
        for clock, value in seconds.items():
            self.current[clock][bucket] += value

    def _on_generate(self, seconds):
        self._add("gen_student" if self.generate_calls == 0 else "gen_teacher", seconds)
        self.generate_calls += 1

    def _on_output(self, output):
        """Padded widths of the generation batch: what the scoring passes run over."""
        self.shapes = {
            "rows": output["prompt_ids"].size(0),
            "prompt_width": output["prompt_ids"].size(1),
            "completion_width": output["completion_ids"].size(1),
        }
        if "teacher_prompt_ids" in output:
            self.shapes.update(
                teacher_prompt_width=output["teacher_prompt_ids"].size(1),
                teacher_completion_width=output["teacher_completion_ids"].size(1),
            )

    def _on_sequence_logps(self, seconds):
        # no-grad passes outside the loss; those inside `_teacher_sequence_logps` are counted by its own timer
        if not self.in_loss and not self.in_teacher_scoring:
            self._add("teacher_scoring", seconds)

    def begin(self):
        self.current = {clock: defaultdict(float) for clock in CLOCKS}
        self.shapes = {}
        self.generate_calls = 0

    def end(self, totals):
        """`{clock: {bucket: seconds}}` of the step that just ran, `totals` being its `{clock: seconds}`."""
        result = {}
        for clock, total in totals.items():
            c = self.current[clock]
            out = {bucket: c[bucket] for bucket in ("gen_student", "gen_teacher", "rewards", "teacher_scoring")}
            out["prep_other"] = c["gen_and_score"] - sum(out.values())
            out["loss_forward"] = c["loss_forward"]
            out["backward"] = c["backward"]
            out["optimizer_other"] = total - c["gen_and_score"] - c["loss_forward"] - c["backward"]
            result[clock] = out
        return result


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Contender:
    """One trainer driven step by step, as `Trainer._inner_training_loop` does with one micro-batch per step."""

    def __init__(self, name, trainer, num_student, num_teacher, fused, max_steps):
        self.name, self.trainer = name, trainer
        self.num_student, self.num_teacher, self.fused = num_student, num_teacher, fused
        self.probe = StepProbe(trainer)
        trainer.create_optimizer_and_scheduler(num_training_steps=max_steps)
        trainer.current_gradient_accumulation_steps = 1
        self.batches = iter(trainer.get_train_dataloader())
        self.records = []

    def step(self, measured):
        trainer = self.trainer
        batch = next(self.batches)
        self.probe.begin()
        with PeakMemory(DEVICE) as memory:
            start = _now()
            trainer.training_step(trainer.model, batch, None)
            if trainer.args.max_grad_norm > 0:
                trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.model.zero_grad()
            trainer.state.global_step += 1
            elapsed = _since(start)
        metrics = trainer._metrics["train"]
        record = {
            "step": trainer.state.global_step,
            "measured": measured,
            "seconds": elapsed,  # {"wall": s, "cpu": s}
            "extra_peak_bytes": memory.peak,
            "breakdown": self.probe.end(elapsed),  # {clock: {bucket: s}}
            "shapes": self.probe.shapes,
            "student_length": metrics["completions/mean_length"][-1],
            "teacher_length": metrics["pbsd/teacher_length"][-1] if self.num_teacher else None,
        }
        self.records.append(record)
        return record

    def persistent_bytes(self):
        trainer = self.trainer
        params = _tensor_bytes(trainer.model.parameters())
        teacher = getattr(trainer, "teacher", None)
        teacher_copy = _tensor_bytes(teacher.model.parameters()) if teacher is not None and teacher.model else 0
        optimizer = _tensor_bytes(
            v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        )
        return {
            "parameters": params,
            "teacher_copy": teacher_copy,
            "optimizer_state": optimizer,
            "total": params + teacher_copy + optimizer,
        }

    def summary(self):
        measured = [r for r in self.records if r["measured"]]
        med = lambda values: statistics.median(values) if values else float("nan")  # noqa: E731
        return {
            "name": self.name,
            "num_generations": self.num_student,
            "num_teacher_generations": self.num_teacher,
            "sampled_completions_per_prompt": self.num_student + self.num_teacher,
            "use_fused_logprob_kernel": self.fused,
            "median_s": {c: med([r["seconds"][c] for r in measured]) for c in CLOCKS},
            "median_breakdown_s": {
                c: {b: med([r["breakdown"][c][b] for r in measured]) for b in BUCKETS} for c in CLOCKS
            },
            "median_extra_peak_bytes": med([r["extra_peak_bytes"] for r in measured]),
            "max_extra_peak_bytes": max((r["extra_peak_bytes"] for r in measured), default=float("nan")),
            "persistent_bytes": self.persistent_bytes(),
            "median_shapes": {
                k: med([r["shapes"][k] for r in measured if k in r["shapes"]])
                for k in (measured[0]["shapes"] if measured else {})
            },
            "mean_student_length": med([r["student_length"] for r in measured]),
            "mean_teacher_length": med([r["teacher_length"] for r in measured]) if self.num_teacher else None,
            "steps": self.records,
        }


# ----------------------------------------------------------------------------------------------------------- harness
def build_pool(model, tokenizer, dataset, spec, pool_dir, batch_size=None):
    """Build the contenders' teacher pool once, timed: seconds on both clocks and generated tokens per second."""
    from pbsd_trl.pool import build_teacher_pool, default_pool_batch_size

    batch_size = batch_size or default_pool_batch_size(next(model.parameters()).device, POOL_SAMPLES)

    gc.collect()
    start = _now()
    pool = build_teacher_pool(
        copy.deepcopy(model),
        tokenizer,
        dataset,
        pool_dir,
        pool_args(spec, pool_dir + "-args"),
        POOL_SAMPLES,
        batch_size=batch_size,
        progress=False,
    )
    seconds = _since(start)
    tokens = sum(len(c) for row in pool["completion_ids"] for c in row)
    return {
        "rows": len(pool),
        "num_samples": POOL_SAMPLES,
        "batch_size": batch_size,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": {c: tokens / seconds[c] for c in CLOCKS},
    }


def in_loop_teacher_throughput(summary):
    """Teacher tokens per second of a step's in-loop teacher `generate` call (the matched PBSD contender)."""
    measured = [r for r in summary["steps"] if r["measured"]]
    rows = measured[0]["shapes"]["rows"] if measured else float("nan")
    tokens = statistics.median([r["teacher_length"] * rows for r in measured])
    return {
        "rows_per_call": rows,
        "tokens_per_call": tokens,
        "tokens_per_s": {c: tokens / summary["median_breakdown_s"][c]["gen_teacher"] for c in CLOCKS},
    }


def run_config(config_name, spec, tmp_dir):
    from tqdm.auto import tqdm

    from pbsd_trl.recipes.data.math_task import make_math_dataset

    rounds, warmup = spec["rounds"], spec["warmup"]
    total_steps = rounds + warmup
    base_model, tokenizer = build_model(spec)
    dataset = make_math_dataset("train", n=max(64, spec["prompts"] * total_steps), seed=0)
    pool_dir = str(Path(tmp_dir) / config_name / "teacher_pool")
    pool_build = build_pool(base_model, tokenizer, dataset, spec, pool_dir)
    contenders = []
    for name, kind, num_student, num_teacher, fused, options in CONTENDERS:
        options = dict(options)
        if options.pop("pool", False):
            options["teacher_pool"] = pool_dir
        trainer = build_trainer(
            kind,
            num_student,
            fused,
            copy.deepcopy(base_model),
            tokenizer,
            dataset,
            spec,
            total_steps,
            str(Path(tmp_dir) / config_name / name.replace(" ", "_")),
            options,
        )
        contenders.append(Contender(name, trainer, num_student, num_teacher, fused, total_steps))
    del base_model
    gc.collect()

    progress = tqdm(total=total_steps * len(contenders), desc=config_name, unit="step", dynamic_ncols=True)
    round_times = []
    for r in range(total_steps):
        measured = r >= warmup
        shift = r % len(contenders)
        times = {}
        for contender in contenders[shift:] + contenders[:shift]:
            record = contender.step(measured)
            times[contender.name] = record["seconds"]
            progress.set_postfix_str(
                f"{contender.name}: {record['seconds']['wall']:.2f}s wall, {record['seconds']['cpu']:.2f}s CPU"
            )
            progress.update()
        if measured:
            round_times.append(times)
    progress.close()

    summaries = [c.summary() for c in contenders]
    base = next(s for s in summaries if s["name"] == BASELINE)
    for s in summaries:
        per_round = {c: [t[s["name"]][c] / t[BASELINE][c] for t in round_times] for c in CLOCKS}
        s["time_ratio_per_round"] = per_round
        s["time_ratio"] = {c: statistics.median(v) for c, v in per_round.items()}
        s["extra_peak_ratio"] = s["median_extra_peak_bytes"] / base["median_extra_peak_bytes"]
        total = s["persistent_bytes"]["total"] + s["median_extra_peak_bytes"]
        s["total_peak_bytes"] = total
        s["total_peak_ratio"] = total / (base["persistent_bytes"]["total"] + base["median_extra_peak_bytes"])
    fused, unfused = (next(s for s in summaries if s["name"] == n) for n in (MATCHED, MATCHED_UNFUSED))
    per_round = {c: [t[MATCHED][c] / t[MATCHED_UNFUSED][c] for t in round_times] for c in CLOCKS}
    for s in summaries:
        s["time_ratio_vs"] = {}
        for name, reference, _ in ACCEPTANCE:
            if s["name"] == name:
                per_round = {c: [t[name][c] / t[reference][c] for t in round_times] for c in CLOCKS}
                s["time_ratio_vs"][reference] = {c: statistics.median(v) for c, v in per_round.items()}
    pool_build["in_loop"] = in_loop_teacher_throughput(next(s for s in summaries if s["name"] == MATCHED))
    return {
        "config": config_name,
        "spec": dict(spec),
        "rounds": rounds,
        "warmup": warmup,
        "pool_build": pool_build,
        "contenders": summaries,
        "fused_vs_unfused_time_ratio": {c: statistics.median(v) for c, v in per_round.items()},
        "fused_vs_unfused_extra_peak_ratio": fused["median_extra_peak_bytes"] / unfused["median_extra_peak_bytes"],
    }


# ----------------------------------------------------------------------------------------------------------- reports
def _mib(n):
    return f"{n / 2**20:.0f}" if n >= 2**20 else f"{n / 2**20:.1f}"


def attribution(result, clock=None):
    """Where the matched PBSD step spends its extra time over GRPO's: bucket differences, largest first."""
    clock = clock or PRIMARY
    by_name = {s["name"]: s for s in result["contenders"]}
    grpo = by_name[BASELINE]["median_breakdown_s"][clock]
    pbsd = by_name[MATCHED]["median_breakdown_s"][clock]
    diff = {b: pbsd[b] - grpo[b] for b in BUCKETS}
    return sorted(diff.items(), key=lambda kv: -kv[1])


def analysis_lines(result, clock=None):
    """Where the PBSD contenders' step time goes relative to GRPO G=8, from the measured buckets."""
    clock = clock or PRIMARY
    by_name = {s["name"]: s for s in result["contenders"]}
    grpo, pbsd, unfused = by_name[BASELINE], by_name[MATCHED], by_name[MATCHED_UNFUSED]
    gb, pb = grpo["median_breakdown_s"][clock], pbsd["median_breakdown_s"][clock]
    step = pbsd["median_s"][clock]
    gen_grpo, gen_pbsd = gb["gen_student"], pb["gen_student"] + pb["gen_teacher"]
    scoring = pb["teacher_scoring"]
    shapes = pbsd["median_shapes"]
    pt, ps = shapes["teacher_prompt_width"], shapes["prompt_width"]
    ct, cs = shapes["teacher_completion_width"], shapes["completion_width"]
    group = pbsd["num_generations"]
    full = 2 * group * pt + group * (ct + cs)
    shared = pt + group * (ct + cs)
    loss_pbsd, loss_grpo = pb["loss_forward"] + pb["backward"], gb["loss_forward"] + gb["backward"]
    lines = [
        f"- Generation: PBSD 4+4's two `generate` calls (student and teacher, {group} samples per prompt each) take"
        f" {gen_pbsd:.3f} s against {gen_grpo:.3f} s for GRPO's one call over twice the rows"
        f" ({gen_pbsd / gen_grpo:.2f}×). Decoding is sequential in the tokens, so halving the rows does not halve a"
        f" call (student call {pb['gen_student']:.3f} s), and the teacher prompts are {pt:.0f} tokens wide against"
        f" {ps:.0f} for the student (padded), so the teacher call takes {pb['gen_teacher']:.3f} s.",
        f"- Teacher scoring: {scoring:.3f} s, {scoring / step:.0%} of the PBSD 4+4 step; GRPO (β=0) has no such pass."
        f" The teacher prompt ({pt:.0f} positions) is run once per prompt group and its KV cache serves the group's"
        f" {2 * group} completions of both sets ({ct:.0f} and {cs:.0f} wide): {shared:.0f} positions per group"
        f" instead of {full:.0f} for `[prompt ; completion]` rows ({shared / full:.0%}); on CPU the completions run"
        " in groups of similar length, each cut to its longest member, which runs fewer positions still.",
        f"- Loss: PBSD's forward+backward over its {2 * shapes['rows']:.0f} samples (one student forward over both sets)"
        f" takes {loss_pbsd:.3f} s against GRPO's {loss_grpo:.3f} s over as many samples (GRPO's scoring head also"
        " computes entropies).",
        f"- With the same scoring head for both (PBSD 4+4 TRL head / GRPO G=8, both on TRL's fused LM head; TRL's head"
        f" also scores the teacher rows in full, without the shared prompt): {unfused['time_ratio'][clock]:.2f}×.",
    ]
    for name in (
        "PBSD 4+4 pool",
        "PBSD 4+4 repeated cache",
        "PBSD 4+4 live 1-pass",
        "PBSD 4+4 live 1-pass rescored",
        "PBSD 4+4 live 1-pass repeated cache",
        "PBSD 4+4 live 2-pass",
        "PBSD 4+4 LoRA 1-pass",
    ):
        if name not in by_name:
            continue
        b = by_name[name]["median_breakdown_s"][clock]
        reference = "LoRA GRPO G=8" if "LoRA" in name else BASELINE
        rb = by_name[reference]["median_breakdown_s"][clock]
        diff = sorted(((k, b[k] - rb[k]) for k in BUCKETS), key=lambda kv: -kv[1])
        lines.append(
            f"- {name} over {reference}, by bucket: "
            + ", ".join(f"{BUCKET_TITLES[k]} {v:+.3f}" for k, v in diff)
            + "."
        )
    return lines


def acceptance_lines(result, clock=None):
    clock = clock or PRIMARY
    by_name = {s["name"]: s for s in result["contenders"]}
    lines = [
        "| contender | reference | target | " + f"{clock} × ref | wall × ref | verdict |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, reference, target in ACCEPTANCE:
        if name not in by_name or reference not in by_name:
            continue
        ratio = by_name[name]["time_ratio_vs"][reference]
        verdict = "MEETS" if ratio[clock] <= target else "MISSES"
        verdicts.append((name, reference, target, ratio, verdict))
        lines.append(
            f"| {name} | {reference} | ≤ {target}× | **{ratio[clock]:.2f}** | {ratio['wall']:.2f} | {verdict} |"
        )
    return lines, verdicts


def pool_lines(result, clock=None):
    clock = clock or PRIMARY
    build = result["pool_build"]
    in_loop = build["in_loop"]
    speedup = build["tokens_per_s"][clock] / in_loop["tokens_per_s"][clock]
    return [
        f"- Build (before the rounds, `build_teacher_pool`, HF `generate`, {build['batch_size']} completions per call):"
        f" {build['rows']} rows × K={build['num_samples']} samples, {build['tokens']} completion tokens in"
        f" {build['seconds'][clock]:.1f} s {clock} ({build['seconds']['wall']:.1f} s wall), sampling and teacher"
        f" log-probs included: **{build['tokens_per_s'][clock]:.0f} tokens/s** {clock}.",
        f"- In-loop teacher generation of PBSD 4+4 (one `generate` call of {in_loop['rows_per_call']:.0f} rows per"
        f" step, {in_loop['tokens_per_call']:.0f} tokens, scoring not included):"
        f" {in_loop['tokens_per_s'][clock]:.0f} tokens/s {clock}. Pool build / in-loop: **{speedup:.1f}×**"
        f" ({'meets' if speedup >= 3 else 'misses'} the ≥ 3× target).",
    ]


PRECISION = {"cpu": "fp32 on CPU", "cuda": "bf16 autocast (`bf16=True`) on the GPU, fp32 weights"}
CLOCK_TEXT = {
    "cpu": "- Two clocks per step and per bucket: wall time and the process's CPU time (`time.process_time`, all"
    " threads; torch runs 1 intra-op thread). The host is shared, and wall time also counts the slices other jobs"
    " take from this process, so the breakdown, the analysis and the verdict use cpu time; wall-time ratios"
    " are shown next to them.",
    "cuda": "- Wall time, with `torch.cuda.synchronize()` at every timer, so that each bucket holds the GPU work it"
    " queued (the CPU-time columns only count the host's side and are not meaningful here).",
}
MEMORY_TEXT = {
    "cpu": "- Memory: `step peak` = resident high-water mark during the step minus the resident size before it"
    " (`VmHWM` reset via `/proc/self/clear_refs`, after `gc.collect()` and `malloc_trim(0)`), median over rounds;",
    "cuda": "- Memory: `step peak` = `torch.cuda.max_memory_allocated()` during the step minus"
    " `torch.cuda.memory_allocated()` before it, median over rounds;",
}


def write_markdown(path, results, machine, command, quick):
    lines = [
        *report_header("Step cost: GRPO vs PBSD at matched sampled completions", command, machine),
        "## Setup",
        "",
        "- Same model weights, prompts (same seed: the same prompts in every step of every contender), generation"
        f" settings (temperature 1, `pad_to_multiple_of=16`), {PRECISION[DEVICE]}, AdamW lr 1e-4, `gradient_checkpointing=False`,"
        " one generation batch per optimizer step, the math reward (`math_accuracy_reward`).",
        "- GRPO samples G=8 completions per prompt; PBSD 4+4 samples G_S=4 from the student and G_T=4 from the teacher"
        " (`teacher_model_kind='base'`, a frozen copy, prompted with the reference solution): 8 sampled completions"
        " per prompt each. PBSD 8+8 samples 16, for reference. GRPO scores with TRL's fused LM head (as shipped);"
        " PBSD with pbsd-trl's fused kernel, or with TRL's head (`TRL head` rows). With pbsd-trl's kernel the"
        " teacher scores each prompt group's completions from one teacher-prompt forward (shared KV cache).",
        "- `pool` rows: the same PBSD with `teacher_pool` (K=8 base-teacher samples per dataset row with their teacher"
        " log-probs, drawn before the rounds with `pbsd_trl.pool.build_teacher_pool`; the build is timed separately"
        " below): no teacher `generate` call and no scoring of the teacher's own samples in the step."
        " `live 1-pass`: `teacher_model_kind='live'`, student and teacher samples from one `generate` call;"
        " `2-pass` rows: the same with two calls (`one_generation_pass=False`)."
        " PBSD's `generate` calls prefill each distinct prompt row once into a KV cache preallocated for the"
        " completion (`share_prompt_prefill=True`, the default; on CPU prompts of similar width together, each"
        " group cut to its widest), and on CPU attend to each prompt's cache once for its samples (shared-prefix"
        " attention); `PBSD 4+4 plain generate` turns all that off, `repeated cache` rows the shared-prefix"
        " attention only, and `GRPO G=8 prefill once` turns them on for TRL's GRPOTrainer."
        " `LoRA` rows: LoRA r=16, α=32 on every linear layer of the student (GRPO and PBSD alike); PBSD with the"
        " `base` teacher (adapter disabled), its samples drawn in the student's `generate` call with per-row adapters"
        " (PEFT's `adapter_names`, `__base__` for the teacher rows).",
        "- One step = `training_step` + gradient clipping + optimizer/scheduler step + `zero_grad`, as"
        " `Trainer._inner_training_loop` does with one micro-batch per step. Contenders live in one process and are"
        " stepped round-robin, order rotated every round; the first round(s) are warm-up and not counted.",
        CLOCK_TEXT[DEVICE] + " Ratios are medians of per-round ratios; s/step and buckets are medians over rounds"
        " (so the buckets need not add up exactly to s/step).",
        "- Buckets: `gen student` / `gen teacher` = first / second `_generate` call of the step (HF `generate`; with"
        " one generation pass the first holds the merged call and the second only decodes and logs);"
        " `rewards` = `_calculate_rewards` (student and teacher samples); `teacher scoring` = PBSD's no-grad"
        " scoring passes (teacher log-probs of teacher and student samples); `other prep` = the rest of"
        " `_generate_and_score_completions` (tokenizing, padding, decoding, metrics); `loss fwd` = `compute_loss`"
        " (PBSD: one student forward over student+teacher samples; GRPO: forward with entropies); `backward` ="
        " `accelerator.backward`; `optim+other` = clipping, optimizer and scheduler steps.",
        MEMORY_TEXT[DEVICE]
        + " `persistent` = parameters + PBSD's frozen teacher copy + AdamW state, which live between steps;"
        " `total` = persistent + step peak.",
    ]
    if quick:
        lines += ["", "**Quick mode**: tiny sizes and two measured steps; a smoke test, not a measurement."]
    verdicts = []
    for result in results:
        spec = result["spec"]
        lines += [
            "",
            f"## {result['config']}",
            "",
            f"{spec['description']}; max_completion_length={spec['max_completion_length']};"
            f" {result['rounds']} measured rounds after {result['warmup']} warm-up.",
            "",
            f"| contender | samples/prompt | {PRIMARY} s/step | × GRPO | wall s/step | × GRPO | step peak MiB | × GRPO"
            " | persistent MiB | total MiB | × GRPO | "
            + " | ".join(BUCKET_TITLES[b] for b in BUCKETS)
            + " | student len | teacher len |",
            "|" + "---|" * (13 + len(BUCKETS)),
        ]
        for s in result["contenders"]:
            b = s["median_breakdown_s"][PRIMARY]
            row = [
                s["name"],
                str(s["sampled_completions_per_prompt"]),
                f"{s['median_s'][PRIMARY]:.3f}",
                f"**{s['time_ratio'][PRIMARY]:.2f}**",
                f"{s['median_s']['wall']:.3f}",
                f"{s['time_ratio']['wall']:.2f}",
                _mib(s["median_extra_peak_bytes"]),
                f"{s['extra_peak_ratio']:.2f}",
                _mib(s["persistent_bytes"]["total"]),
                _mib(s["total_peak_bytes"]),
                f"{s['total_peak_ratio']:.2f}",
                *[f"{b[k]:.3f}" for k in BUCKETS],
                f"{s['mean_student_length']:.1f}",
                f"{s['mean_teacher_length']:.1f}" if s["mean_teacher_length"] is not None else "-",
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Buckets in {PRIMARY} seconds per step; lengths are mean completion tokens."]
        by_name = {s["name"]: s for s in result["contenders"]}
        ratio = by_name[MATCHED]["time_ratio"]
        same_head = by_name[MATCHED_UNFUSED]["time_ratio"]
        verdict = "MEETS" if ratio[PRIMARY] <= TARGET_RATIO else "MISSES"
        verdicts.append((result["config"], ratio, verdict, same_head))
        fused = result["fused_vs_unfused_time_ratio"]
        lines += [
            "",
            f"- PBSD 4+4 / GRPO G=8 time: **{ratio[PRIMARY]:.2f}×** {PRIMARY} ({ratio['wall']:.2f}× wall) → {verdict}"
            f" the ≤ {TARGET_RATIO}× target.",
            f"- Fused kernel on vs off (PBSD 4+4 / PBSD 4+4 TRL head): time {fused[PRIMARY]:.2f}× {PRIMARY}"
            f" ({fused['wall']:.2f}× wall), step peak memory {result['fused_vs_unfused_extra_peak_ratio']:.2f}×.",
            f"- Extra {PRIMARY} seconds of PBSD 4+4 over GRPO G=8, by bucket: "
            + ", ".join(f"{BUCKET_TITLES[k]} {v:+.3f}" for k, v in attribution(result))
            + ".",
            "",
            "Where the time goes:",
            "",
            *analysis_lines(result),
        ]
        table, items = acceptance_lines(result)
        lines += [
            "",
            "Step-time targets (ratios: medians of per-round ratios against the reference):",
            "",
            *table,
            "",
            "Teacher-sample pool:",
            "",
            *pool_lines(result),
        ]
        verdicts[-1] = (*verdicts[-1], items)
    lines += ["", "## Verdict", ""]
    for config, ratio, verdict, same_head, items in verdicts:
        for name, reference, target, r, v in items:
            if name != MATCHED:
                lines.append(
                    f"- {config}: {name} / {reference} = **{r[PRIMARY]:.2f}×** {PRIMARY} time"
                    f" ({r['wall']:.2f}× wall): {v} the ≤ {target}× target."
                )
        lines.append(
            f"- {config}: PBSD 4+4 / GRPO G=8 = **{ratio[PRIMARY]:.2f}×** {PRIMARY} time ({ratio['wall']:.2f}× wall),"
            f" 8 sampled completions per prompt each, PBSD with its default fused kernel and GRPO with TRL's fused"
            f" head: {verdict} the ≤ {TARGET_RATIO}× target. With the same scoring head (TRL's) for both:"
            f" {same_head[PRIMARY]:.2f}× ({'meets' if same_head[PRIMARY] <= TARGET_RATIO else 'misses'})."
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(path, results):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, result in zip(axes[0], results, strict=True):
        names = [s["name"] for s in result["contenders"]]
        bottom = [0.0] * len(names)
        for i, bucket in enumerate(BUCKETS):
            values = [max(s["median_breakdown_s"][PRIMARY][bucket], 0.0) for s in result["contenders"]]
            ax.bar(names, values, bottom=bottom, label=BUCKET_TITLES[bucket], color=colors[i % len(colors)])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for j, s in enumerate(result["contenders"]):
            ax.text(
                j,
                bottom[j],
                f"{s['median_s'][PRIMARY]:.2f}s\n{s['time_ratio'][PRIMARY]:.2f}× GRPO",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{result['config']}: {PRIMARY} seconds per step (median), by bucket")
        ax.set_ylim(0, max(bottom) * 1.2)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="tiny random models, a couple of steps (smoke test)")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--configs", nargs="+", default=None, help="subset of the configurations to run")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per configuration (override)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared host)")
    parser.add_argument(
        "--name", default=None, help="stem of the result files (default step_cost, on CUDA step_cost_cuda_<gpu name>)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--base_steps",
        type=int,
        default=None,
        help="warm-start steps of the built-in model"
        " (default: its recipe's; fewer when the full build does not fit, reported in the results)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    global DEVICE, PRIMARY, BASE_STEPS
    args = parse_args(argv)
    BASE_STEPS = args.base_steps
    command = "python benchmarks/step_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    DEVICE = args.device
    if DEVICE == "cuda":
        PRIMARY = "wall"
    args.name = args.name or result_stem("step_cost", DEVICE)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    configs = QUICK_CONFIGS if args.quick else CUDA_CONFIGS if DEVICE == "cuda" else CONFIGS
    if args.configs:
        configs = {k: configs[k] for k in args.configs}
    if args.rounds:
        configs = {k: dict(v, rounds=args.rounds) for k, v in configs.items()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description(DEVICE)
    import transformers
    import trl

    machine.update(transformers=transformers.__version__, trl=trl.__version__)
    if BASE_STEPS is not None:
        machine["built_in_model_warm_start_steps"] = BASE_STEPS
    if DEVICE == "cpu" and not args.quick:
        machine["memory_touched_before_the_rounds_s"] = round(touch_free_memory(), 1)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        for name, spec in configs.items():
            results.append(run_config(name, spec, tmp_dir))
    try:
        import os

        machine["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    machine["wall_seconds"] = round(time.perf_counter() - started, 1)
    stem = args.output_dir / args.name
    payload = {
        "command": command,
        "machine": machine,
        "quick": args.quick,
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    write_markdown(stem.with_suffix(".md"), results, machine, command, args.quick)
    if not args.quick:
        write_plot(stem.with_suffix(".png"), results)
    print(stem.with_suffix(".md").read_text())
    print(f"Reproduce with: {command}")


if __name__ == "__main__":
    main()
