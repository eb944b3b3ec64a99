"""Build a teacher pool with every process of an `accelerate launch` (see tests/test_pool.py)."""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accelerate import PartialState  # noqa: E402
from common import finish_launched_run  # noqa: E402

from pbsd_trl import PBSDConfig  # noqa: E402
from pbsd_trl.pool import build_teacher_pool  # noqa: E402
from pbsd_trl.recipes.data.math_task import make_math_dataset  # noqa: E402
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool-dir", required=True)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--stop-after-batches", type=int, default=None)
    parser.add_argument("--report", required=True)
    a = parser.parse_args()
    state = PartialState()
    tokenizer = build_char_tokenizer()
    model = build_random_model(tokenizer, seed=1)
    args = PBSDConfig(
        output_dir=a.pool_dir + "-run",
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=6,
        use_cpu=True,
        # fp32: GRPOConfig's bf16 default autocasts on CPU too, and torch's bf16 CPU attention fails under
        # ATEN_CPU_CAPABILITY=avx2 on an AMX machine ("pack_vnni2 is only supported when avx512 is supported")
        bf16=False,
        report_to=[],
        teacher_prompt_template="{prompt} Ref: {privileged_context}",
    )
    dataset = make_math_dataset("train", n=a.rows, seed=0)
    pool = build_teacher_pool(
        model,
        tokenizer,
        dataset,
        a.pool_dir,
        args,
        2,
        batch_size=4,
        progress=False,
        stop_after_batches=a.stop_after_batches,
    )
    if state.is_main_process:
        with open(a.report, "w") as f:
            json.dump(
                {
                    "world": state.num_processes,
                    "complete": pool is not None,
                    "keys": None if pool is None else list(pool["key"]),
                },
                f,
            )


if __name__ == "__main__":
    main()
    finish_launched_run()
