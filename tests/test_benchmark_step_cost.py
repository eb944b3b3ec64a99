"""`benchmarks/step_cost.py --quick` runs end to end and writes its report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_cost_quick(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--quick", "--output_dir", str(tmp_path)],
        check=True, cwd=ROOT, timeout=900,
    )
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
