"""Teacher-sample pool: the `base` teacher's samples drawn once, before training, instead of inside every step.

With `teacher_model_kind="base"` the teacher `π_T(·|x,c)` is the initial weights prompted with the privileged
context: its distribution never changes during training, so its samples and their teacher log-probs can be drawn
ahead of time, in large batches, and read back by the trainer (`PBSDConfig.teacher_pool`).

A pool is a folder:

- `data/`: a `datasets` dataset with one row per distinct (prompt, privileged context) of the source dataset:
  `key` (a hash of both), `row` (index of its first occurrence in the source dataset), `completion_ids` (K lists of
  token ids, cut after the first EOS as GRPO cuts them), `teacher_logps` (K sums of the teacher's per-token log-probs
  of those completions given the teacher prompt, at the sampling temperature) and `teacher_prompt_length`.
- `parts/`: the batches written while building (kept, so that an interrupted build resumes where it stopped).
- `pbsd_pool.json`: the stamp, what the samples were drawn from (teacher weights and model configuration
  fingerprints, weights dtype and mixed precision, tokenizer, teacher prompt template and budget, sampling settings,
  K). The trainer recomputes the stamp from its own model and config
  and refuses a pool whose stamp differs, naming the field.

Modules: `stamp` (what a pool was drawn from), `sampling` (teacher prompts, samples, their log-probs), `build`
(building, resuming, loading), `reader` (the trainer's view of a pool, the example scripts' default).

Build with [`build_teacher_pool`] or `python -m pbsd_trl.scripts.build_teacher_pool` (under `accelerate launch` to
shard the rows over processes).
"""

from ..sampling import HFSampler, VLLMSampler
from .build import build_teacher_pool, default_pool_batch_size, load_teacher_pool
from .reader import TeacherPool, rows_visited, use_default_pool
from .sampling import cut_after_eos, sequence_logps, teacher_prompt_builder, tokenize_prompts
from .stamp import (
    CHECKED_FIELDS,
    POOL_FORMAT,
    POOL_STAMP_FILE,
    TeacherPoolError,
    eos_token_ids,
    pool_stamp,
    row_key,
    sampling_settings,
    stamp_mismatches,
    tokenizer_fingerprint,
    weights_fingerprint,
)


__all__ = [
    "CHECKED_FIELDS",
    "POOL_FORMAT",
    "POOL_STAMP_FILE",
    "HFSampler",
    "TeacherPool",
    "TeacherPoolError",
    "VLLMSampler",
    "build_teacher_pool",
    "cut_after_eos",
    "default_pool_batch_size",
    "eos_token_ids",
    "load_teacher_pool",
    "pool_stamp",
    "row_key",
    "rows_visited",
    "sampling_settings",
    "sequence_logps",
    "stamp_mismatches",
    "teacher_prompt_builder",
    "tokenize_prompts",
    "tokenizer_fingerprint",
    "use_default_pool",
    "weights_fingerprint",
]
