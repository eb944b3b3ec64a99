"""A pool's visit counters in checkpoints: a resumed run takes the samples an uninterrupted run would have taken."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter


logger = logging.getLogger(__name__)

POOL_STATE_FILE = "pbsd_pool_state.json"


def save_pool_state(pool, folder: str, accelerator, should_save: bool) -> None:
    """Write every process's visit counters into the checkpoint `folder`; every process must call it (a gather)."""
    visits = [dict(pool.visits)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        visits = gather_object(visits)
    if not should_save:
        return
    payload = {"pool": pool.path, "num_processes": accelerator.num_processes, "visits": visits}
    tmp = os.path.join(folder, f".{POOL_STATE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, os.path.join(folder, POOL_STATE_FILE))


def load_pool_state(pool, checkpoint: str, accelerator) -> None:
    """Restore this process's visit counters from `checkpoint` (see [`save_pool_state`])."""
    from ..checkpoint import CheckpointError

    path = os.path.join(checkpoint, POOL_STATE_FILE)
    if not os.path.exists(path):
        logger.warning(
            "%s has no %s (it was written without a teacher pool, or by an older pbsd-trl): the pool's visit counters "
            "start from 0, so samples the run already used are taken again.",
            checkpoint,
            POOL_STATE_FILE,
        )
        return
    try:
        with open(path) as f:
            state = json.load(f)
        visits = [Counter({str(k): int(v) for k, v in rank.items()}) for rank in state["visits"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupt or truncated. Resume from an "
            "earlier checkpoint."
        ) from err
    if len(visits) == accelerator.num_processes:
        pool.visits = visits[accelerator.process_index]
        return
    # Another world size puts a prompt group on another process: each process counts every visit of the run
    logger.warning(
        "%s was written by %d processes, this run has %d: each process continues from the visits of all of them.",
        path,
        len(visits),
        accelerator.num_processes,
    )
    pool.visits = sum(visits, Counter())
