"""A finished pool as the trainer reads it, and the example scripts' default pool."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence

from .build import build_teacher_pool, load_teacher_pool
from .stamp import TeacherPoolError, pool_stamp, row_key, stamp_mismatches


# ---- use in the trainer -----------------------------------------------------------------------------------------
class TeacherPool:
    """A finished pool as the trainer reads it: K samples per key, taken G_T at a time, unused ones first.

    The i-th visit of a prompt group takes samples `(i·G_T + j) mod K` for its j-th teacher row, so every sample is
    used once before any is reused. Visits are counted per process (the rows of a prompt group sit on one process
    when the per-device batch holds whole groups), saved with each checkpoint and restored on resume (`pool.state`),
    so that a resumed run takes the samples an uninterrupted one would.
    """

    def __init__(self, path: str, stride: int = 1):
        self.path = path
        self.stride = stride  # G_T: samples a group takes per visit
        self.dataset, self.stamp = load_teacher_pool(path)
        self.num_samples = int(self.stamp["num_samples"])
        self._index = {key: i for i, key in enumerate(self.dataset["key"])}
        self._completions = self.dataset["completion_ids"]
        self._logps = self.dataset["teacher_logps"]
        self.visits: Counter[str] = Counter()

    def check(self, expected_stamp: dict, num_teacher_generations: int) -> None:
        problems = stamp_mismatches(self.stamp, expected_stamp)
        if problems:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} was drawn from another teacher or with other settings than this "
                "run: " + "; ".join(problems) + ". Rebuild the pool with this run's model and config "
                "(`python -m pbsd_trl.scripts.build_teacher_pool`), or unset `teacher_pool`."
            )
        if self.num_samples < num_teacher_generations:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} holds K={self.num_samples} samples per row, fewer than "
                f"`num_teacher_generations`={num_teacher_generations} taken per prompt. Rebuild it with "
                f"--num_samples >= {num_teacher_generations}."
            )

    def check_covers(self, dataset, column: str, name: str = "train_dataset") -> None:
        """Every row of `dataset` must have samples: fail at construction, naming the first row without."""
        missing = [
            i
            for i, (prompt, context) in enumerate(zip(dataset["prompt"], dataset[column], strict=True))
            if row_key(prompt, context) not in self._index
        ]
        if missing:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} has no samples for {len(missing)} of the {len(dataset)} rows of "
                f"{name} (first: row {missing[0]}). Build the pool from this dataset (rerunning the build command "
                "on the same folder draws only the missing rows)."
            )

    def has(self, key: str) -> bool:
        return key in self._index

    def take(self, key: str, visit: int, position: int) -> tuple[list[int], float]:
        """The sample the `position`-th teacher row of a group takes on the group's `visit`-th visit."""
        if key not in self._index:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} has no samples for a training prompt (key {key})."
            )
        i = self._index[key]
        j = (visit * self.stride + position) % self.num_samples
        return list(self._completions[i][j]), float(self._logps[i][j])

    def draw(self, keys: Sequence[str], positions: Sequence[int], groups: Sequence[int]) -> tuple[list, list]:
        """Samples and teacher log-probs of teacher rows given their key, position in their group and group id.

        Rows of the same group share one visit number; each group seen counts as one visit of its key.
        """
        visit_of_group: dict[int, int] = {}
        for key, group in zip(keys, groups, strict=True):
            if group not in visit_of_group:
                visit_of_group[group] = self.visits[key]
                self.visits[key] += 1
        ids, logps = [], []
        for key, position, group in zip(keys, positions, groups, strict=True):
            sample, logp = self.take(key, visit_of_group[group], position)
            ids.append(sample)
            logps.append(logp)
        return ids, logps


# ---- the example scripts' default -------------------------------------------------------------------------------
def rows_visited(trainer, dataset) -> list[int]:
    """Indices of the dataset rows the run's `max_steps` optimizer steps will draw, in GRPO's sampler order."""
    args = trainer.args
    if args.max_steps is None or args.max_steps <= 0:
        return list(range(len(dataset)))
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    sampler = trainer._get_train_sampler(dataset)
    seen: dict[int, None] = {}
    drawn = 0
    while drawn < needed:
        before = drawn
        for index in sampler:
            seen.setdefault(int(index), None)
            drawn += 1
            if drawn >= needed:
                break
        if drawn == before:  # an empty sampler
            break
    return list(seen)


def pool_keys_hold(trainer, dataset, column: str) -> list[bool]:
    """For each row of `dataset`, whether the trainer's pool holds samples for it."""
    pool = trainer._teacher_pool
    return [pool.has(row_key(p, c)) for p, c in zip(dataset["prompt"], dataset[column], strict=True)]


def use_default_pool(trainer, dataset, pool_root: str | None = None, say=print) -> str | None:
    """The example scripts' choice: draw the base teacher's samples for the rows the run visits into a pool first.

    A pool with K = G_T samples per visited row never draws more teacher samples than the run would draw online (each
    row is visited at least once), draws them in large batches, and spares the rescoring of the teacher's own
    samples. It applies with the fixed `base` teacher sampled with HF `generate` (not vLLM, not DeepSpeed/FSDP-sharded
    weights). Its cost against sampling online is in `benchmarks/results/default_job_pool.md`; a rerun of the same
    command reuses it. Returns the pool folder, or None when it does not apply.
    """
    args = trainer.args
    if args.teacher_pool is not None:
        return args.teacher_pool
    why_not = None
    if args.teacher_model_kind != "base" or args.teacher_samples_from != "teacher":
        why_not = f"teacher_model_kind={args.teacher_model_kind!r} changes during training"
    elif trainer.use_vllm:
        why_not = "vLLM serves the student's samples (pass a --teacher_pool built beforehand)"
    elif trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        why_not = (
            "the weights are sharded (build one with pbsd_trl.scripts.build_teacher_pool and pass --teacher_pool)"
        )
    if why_not is not None:
        say(f"[pbsd] Teacher samples: drawn in every step ({why_not}).")
        return None
    rows = rows_visited(trainer, dataset)
    subset = dataset.select(rows)
    teacher = trainer.teacher_weights_model()
    stamp = pool_stamp(teacher, trainer._tokenizer, args, trainer.eos_token_ids)
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = os.path.join(pool_root or args.output_dir, f"teacher_pool-{digest}")
    num_samples = args.num_teacher_generations
    start = time.perf_counter()
    pool = build_teacher_pool(teacher, trainer._tokenizer, subset, path, args, num_samples)
    seconds = time.perf_counter() - start
    trainer.use_teacher_pool(path, warn_missing=False)  # the rows without samples are never visited: said below
    column = args.privileged_context_column
    covered = sum(pool_keys_hold(trainer, dataset, column))
    run = f"the run's {args.max_steps} steps" if args.max_steps and args.max_steps > 0 else "the run"
    say(
        f"[pbsd] Teacher samples: K={num_samples} base-teacher samples for each of the {len(pool)} distinct prompts "
        f"{run} visit, drawn in {seconds:.0f} s into {path} ({covered} of the "
        f"{len(dataset)} rows of train_dataset hold one of these prompts; the other {len(dataset) - covered} are "
        "not visited, so no step samples the teacher online). Training takes its teacher samples from this pool "
        "instead of sampling and rescoring the teacher in every step; rerunning the same command reuses it. "
        "`--auto_teacher_pool false` samples the teacher in every step instead."
    )
    return path
