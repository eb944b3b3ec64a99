"""Two processes; an environment's `get_reward` raises on rank 1 only. Each rank writes what it raised to
OUT/rank<R>.json.

accelerate launch --num_processes 2 --config_file CFG tests/distributed/run_env_reward_failure.py --out OUT
"""

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from common import finish_launched_run  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import ScriptedAnswerTrainer, tiny_pbsd_config, tool_tokenizer  # noqa: E402

from pbsd_trl.recipes.tiny import build_random_model  # noqa: E402


class RankOneExplodingEnv:
    def reset(self, **kwargs):
        return None

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        """
        return a * b

    def get_reward(self) -> float:
        if int(os.environ.get("RANK", "0")) == 1:
            raise ZeroDivisionError("the judge is down on rank 1")
        return 1.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = tool_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "What is 3 * 4?"}], "privileged_context": "call multiply."}] * 8
    args = tiny_pbsd_config(
        os.path.join(cli.out, "run"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=16,
        max_steps=1,
        teacher_prompt_template="{prompt} Hint: {privileged_context}",
        disable_tqdm=True,
    )
    trainer = ScriptedAnswerTrainer(
        build_random_model(tokenizer, seed=0),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        environment_factory=RankOneExplodingEnv,
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
