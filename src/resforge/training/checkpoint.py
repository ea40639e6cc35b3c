"""The resume checkpoint (`last.ckpt`): everything a run needs to continue exactly.

Written atomically (temp file + rename): a kill during a save leaves the previous checkpoint
whole. It holds only tensors, numbers, strings and containers of them, so it loads with
`torch.load(weights_only=True)`; RNG states are stored in that form too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import atomic_path


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RunLock:
    """An exclusive lock on a run directory while a process trains in it (two resumes would interleave)."""

    def __init__(self, run_dir: str | os.PathLike):
        import fcntl

        self.path = Path(run_dir) / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise CheckpointError(f"{run_dir} is being trained by another process (pid {holder}); wait for it "
                                  "to finish, or stop it") from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the lock; the file stays, empty of meaning


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file fails in many ways (torch's texts suggest unpickling: never do)
        raise CheckpointError(f"{path} is corrupt or not a resforge checkpoint; the run cannot resume from it "
                              "(its best.safetensors, if any, is still usable)") from None
    if not isinstance(state, dict) or not {"model", "config", "epoch", "schedule"} <= state.keys():
        raise CheckpointError(f"{path} is not a resforge resume checkpoint")
    return state
