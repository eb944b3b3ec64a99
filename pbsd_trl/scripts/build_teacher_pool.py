"""Draw a teacher-sample pool for a fixed (`base`) teacher, before training.

    python -m pbsd_trl.scripts.build_teacher_pool --pool_dir pools/math --num_samples 8 --max_completion_length 64
    accelerate launch --num_processes 4 -m pbsd_trl.scripts.build_teacher_pool --model_name_or_path Qwen/Qwen3-1.7B \\
        --dataset_name data/math.jsonl --prompt_column problem --solution_column solution \\
        --max_completion_length 1024 --pool_dir pools/qwen3-math --num_samples 8 --backend vllm

Every `PBSDConfig` field can be passed (`--temperature`, `--max_completion_length`, `--teacher_prompt_template`,
`--max_teacher_prompt_length`, `--privileged_context_column`, `--bf16`, …): pass the values the training run will use,
since the trainer refuses a pool whose stamp differs, naming the field. Without `--model_name_or_path` /
`--dataset_name` it uses the built-in tiny model and dataset of `--task`, with the example scripts' shared defaults
(`pbsd_trl.recipes.example_args.EXAMPLE_DEFAULTS`) and the task's teacher prompt; the no-argument `examples/math.py` run also
sets `--max_completion_length 64` (first line above).
Interrupted builds resume when rerun with the same arguments. Then train with `--teacher_pool <pool_dir>`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class PoolArguments:
    pool_dir: str = field(metadata={"help": "Folder of the pool (created; resumed when it exists)."})
    num_samples: int = field(default=8, metadata={"help": "K: teacher samples per row (>= num_teacher_generations)."})
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions per generate call (rows x K); default 64 on CPU, 256 on a GPU."},
    )
    backend: str = field(default="hf", metadata={"help": "'hf' (transformers generate) or 'vllm' (offline vllm.LLM)."})
    task: str = field(default="math", metadata={"help": "Built-in task whose defaults, model and dataset apply."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Teacher model (default: built-in)."})
    dtype: str | None = field(
        default=None, metadata={"help": "Model dtype (e.g. bfloat16); default: the checkpoint's."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset (hub id or local file); default: built-in."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the problem."})
    solution_column: str | None = field(default=None, metadata={"help": "Column with the privileged context."})
    train_size: int = field(default=2000, metadata={"help": "Rows of the built-in training set."})
    pool_seed: int = field(default=0, metadata={"help": "Sampling seed of the pool."})
    vllm_gpu_memory_utilization_pool: float = field(
        default=0.5, metadata={"help": "vLLM memory share (backend vllm)."}
    )


def main(argv=None):
    import torch
    from accelerate import PartialState
    from transformers import HfArgumentParser

    from ..config import PBSDConfig
    from ..pool import build_teacher_pool
    from ..recipes.data.loading import load_prompt_dataset
    from ..recipes.data.tasks import TASKS
    from ..recipes.example_args import EXAMPLE_DEFAULTS
    from ..recipes.models import load_model_and_tokenizer

    argv = list(sys.argv[1:] if argv is None else argv)
    pool_args, rest = HfArgumentParser(PoolArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    spec = TASKS[pool_args.task]
    defaults = dict(EXAMPLE_DEFAULTS, teacher_prompt_template=spec.teacher_prompt_template)
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    parser = HfArgumentParser(PBSDConfig)
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in {f.dest for f in parser._actions}})
    (args,) = parser.parse_args_into_dataclasses(args=rest)
    state = PartialState()

    model_path = pool_args.model_name_or_path
    if model_path is None:
        from ..recipes.tiny import get_base_model

        with state.main_process_first():
            model_path = get_base_model(pool_args.task, progress_bar=state.is_main_process)
    dtype = getattr(torch, pool_args.dtype) if pool_args.dtype else None
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
    common = dict(
        prompt_column=pool_args.prompt_column,
        solution_column=pool_args.solution_column,
        task=spec,
        privileged_context_column=args.privileged_context_column,
        seed=args.seed,
    )
    if pool_args.dataset_name is None:
        dataset = load_prompt_dataset(
            f"builtin:{pool_args.task}", builtin_split="train", num_rows=pool_args.train_size, **common
        )
    else:
        dataset = load_prompt_dataset(pool_args.dataset_name, split=pool_args.dataset_train_split, **common)

    start = time.perf_counter()
    pool = build_teacher_pool(
        model,
        tokenizer,
        dataset,
        pool_args.pool_dir,
        args,
        pool_args.num_samples,
        batch_size=pool_args.batch_size,
        backend=pool_args.backend,
        model_name_or_path=model_path,
        seed=pool_args.pool_seed,
        vllm_gpu_memory_utilization=pool_args.vllm_gpu_memory_utilization_pool,
    )
    if state.is_main_process:
        tokens = sum(len(c) for row in pool["completion_ids"] for c in row)
        print(
            f"[pbsd] Teacher pool: {len(pool)} rows x K={pool_args.num_samples} samples ({tokens} completion tokens) "
            f"in {pool_args.pool_dir}, {time.perf_counter() - start:.0f} s. Train with --teacher_pool {pool_args.pool_dir}"
        )
    return pool


if __name__ == "__main__":
    main()
    from accelerate import PartialState

    # a clean exit: gloo/NCCL threads that outlive the interpreter can abort a finished run
    PartialState().destroy_process_group()
