"""Two-process (gloo) teacher-pool builds: the processes split the rows, a killed build resumes, every row once."""

import json
import os
import sys

import pytest


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))

from launch import accelerate_launch  # noqa: E402


CONFIG = "examples/accelerate_configs/multi_gpu.yaml"


def test_two_process_build_resumes_and_covers_every_row_once(tmp_path):
    from pbsd_trl.pool import row_key
    from pbsd_trl.recipes.data.math_task import make_math_dataset

    pool_dir, report = str(tmp_path / "pool"), str(tmp_path / "report.json")
    # First launch: each process writes one batch (2 rows of K=2) and stops, as if killed
    code, out, _ = accelerate_launch(
        CONFIG, "run_pool.py", "--pool-dir", pool_dir, "--report", report, "--stop-after-batches", "1"
    )
    assert code == 0, out[-3000:]
    assert json.load(open(report)) == {"world": 2, "complete": False, "keys": None}
    parts = sorted(os.listdir(os.path.join(pool_dir, "parts")))
    assert len(parts) == 2 and any("-r0-" in p for p in parts) and any("-r1-" in p for p in parts), parts

    code, out, _ = accelerate_launch(CONFIG, "run_pool.py", "--pool-dir", pool_dir, "--report", report)
    assert code == 0, out[-3000:]
    result = json.load(open(report))
    dataset = make_math_dataset("train", n=12, seed=0)
    expected = {row_key(p, c) for p, c in zip(dataset["prompt"], dataset["privileged_context"], strict=True)}
    assert result["complete"] and result["world"] == 2
    assert sorted(result["keys"]) == sorted(expected) and len(result["keys"]) == len(expected)
    parts = os.listdir(os.path.join(pool_dir, "parts"))
    # 12 rows, 2 per batch: 6 batches in all, the 2 of the first launch kept
    assert len([p for p in parts if p.endswith(".parquet")]) == 6
