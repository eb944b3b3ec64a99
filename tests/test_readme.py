"""README.md is the contract with a new user: its Python snippet runs, its test command is what CI runs, it stays a
short page that links the trainer's documentation, and the documents it links hold no machine paths and no dead
links. (Its shell commands run in tests/test_readme_commands.py.)"""

import json
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
    code = python_block("## Quick start")
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


# ---- the shape of the documents ----------------------------------------------------------------------------------

DOCS = ROOT / "docs" / "pbsd_trainer.md"
RESULTS = ROOT / "benchmarks" / "results" / "README.md"
MAX_README_LINES = 150


def test_readme_is_a_short_page():
    lines = README.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail to docs/ or benchmarks/"
    headings = [line for line in lines if line.startswith("## ")]
    for heading in ("## Two commands", "## Quick start", "## Swapping from GRPO", "## Configuration", "## Results"):
        assert heading in headings, f"README.md lost its {heading!r} section"


def test_readme_links_the_trainer_docs_and_the_results():
    assert DOCS.is_file() and RESULTS.is_file() and (ROOT / "CONTRIBUTING.md").is_file()
    assert "](docs/pbsd_trainer.md)" in README
    assert "](benchmarks/results/README.md)" in README
    docs = DOCS.read_text()
    for heading in ("## The loss", "### Reward-aware variants", "## Expected dataset columns", "## Logged metrics"):
        assert f"\n{heading}\n" in docs, f"docs/pbsd_trainer.md lost its {heading!r} section"


def test_readme_claims_no_cpu_independent_training_numbers():
    """After-training numbers depend on the CPU's kernels: README points to the results report for them."""
    assert "same numbers as" not in README
    assert "identical" not in README.lower()


# Absolute paths of the machines reports were written on: /work/…, /root/…, /home/…, /tmp/…, /Users/…, /mnt/…
MACHINE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:work|root|home|tmp|Users|mnt|scratch|private|var/folders)/")
TEXT_SUFFIXES = {".md", ".json", ".txt", ".log", ".csv", ".yaml", ".yml"}


def test_no_machine_paths_in_docs_and_results():
    offenders = []
    for folder in (ROOT / "docs", ROOT / "benchmarks" / "results"):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES:
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                    if MACHINE_PATH.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {MACHINE_PATH.search(line).group(0)}")
    assert not offenders, "machine paths (write them relative to the repository):\n" + "\n".join(offenders[:20])


def test_machine_path_pattern():
    assert MACHINE_PATH.search("Base model `/work/wt13/pbsd_trl/recipes/base_models/math`")
    assert MACHINE_PATH.search('"--out-dir /root/out"')
    assert not MACHINE_PATH.search("https://github.com/huggingface/trl/tree/main/work/x")
    assert not MACHINE_PATH.search("pbsd_trl/recipes/base_models/math and ~/.cache/pbsd_trl/x and <tmp>/sc2")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "document", ["README.md", "docs/pbsd_trainer.md", "benchmarks/results/README.md", "CONTRIBUTING.md"]
)
def test_relative_links_resolve(document):
    """Every relative link of the user-facing documents names a file that exists, and a heading that exists."""
    path = ROOT / document
    dead = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            dead.append(target)
        elif anchor and linked.suffix == ".md":
            anchors = {_anchor(line) for line in linked.read_text().splitlines() if line.startswith("#")}
            if anchor not in anchors:
                dead.append(target)
    assert not dead, f"{document}: dead links {dead}"


# ---- the notebook ------------------------------------------------------------------------------------------------


def _notebook_markdown() -> list[str]:
    notebook = json.loads((ROOT / "examples" / "notebooks" / "quickstart.ipynb").read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown"]


def test_notebook_says_how_to_install_and_run_it():
    first = _notebook_markdown()[0]
    assert 'pip install -e ".[math,plot]"' in first and "jupyter" in first.lower()
    assert 'pip install -e ".[math,plot]" notebook' in README  # the same command as README's notebook section


def test_notebook_quotes_no_number_the_readme_does_not_show():
    """A measured number (a decimal such as 0.42, or a duration) in the notebook's text must also be in README.md,
    so that the two cannot disagree."""
    text = "\n".join(_notebook_markdown())
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text))
    durations = set(re.findall(r"\b\d+ (?:CPU-)?(?:minutes|seconds|s)\b", text))
    missing = sorted(n for n in numbers | durations if n not in README)
    assert not missing, f"the notebook quotes {missing}, which README.md does not show"
