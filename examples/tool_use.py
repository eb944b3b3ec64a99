"""PBSD on ReAct tool use: evaluate, train, evaluate, report.

With no arguments it runs on a laptop CPU in minutes, offline: the built-in tiny base model
(`pbsd_trl.recipes.tiny.get_base_model("tool_use")`, shipped in the package and checksummed) on the built-in synthetic
tool-use task (`pbsd_trl.recipes.data.tool_task`, SDFT's ToolAlpaca format: the student sees tool names and a question, the
privileged context holds the tool's documentation and a demonstration). The reward is `tool_call_reward` (same
actions and same merged arguments as the `golden_answer`). It reports tool-call accuracy (Avg@8) of the student and
of the teacher (the network with the documentation) on 200 held-out examples before and after training, and writes
`results.json`, `results.md` and `training_curves.png` into the output directory (default `pbsd-tool-use-tiny/`).

    python examples/tool_use.py

Other data: `--dataset_name FILE_OR_HUB_ID --prompt_column ... --solution_column ... --answer_column <gold calls>`
(the gold column holds SDFT's `[{"Action": ..., "Action_Input": ...}]` list). Every `PBSDConfig` field, `--config`
YAML files, `--use_peft`, `--use_vllm`, interrupt-safe checkpoints and `--resume_from_checkpoint` work as in
`examples/math.py`, and so does `accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml
--num_processes 2 examples/tool_use.py` (also `zero2.yaml`, and `zero3.yaml` with `--eval_num_problems 0`, after
`pip install -e ".[deepspeed]"`; see `examples/math.py`).
"""

import os
import sys


# `examples/math.py` sits next to this file and is named like the standard library's `math`: take this folder off the
# import path before anything (numpy, random, ...) imports `math`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from accelerate import PartialState

from pbsd_trl.callbacks import SignalCheckpointCallback
from pbsd_trl.recipes.data.tasks import TASKS
from pbsd_trl.recipes.example_args import parse_args, task_parser
from pbsd_trl.recipes.task_example import run_task_example


TASK = TASKS["tool_use"]
TITLE = "PBSD on the built-in ReAct tool-use task"
# The no-argument run on the built-in tiny model (the rest of the defaults: `pbsd_trl.recipes.example_args.EXAMPLE_DEFAULTS`)
DEFAULTS = {
    "output_dir": "pbsd-tool-use-tiny",
    "max_completion_length": TASK.max_completion_length,
    "learning_rate": 1e-4,
    "max_steps": 60,
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
