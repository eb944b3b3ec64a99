"""The machine a benchmark runs on and the files it writes: machine description, report headers and file names,
peak memory, quiet training logs, plots, and paths as committed reports show them."""

import ctypes
import gc
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import trl


def _malloc_trim() -> None:
    """Give the heap's free pages back to the system (glibc)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Extra peak bytes of one run over what is live just before it."""

    def __init__(self, device):
        self.device = torch.device(device)

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
        raise RuntimeError(field)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            # Give freed heap pages back, or the run would reuse them without raising the resident size
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self._base = self._status_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self.peak = self._status_kib("VmHWM:") * 1024 - self._base


def touch_free_memory(fraction: float = 0.75, chunk_mib: int = 256) -> float:
    """Write to `fraction` of the available memory once and free it; returns the seconds it took.

    `PeakMemory` gives freed pages back to the system before every step, so each step's allocations are fresh pages.
    On a virtual machine whose memory the host has not backed yet, the first touch of a page costs several
    microseconds (measured: 40 s of system time for 18 GB on a freshly booted VM, 5 s the second time), and it would
    land on the contenders with the largest peaks. Touching the memory once before the timed rounds removes that.
    """
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    start = time.perf_counter()
    chunks, chunk = [], chunk_mib << 20
    for _ in range(int(available * fraction) // chunk):
        chunks.append(torch.ones(chunk // 4))  # written: every page touched
    del chunks
    gc.collect()
    _malloc_trim()
    return time.perf_counter() - start


def machine_description(device=None):
    """Versions, CPU model and core count, the GPU (on `device="cuda"`; default: CUDA where available), load average."""
    import transformers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    desc = {"python": platform.python_version(), "torch": torch.__version__, "torch threads": torch.get_num_threads()}
    desc["trl"] = trl.__version__
    desc["transformers"] = transformers.__version__
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                desc[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    desc["gpu"] = torch.cuda.get_device_name() if device == "cuda" else "none (CPU run)"
    try:
        desc["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return desc


def report_header(title, command, machine):
    """The opening lines of a benchmark report: title, the command that reproduces it, the machine."""
    return [
        f"# {title}",
        "",
        f"Reproduce: `{command}`",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
    ]


def result_stem(name, device):
    """`name`, or on CUDA `name_cuda_<GPU model>` so that results from different machines sit side by side."""
    if device != "cuda":
        return name
    gpu = "".join(c if c.isalnum() else " " for c in torch.cuda.get_device_name())
    return f"{name}_cuda_{'_'.join(gpu.split())}"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot written")
        return None
    return plt


def quiet_training_logs(num_threads: int) -> None:
    """Sets the torch thread count and silences the libraries' per-step logs and warnings, which would bury the
    benchmarks' progress bars (hundreds of runs, each warning once)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(num_threads)
    for name in ("transformers", "trl", "pbsd_trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()


REPO_ROOT = Path(__file__).resolve().parents[2]


def display_path(path) -> str:
    """`path` as a committed report shows it: relative to the repository, or to the home folder (`~/...`); never a
    machine's absolute path."""
    resolved = Path(path).expanduser().resolve()
    for base, prefix in ((REPO_ROOT, None), (Path.home(), "~")):
        try:
            relative = resolved.relative_to(base)
        except ValueError:
            continue
        return str(relative) if prefix is None else f"{prefix}/{relative}"
    return resolved.name
