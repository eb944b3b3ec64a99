# Copyright 2026 The pbsd-trl authors. Licensed under the Apache License, Version 2.0.
"""PBSD on ReAct tool use: evaluate, train, evaluate, report.

With no arguments it runs on a laptop CPU in minutes, offline: the built-in tiny base model
(`pbsd_trl.tiny.get_base_model("tool_use")`, built once and cached in ~/.cache/pbsd_trl) on the built-in synthetic
tool-use task (`pbsd_trl.data.tool_task`, SDFT's ToolAlpaca format: the student sees tool names and a question, the
privileged context holds the tool's documentation and a demonstration). The reward is `tool_call_reward` (same
actions and same merged arguments as the `golden_answer`). It reports tool-call accuracy (Avg@8) of the student and
of the teacher (the network with the documentation) on 200 held-out examples before and after training, and writes
`results.json`, `results.md` and `training_curves.png` into the output directory (default `pbsd-tool-use-tiny/`).

    python examples/tool_use.py

Other data: `--dataset_name FILE_OR_HUB_ID --prompt_column ... --solution_column ... --answer_column <gold calls>`
(the gold column holds SDFT's `[{"Action": ..., "Action_Input": ...}]` list). Every `PBSDConfig` field, `--config`
YAML files, `--use_peft`, `--use_vllm`, interrupt-safe checkpoints and `--resume_from_checkpoint` work as in
`examples/math.py`, and so does `accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml
examples/tool_use.py` (also `zero2.yaml`, and `zero3.yaml` with `--eval_num_problems 0`).
"""

import os
import sys


# `examples/math.py` sits next to this file and is named like the standard library's `math`: drop this folder from
# the import path so that `import math` (numpy, random, ...) finds the standard library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from pbsd_trl.recipes import run_example  # noqa: E402


def main(argv=None):
    return run_example("tool_use", argv, title="PBSD on the built-in ReAct tool-use task")


if __name__ == "__main__":
    main()
