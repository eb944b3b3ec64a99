"""Uninterrupted vs resumed training: 4 steps with checkpoints every 2, then a fresh trainer resumed from checkpoint-2.

Writes (rank 0) a JSON with, per configuration, the losses of both runs and the largest differences of the final
student parameters and of the EMA teacher tensors. Importable (`run(...)`, single process, used in-process by
tests/test_checkpoint.py) and launchable (`accelerate launch ... run_resume.py --model-dir D --out O.json`).
"""

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import build_trainer, finish_launched_run, step_logs, write_json  # noqa: E402

from pbsd_trl.teacher.weights import _gathered  # noqa: E402


def _student_params(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = list(model.named_parameters())
    with _gathered([p for _, p in named]):  # collective under ZeRO-3
        return {name: p.detach().to("cpu", torch.float64, copy=True) for name, p in named}


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
    worst = 0.0
    for key in a:
        scale = max(a[key].abs().max().item(), 1e-12)
        worst = max(worst, (a[key] - b[key]).abs().max().item() / scale)
    return worst


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


def run(model_dir: str, out_dir: str, configs: list[str], global_batch: int = 8) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = global_batch // world
    results = {}
    for spec in configs:
        student, kind = spec.split(":")
        common = dict(
            per_device_batch=per_device,
            kind=kind,
            peft=student == "lora",
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            optim="adamw_torch",  # optimizer moments must come back from the checkpoint too
            learning_rate=2e-2,
            save_only_model=False,
        )
        full_dir = os.path.join(out_dir, f"full-{student}-{kind}")
        trainer = build_trainer(model_dir, full_dir, **common)
        trainer.train()
        full_logs, full_params = step_logs(trainer), _student_params(trainer)
        full_teacher = trainer.teacher.state_dict()
        del trainer

        trainer = build_trainer(model_dir, os.path.join(out_dir, f"resumed-{student}-{kind}"), **common)
        trainer.train(resume_from_checkpoint=os.path.join(full_dir, "checkpoint-2"))
        resumed_logs, resumed_params = step_logs(trainer), _student_params(trainer)
        resumed_teacher = trainer.teacher.state_dict()
        del trainer

        results[spec] = {
            "full": full_logs,
            "resumed": resumed_logs,
            "param_max_rel_diff": _max_rel_diff(full_params, resumed_params),
            "param_max_abs_diff": _max_abs_diff(full_params, resumed_params),
            "teacher_max_abs_diff": None if full_teacher is None else _max_abs_diff(full_teacher, resumed_teacher),
            "teacher_num_tensors": None if full_teacher is None else len(full_teacher),
            "world": world,
        }
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=["lora:ema", "full:ema"])
    cli = parser.parse_args()
    results = run(cli.model_dir, os.path.dirname(cli.out), cli.configs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[run_resume] {results}", flush=True)
        write_json(cli.out, results)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    finish_launched_run()
