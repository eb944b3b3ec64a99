"""Two processes; the reward function raises on rank 1 only. Each rank writes what it raised to OUT/rank<R>.json.

accelerate launch --num_processes 2 --config_file CFG tests/distributed/run_reward_failure.py --model-dir DIR --out OUT
"""

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import build_trainer, finish_launched_run  # noqa: E402
from run_pbsd import failing_reward_on  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    trainer = build_trainer(
        cli.model_dir, os.path.join(cli.out, "run"), 4, "base", peft=False, reward_funcs=[failing_reward_on(1)]
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    start = time.time()
    report = {}
    try:
        trainer.train()
    except Exception as err:  # what each rank raises is the result
        report = {"type": type(err).__name__, "message": str(err)}
    report |= {
        "seconds_to_error": time.time() - start,
        "global_step": trainer.state.global_step,
        "params_unchanged": all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)),
    }
    with open(os.path.join(cli.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    finish_launched_run()
