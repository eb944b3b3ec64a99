"""`accelerate launch --num_processes 2` on CPU for the tests (light: imports neither torch nor pbsd_trl)."""

import os
import socket
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "tests", "distributed")
LAUNCH_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # a rank that aborts (SIGABRT, SIGSEGV) prints where each of its threads was
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def accelerate_launch(config_file: str, script: str, *args: str, timeout: float = LAUNCH_TIMEOUT):
    """Two processes with `config_file` (relative to the repository root); returns (returncode, output, seconds).

    A free port is picked for the rendezvous so that concurrent launches on the same machine do not collide.
    """
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, config_file),
        "--num_processes", "2",
        "--num_machines", "1",
        "--mixed_precision", "no",
        "--main_process_port", str(free_port()),
        os.path.join(SCRIPTS, script), *args,
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


_NOISE = ("Warning: ", "warnings.warn(", "return func(*args, **kwargs)")


def failure_report(output: str, limit: int = 8000) -> str:
    """The end of a failed launch's output without the deprecation-warning lines that otherwise fill it, so that the
    per-config progress lines and the error that stopped a rank show."""
    kept = [line for line in output.splitlines() if not any(n in line for n in _NOISE)]
    return "\n".join(kept)[-limit:]
