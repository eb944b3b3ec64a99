"""Checks a checkpoint before resuming from it: every file readable, and written by a run configured like this one.

Transformers and torch report a truncated or corrupt file with the reader's error (`OSError: [Errno 22] Invalid
argument`, a safetensors header error) and no path, and only after part of the state is loaded; a checkpoint of a
differently configured run (another teacher kind, PEFT against a full model) fails later still, or resumes with a
silently reset teacher. These checks read only headers, central directories and small JSON files, so they cost
milliseconds whatever the checkpoint's size.
"""

import json
import os
import struct
import zipfile

from .teacher.weights import TEACHER_STATE_FILE


CHECKPOINT_INFO_FILE = "pbsd_checkpoint.json"

_PEFT_FILES = ("adapter_config.json",)
_FULL_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, or the checkpoint does not match the current configuration."""


def checkpoint_info(teacher_model_kind: str, is_peft: bool) -> dict:
    """What a PBSD checkpoint records about the run that wrote it, to be compared on resume."""
    return {"teacher_model_kind": teacher_model_kind, "peft": is_peft}


def write_checkpoint_info(folder: str, info: dict) -> None:
    with open(os.path.join(folder, CHECKPOINT_INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)


def check_checkpoint(folder: str, info: dict) -> None:
    """Raise an error naming the file and what to do if `folder` cannot be resumed by a run described by `info`."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            _check_file(os.path.join(root, name))
    _check_consistency(folder, info)


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is corrupt or truncated ({why}). Resume from an earlier checkpoint, or copy the file again if it was "
        "transferred."
    )


def _check_file(path: str) -> None:
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        _check_safetensors(path)
    elif name.endswith(".json"):
        try:
            with open(path) as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"not valid JSON: {err}") from None
    elif name.endswith((".pt", ".pth", ".bin")):
        with open(path, "rb") as f:
            magic = f.read(4)
        # torch.save writes a zip archive; a truncated one has lost its central directory (at the end)
        if magic == b"PK\x03\x04":
            try:
                zipfile.ZipFile(path).close()
            except zipfile.BadZipFile as err:
                raise _corrupt(path, f"incomplete torch archive: {err}") from None
        elif os.path.getsize(path) == 0:
            raise _corrupt(path, "empty file")


def _check_safetensors(path: str) -> None:
    """Header length, header JSON and the data size its offsets promise, as the safetensors format defines them."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise _corrupt(path, f"header of {header_len} bytes announced, file is {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"unreadable header: {err}") from None
    ends = [t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise _corrupt(path, f"the header's tensors need {expected} bytes, the file has {size}")


def _check_consistency(folder: str, info: dict) -> None:
    info_path = os.path.join(folder, CHECKPOINT_INFO_FILE)
    has_state = os.path.exists(os.path.join(folder, TEACHER_STATE_FILE))
    if os.path.exists(info_path):
        with open(info_path) as f:
            saved = json.load(f)
        source = info_path
    else:  # a checkpoint of an older PBSD version, or not of PBSD: infer what the files say
        saved = {"teacher_model_kind": "ema" if has_state else None}
        if any(os.path.exists(os.path.join(folder, n)) for n in _PEFT_FILES):
            saved["peft"] = True
        elif any(os.path.exists(os.path.join(folder, n)) for n in _FULL_MODEL_FILES):
            saved["peft"] = False
        source = folder

    kind = info["teacher_model_kind"]
    if kind == "ema" and not has_state:
        raise FileNotFoundError(
            f"{folder} has no {TEACHER_STATE_FILE}: it was not written by a PBSD run with an EMA teacher, so the "
            "teacher cannot be restored. Resume from a PBSD checkpoint of an `teacher_model_kind='ema'` run, or start "
            "a new run."
        )
    saved_kind = saved.get("teacher_model_kind")
    if saved_kind is not None and saved_kind != kind:
        raise CheckpointError(
            f"{source} records teacher_model_kind={saved_kind!r}, this run has {kind!r}: resuming would "
            + ("drop the checkpoint's EMA teacher" if saved_kind == "ema" else "start the teacher from other weights")
            + f". Set `teacher_model_kind={saved_kind!r}`, or start a new run from the checkpoint's model weights "
            "(pass the folder as the model) instead of resuming."
        )
    saved_peft = saved.get("peft")
    if saved_peft is not None and saved_peft != info["peft"]:
        have = "a PEFT adapter (adapter_config.json)" if saved_peft else "full model weights"
        want = "a PEFT model" if info["peft"] else "a full model"
        raise CheckpointError(
            f"{source}: the checkpoint holds {have}, but this run trains {want}. Resume with the same "
            "`peft_config` (or none) as the run that wrote it."
        )
