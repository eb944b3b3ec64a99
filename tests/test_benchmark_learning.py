"""`benchmarks/learning.py --quick` runs end to end and writes its report and plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "GRPO", "OPSD", "SDFT", "PBSD-role", "PBSD-reward")


@pytest.mark.slow
def test_learning_quick(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--output_dir", str(tmp_path)],
        check=True, cwd=ROOT, timeout=1200,
    )
    md = (tmp_path / "learning.md").read_text()
    for name in ("learning.json", "learning_curves.png", "learning_stability.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for method in METHODS:
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
