"""README.md is the contract with a new user: its Python snippet runs, and its test command is what CI runs."""

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README[README.index(after_heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_python_snippet_trains(tiny_model_dir, tmp_path, monkeypatch):
    code = python_block("## Use it from Python")
    # The snippet as a user reads it, on a local tiny model (loaded through `from_pretrained` from the path) and shorter
    for old, new in [
        ('"Qwen/Qwen3-0.6B"', repr(tiny_model_dir)),
        ('output_dir="Qwen3-0.6B-PBSD"', f"output_dir={str(tmp_path)!r}"),
        ("max_completion_length=256", "max_completion_length=8"),
        ("max_steps=10", "max_steps=2, report_to=[], save_strategy='no', use_cpu=True, bf16=False"),
    ]:
        assert old in code, f"the README snippet no longer contains {old}: update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"pbsd/margin", "pbsd/teacher_reward", "pbsd/student_reward"} <= logged
    # the teacher prompt carries the privileged context, the student prompt does not
    assert all("privileged_context" not in str(p) for p in namespace["dataset"]["prompt"])


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in script  # .ci/run extracts the README block marked below, it does not copy it
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip()
    assert "pip install -e" in command and "pytest" in command
    assert "ruff check ." in command and "ruff format --check ." in command  # lint, TRL's settings (pyproject.toml)
    block = re.search(r"<!-- test-command.*?-->\n```bash\n(.*?)```", README, re.S).group(1).strip()
    assert command == block
