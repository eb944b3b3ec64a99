"""PBSD on math: evaluate, train, evaluate, report.

With no arguments it runs on a laptop CPU in minutes, offline: the built-in tiny base model
(`pbsd_trl.recipes.tiny.get_base_model("math")`, a ~1M-parameter character-level Qwen2 warm-started on arithmetic, shipped in the
package and checksummed; `--build_base_model` builds it from scratch instead) on the built-in synthetic arithmetic task
(`pbsd_trl.recipes.data.math_task`: the privileged context is a step-by-step reference solution). It evaluates student Avg@8
and teacher-with-solution Avg@8 on the 200 held-out problems, trains with PBSD, evaluates again, prints a
before/after table and writes `results.json`, `results.md` and `training_curves.png` into the output directory
(default `pbsd-math-tiny/`).

    python examples/math.py

Any model, dataset and every `PBSDConfig` / `GRPOConfig` / TRL `ModelConfig` field can be set on the command line or
in a YAML file (`--config examples/recipes/math_qwen3_lora.yaml`); the built-in defaults apply only to what is not set.
A hub model on your own data (`data/math.jsonl` stands for your file; `--use_vllm` needs `pip install -e ".[vllm]"`
and a GPU, drop `--use_vllm --vllm_mode colocate --teacher_samples_from live` without them):

    python examples/math.py \
        --model_name_or_path Qwen/Qwen3-1.7B --dataset_name data/math.jsonl \
        --prompt_column problem --solution_column solution --answer_column answer \
        --use_peft --use_vllm --vllm_mode colocate --teacher_samples_from live \
        --max_completion_length 1024 --learning_rate 1e-5 --pbsd_beta 0.1 --output_dir runs/pbsd-math

- `--dataset_name`: a hub id or a local json/jsonl/parquet/csv file. `--prompt_column` holds the problem (plain text
  becomes a one-turn conversation), `--solution_column` the privileged context, `--answer_column` the reference
  answer (without it, the final answer of the solution column is used). A missing column or an unreadable file is an
  error naming the file and the column, raised before training.
- `--use_peft`: LoRA r=64, α=128 on q,k,v,o,gate,up,down (the paper's setup; `--lora_r` etc. override).
- `--use_vllm`: GRPO's vLLM generation. vLLM holds the current weights only: add `--teacher_samples_from live`
  (or `--teacher_model_kind live`).
- Ctrl-C / SIGTERM: a checkpoint is saved at the end of the current step and the run stops; continue with
  `--resume_from_checkpoint <output_dir>/checkpoint-<step>` (or `--resume_from_checkpoint true` for the latest).
- `--eval_num_problems 0` skips the evaluations; `--eval_k`, `--eval_batch_size` tune them.

Multi-process (evaluation runs on the main process; ZeRO-3 needs `--eval_num_problems 0`, then evaluate the saved
model with `python -m pbsd_trl.scripts.evaluate`). The configs ask for 8 processes: `--num_processes N` sets yours
(without a GPU the processes run on CPU with gloo). DeepSpeed needs `pip install -e ".[deepspeed]"` first, and on CPU
`--mixed_precision no`:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 2 examples/math.py
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml --num_processes 2 examples/math.py
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml --num_processes 2 examples/math.py \
        --eval_num_problems 0
"""

import os
import sys


# This file is named like the standard library's `math`, and Python puts a script's folder first on the import path:
# take this folder off it before anything (numpy, random, ...) imports `math`. `accelerate launch` runs it the same way.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from accelerate import PartialState

from pbsd_trl.callbacks import SignalCheckpointCallback
from pbsd_trl.recipes.data.tasks import TASKS
from pbsd_trl.recipes.example_args import parse_args, task_parser
from pbsd_trl.recipes.task_example import run_task_example


TASK = TASKS["math"]
TITLE = "PBSD on the built-in arithmetic task"
# The no-argument run on the built-in tiny model (the rest of the defaults: `pbsd_trl.recipes.example_args.EXAMPLE_DEFAULTS`)
DEFAULTS = {
    "output_dir": "pbsd-math-tiny",
    "max_completion_length": TASK.max_completion_length,
    "learning_rate": 1e-4,
    "max_steps": 80,
}


def make_parser():
    """TRL's `TrlParser` over `(ScriptArguments, PBSDConfig, ModelConfig)`, with this script's defaults."""
    return task_parser(TASK, DEFAULTS)


def main(argv=None):
    script_args, training_args, model_args = parse_args(TASK, DEFAULTS, argv)
    stopper = SignalCheckpointCallback()  # SIGTERM / Ctrl-C: checkpoint at the end of the step, then stop
    return run_task_example(TASK, TITLE, script_args, training_args, model_args, stopper)


if __name__ == "__main__":
    main()
    # a clean exit: gloo/NCCL threads that outlive the interpreter can abort a finished run
    PartialState().destroy_process_group()
