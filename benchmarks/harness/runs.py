"""Stored benchmark runs: stable run keys, the run cache (one JSON file per finished run, written atomically), the
identity of a base model (its task and weights' hash), the machine a run was measured on, and the small base model
that smoke runs train."""

import hashlib
import json
import os
from pathlib import Path

from harness.system import machine_description


def run_key(spec: dict) -> str:
    """Stable hash of a run's full specification (dict key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model_path: str) -> str:
    """`<task>-<sha256 of the weights, 12 hex>`: the same weights get the same run keys wherever they are stored
    (the shipped copy in the package or a cache build)."""
    manifest = Path(model_path) / "pbsd_trl_base.json"
    task = json.loads(manifest.read_text()).get("task", "model") if manifest.is_file() else "model"
    digest = hashlib.sha256((Path(model_path) / "model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{task}-{digest}"


class RunCache:
    """One JSON file per finished run, written atomically, so that an interrupted benchmark resumes."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, spec: dict) -> Path:
        return self.root / spec["task"] / f"{run_key(spec)}.json"

    def get(self, spec: dict) -> dict | None:
        path = self.path(spec)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("spec") != json.loads(json.dumps(spec, default=str)):
            raise RuntimeError(f"{path}: stored specification differs from the requested one (hash collision?).")
        return record

    def put(self, spec: dict, record: dict) -> Path:
        path = self.path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**record, "spec": spec}, indent=1, default=str))
        os.replace(tmp, path)
        return path


def run_machine() -> str:
    """What a stored run was measured on (its CPU seconds are comparable only with runs on the same machine type)."""
    import platform

    import torch

    desc = machine_description()
    cpu = desc.get("Model name") or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def machines_of_runs(cache_dir, tasks) -> dict:
    """Stored runs of `tasks` per machine (runs stored before machines were recorded count as `not recorded`)."""
    counts: dict[str, int] = {}
    for task in tasks:
        for path in sorted((Path(cache_dir) / task).glob("*.json")):
            machine = json.loads(path.read_text()).get("machine", "not recorded")
            counts[machine] = counts.get(machine, 0) + 1
    return counts


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def smoke_base_model(task: str, output_dir) -> str:
    """A 20-step warm start of the test-size model, cached under `output_dir`: what the benchmarks' `--quick` smoke
    runs train, so that a smoke run never builds (or needs) the real base model."""
    from pathlib import Path

    from pbsd_trl.recipes.tiny import TEST_MODEL_OVERRIDES, get_base_model

    return get_base_model(
        task,
        cache_dir=Path(output_dir) / "base_model",
        steps=20,
        batch_size=8,
        model_overrides=TEST_MODEL_OVERRIDES,
        progress_bar=False,
    )
