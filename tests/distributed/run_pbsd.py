"""Train several PBSD configurations in one launch and write their per-step losses (rank 0) to a JSON file.

    accelerate launch --num_processes 2 --config_file CFG tests/distributed/run_pbsd.py \
        --model-dir DIR --out OUT.json --global-batch 8 --configs lora:base lora:ema full:base full:ema

Run with plain `python` it is the 1-process reference (per-device batch = global batch). `--fail-rank R` makes the
reward function raise on process R only (the job must then fail, not hang).
"""

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import build_trainer, digit_reward, finish_launched_run, step_logs, write_json  # noqa: E402


def failing_reward_on(rank: int):
    def exploding_reward(completions, answer, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank:
            raise ValueError(f"boom on rank {rank}")
        return digit_reward(completions, answer)

    return exploding_reward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True, help="model of the specs without a third field")
    parser.add_argument("--tied-model-dir", default=None, help="model of the `student:kind:tied` specs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["lora:base", "lora:ema", "full:base", "full:ema"])
    parser.add_argument("--fail-rank", type=int, default=None)
    cli = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = cli.global_batch // world
    results = {}
    for spec in cli.configs:
        # student:kind[:option...], options: `tied` (the tied-embedding model), `all` (pairing="all", G_T=2 < G_S,
        # reward labels: pairs straddle processes through the global pair table), `union` (every two samples of a
        # prompt, soft reward labels, through the same table)
        student, kind, *options = spec.split(":")
        model_dir = cli.tied_model_dir if "tied" in options else cli.model_dir
        pairing = {}
        if "all" in options:
            pairing = dict(pairing="all", num_teacher_generations=2, pair_labels="reward")
        if "union" in options:
            pairing = dict(pairing="union", num_teacher_generations=2, pair_labels="soft", reward_temperature=0.1)
        start = time.time()
        rewards = [failing_reward_on(cli.fail_rank)] if cli.fail_rank is not None else None
        trainer = build_trainer(
            model_dir,
            os.path.join(os.path.dirname(cli.out), f"run-{spec.replace(':', '-')}-{world}"),
            per_device,
            kind,
            peft=student == "lora",
            reward_funcs=rewards,
            max_steps=cli.steps,
            # SGD: no Adam normalization to blow float noise up; LoRA starts at B=0, so it needs a larger step to move
            learning_rate=2.0 if student == "lora" else 0.5,
            **pairing,
        )
        trainer.train()
        results[spec] = step_logs(trainer) | {
            "seconds": time.time() - start,
            "world": world,
            "teacher_state_sum": _teacher_state_sum(trainer),
            "zero3_partitioned": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
            # the head weight is released (numel 0) between forwards only when ZeRO-3 really partitions it
            "lm_head_released": trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight.numel()
            == 0,
        }
        if trainer.accelerator.is_main_process:
            print(f"[run_pbsd] {spec} world={world}: {results[spec]}", flush=True)
        del trainer
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(cli.out, results)


def _teacher_state_sum(trainer):
    state = trainer.teacher.state_dict()  # collective under ZeRO-3
    if state is None:
        return None
    return float(sum(t.double().abs().sum() for t in state.values()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    finish_launched_run()
