"""The benchmark scripts' smoke modes (`--quick`) run end to end and write their reports and plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
LEARNING_METHODS = ("base", "GRPO", "OPSD", "SDFT", "PBSD-role", "PBSD-reward")


def run_quick(script, *args, timeout):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *map(str, args)],
                   check=True, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_logprob_kernel_quick(tmp_path):
    run_quick("bench_logprob_kernel.py", "--sweep", "--reps", 1, "--out-dir", tmp_path, timeout=600)
    for suffix in (".md", ".json", "_sweep.json"):
        assert (tmp_path / f"logprob_kernel{suffix}").stat().st_size > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "logprob_kernel.png").stat().st_size > 0


@pytest.mark.slow
def test_learning_quick(tmp_path):
    run_quick("learning.py", "--output_dir", tmp_path, timeout=1200)
    md = (tmp_path / "learning.md").read_text()
    for name in ("learning.json", "learning_curves.png", "learning_stability.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for method in LEARNING_METHODS:
        assert f"| {method} | 1 |" in md, method
    assert "## Verdicts" in md and "## Errors" not in md
    payload = json.loads((tmp_path / "learning.json").read_text())
    assert payload["config"]["quick"]
    for run in payload["runs"]:
        assert run["final"] is not None and run["tokens"] >= payload["config"]["budget_tokens"], run["method"]
        if run["method"].startswith("PBSD"):
            assert run["teacher_tokens"] > 0
        else:
            assert run["teacher_tokens"] == 0


@pytest.mark.slow
def test_step_cost_quick(tmp_path):
    run_quick("step_cost.py", "--output_dir", tmp_path, timeout=900)
    md = (tmp_path / "step_cost.md").read_text()
    payload = json.loads((tmp_path / "step_cost.json").read_text())
    assert "| GRPO G=8 |" in md and "| PBSD 4+4 |" in md and "Verdict" in md
    assert payload["quick"] and payload["results"]
    for result in payload["results"]:
        names = {c["name"]: c for c in result["contenders"]}
        assert {"GRPO G=8", "PBSD 4+4", "PBSD 4+4 TRL head", "PBSD 8+8"} <= set(names)
        for contender in names.values():
            assert contender["median_s"]["wall"] > 0 and contender["median_s"]["cpu"] > 0
            assert contender["median_extra_peak_bytes"] >= 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["gen_teacher"] > 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["teacher_scoring"] > 0
        assert names["GRPO G=8"]["median_breakdown_s"]["cpu"]["teacher_scoring"] == 0
        assert names["GRPO G=8"]["time_ratio"] == {"wall": 1.0, "cpu": 1.0}
        # the pool contenders take the teacher's samples from the pool built before the rounds: no teacher generate
        assert result["pool_build"]["tokens"] > 0 and result["pool_build"]["rows"] > 0
        assert names["PBSD 4+4 pool"]["median_breakdown_s"]["cpu"]["gen_teacher"] == 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["gen_teacher"] > 0
        assert names["PBSD 4+4 LoRA 1-pass"]["time_ratio_vs"]["LoRA GRPO G=8"]["cpu"] > 0
