"""Every shell command README.md shows runs as written, so that a stale command fails CI.

The commands are read from README.md's ```bash blocks, not copied here. Each one that can run on CPU runs as the
README writes it, with the documented command-line overrides that make it small (`--max_steps 2`, tiny evaluations:
every `PBSDConfig` field can be set on the command line), from a fresh folder, offline; the distributed launch also
gets a free `--main_process_port`, so that concurrent launches on one machine do not collide. The setup steps in
front of a command (`python3 -m venv`, `pip install …`) are checked, not run (installing needs the network): the
extras they name exist in `pyproject.toml` and torch's pin is the CI test command's. A command this file does not
know fails `test_every_readme_command_is_covered`: add it to `COMMANDS` below.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])

# Documented overrides (README: every field can be set on the command line) that make a training command cost a few
# CPU-seconds: 2 steps of 2 prompts x 4 samples, evaluations on 4 problems x 2 samples
SMALL = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "8",
    "--num_generations", "4",
    "--logging_steps", "1",
    "--eval_num_problems", "4",
    "--eval_k", "2",
]  # fmt: skip


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(block, marker line before it) for every ```bash block."""
    return [(m.group(2), m.group(1)) for m in re.finditer(r"([^\n]*)\n```bash\n(.*?)```", text, re.S)]


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _in_test_command_block(block: str) -> bool:
    marker_index = README.index("<!-- test-command")
    return README.index(block) > marker_index and README.index(block) - marker_index < 200


README_COMMANDS = [(cmd, _in_test_command_block(block)) for block, _ in bash_blocks(README) for cmd in commands(block)]
USER_COMMANDS = [cmd for cmd, is_test_command in README_COMMANDS if not is_test_command]


def readme_command(pattern: str) -> str:
    """The one README command matching `pattern` (a regex), outside the CI test-command block."""
    found = [cmd for cmd in USER_COMMANDS if re.search(pattern, cmd)]
    assert len(found) == 1, f"README.md should show exactly one command matching {pattern!r}, found {found}"
    return found[0]


# pattern of each README command -> how it is tested (the test functions below)
COMMANDS = {
    r"^python3 -m venv \.venv .*python examples/math\.py$": "test_main_command",
    r"^python examples/math\.py --help$": "test_math_help",
    r"^python examples/tool_use\.py$": "test_tool_use_command",
    r"^accelerate launch .*multi_gpu\.yaml --num_processes 2 examples/math\.py$": "test_distributed_command",
    r"^pip install -e .* notebook && jupyter notebook examples/notebooks/quickstart\.ipynb$": "test_notebook_command",
}


def test_every_readme_command_is_covered():
    assert len(USER_COMMANDS) >= len(COMMANDS), USER_COMMANDS
    unknown = [cmd for cmd in USER_COMMANDS if not any(re.search(p, cmd) for p in COMMANDS)]
    assert not unknown, f"README.md shows commands no test runs: {unknown} (add them to COMMANDS)"
    test_commands = [cmd for cmd, is_test_command in README_COMMANDS if is_test_command]
    assert len(test_commands) == 2, "the CI test-command block (two lines) was not found"


def check_setup(parts: list[str]) -> None:
    """`python3 -m venv`, `. activate`, `pip install …` steps: the extras they name exist, torch's pin is the test
    command's."""
    test_pins = set(re.findall(r"torch==([\w.]+)", "".join(c for c, t in README_COMMANDS if t)))
    for part in parts:
        for extras in re.findall(r'-e "\.\[([\w,]+)\]"', part):
            missing = set(extras.split(",")) - EXTRAS
            assert not missing, f"`{part}` names extras pyproject.toml does not define: {missing}"
        for pin in re.findall(r"torch==([\w.]+)", part):
            assert {pin} == test_pins, f"`{part}` pins torch {pin}, the test command {test_pins}"
        assert re.match(r"^(python3 -m venv \S+|\. \S+/bin/activate|pip install .+)$", part), part


def split_setup(command: str) -> tuple[list[str], str]:
    parts = command.split(" && ")
    return parts[:-1], parts[-1]


def run(command: str, tmp_path: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run README's `command` (plus `extra` arguments) with bash in `tmp_path`, this environment first on PATH,
    offline; the example paths resolve from the repository root."""
    argv = shlex.split(command)
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv] + list(extra)
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        ["bash", "-c", shlex.join(argv)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_ok(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def check_run_messages(output: str, out_dir: Path) -> None:
    """The pool message adds up, no warning contradicts it, and the results listing names everything written."""
    pool = re.search(
        r"for each of the (\d+) distinct prompts .*? \((\d+) of the (\d+) rows of train_dataset .*? the other (\d+) are",
        output,
        re.S,
    )
    assert pool, output[-4000:]
    distinct, covered, rows, other = map(int, pool.groups())
    assert covered + other == rows and 0 < distinct <= covered
    assert "has no samples for" not in output  # the trainer's coverage warning, which the message above explains
    listing = output[output.index("[pbsd] Output folder") :]
    for entry in out_dir.iterdir():
        assert entry.name in listing, f"the results listing omits {entry.name}:\n{listing}"


@pytest.mark.slow
def test_main_command(tmp_path):
    """README's main command: the setup steps name what exists, `python examples/math.py` runs (2 steps) and leaves
    the output folder README describes."""
    setup, command = split_setup(readme_command(COMMANDS_BY_TEST["test_main_command"]))
    check_setup(setup)
    output = assert_ok(run(command, tmp_path, *SMALL))
    out_dir = tmp_path / "pbsd-math-tiny"  # the default output folder README names
    names = {entry.name for entry in out_dir.iterdir()}
    written = ["results.md", "results.json", "training_curves.png", "training_curves.json", "README.md"]
    written += ["model.safetensors", "config.json", "tokenizer.json", "checkpoint-2"]
    assert set(written) <= names, f"{set(written) - names} missing from {sorted(names)}"
    assert any(name.startswith("teacher_pool-") for name in names), sorted(names)
    # what README says the folder holds
    for mention in ["`pbsd-math-tiny/`", "`results.md`", "`results.json`", "`training_curves.png` and `.json`"]:
        assert mention in README, f"README no longer describes the output folder's {mention}"
    for mention in ["`README.md` model card", "`checkpoint-<step>/`", "`teacher_pool-<hash>/`"]:
        assert mention in README, f"README no longer describes the output folder's {mention}"
    assert "[pbsd] before training: student Avg@2" in output
    check_run_messages(output, out_dir)


@pytest.mark.slow
def test_math_help(tmp_path):
    output = assert_ok(run(readme_command(COMMANDS_BY_TEST["test_math_help"]), tmp_path, timeout=300))
    for flag in ("--pbsd_beta", "--teacher_model_kind", "--dataset_name", "--model_name_or_path", "--max_steps"):
        assert flag in output


@pytest.mark.slow
def test_tool_use_command(tmp_path):
    command = readme_command(COMMANDS_BY_TEST["test_tool_use_command"])
    output = assert_ok(run(command, tmp_path, *SMALL))
    out_dir = tmp_path / "pbsd-tool-use-tiny"
    assert (out_dir / "results.json").is_file()
    check_run_messages(output, out_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_command(tmp_path):
    """README's distributed command as written (2 processes), on CPU (gloo), 2 steps."""
    command = readme_command(COMMANDS_BY_TEST["test_distributed_command"])
    config = re.search(r"--config_file (\S+)", command).group(1)
    assert (ROOT / config).is_file()
    with socket.socket() as s:  # a free rendezvous port: concurrent launches on one machine must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = command.replace("accelerate launch ", f"accelerate launch --main_process_port {port} ", 1)
    output = assert_ok(run(command, tmp_path, *SMALL))
    out_dir = tmp_path / "pbsd-math-tiny"
    assert (out_dir / "results.json").is_file() and (out_dir / "model.safetensors").is_file()
    assert output.count("[pbsd] Output folder") == 1  # the main process reports, once
    check_run_messages(output, out_dir)


def test_notebook_command():
    """The notebook command installs existing extras and opens the notebook that tests/test_notebook.py runs."""
    setup, command = split_setup(readme_command(COMMANDS_BY_TEST["test_notebook_command"]))
    check_setup(setup)
    notebook = command.split()[-1]
    assert (ROOT / notebook).is_file()


def test_documented_extras_and_files_exist():
    """Every `pip install -e ".[…]"` and every config file named in README, docs/ and examples/ exists."""
    texts = {"README.md": README, "CONTRIBUTING.md": (ROOT / "CONTRIBUTING.md").read_text()}
    for path in [
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "examples").rglob("*.py"),
        *(ROOT / "examples").rglob("*.yaml"),
    ]:
        texts[str(path.relative_to(ROOT))] = path.read_text()
    for name, text in texts.items():
        for extras in re.findall(r'-e "\.\[([\w,]+)\]"', text):
            assert set(extras.split(",")) <= EXTRAS, f"{name}: unknown extras in .[{extras}]"
        for path in re.findall(r"--config(?:_file)? (examples/\S+\.yaml)", text):
            assert (ROOT / path).is_file(), f"{name}: {path} does not exist"


COMMANDS_BY_TEST = {test: pattern for pattern, test in COMMANDS.items()}
