"""The run directory: named once, then written as the run goes (config, classes, split, metrics)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..config import Config
from ..data.folder import ImageFolderScan
from ..io import write_csv, write_json, write_text

log = logging.getLogger("resforge")


def new_run_dir(cfg: Config) -> tuple[Path, bool]:
    """`project/name`, numbered (`name-2`, ...) when taken, unless `exist_ok`; and whether this call made it
    (under `exist_ok` it may be an existing folder, which a failed run must not remove)."""
    base = cfg.train.name or f"{cfg.model.name}-{Path(cfg.data.root).resolve().name}"
    root = Path(cfg.train.project)
    path, n = root / base, 1
    path.parent.mkdir(parents=True, exist_ok=True)  # a name may hold folders: group/run
    while True:
        try:  # mkdir claims the name, so two runs started at once cannot share it
            path.mkdir()
            return path, True
        except FileExistsError:
            if cfg.train.exist_ok and path.is_dir():
                return path, False
            n += 1
            path = root / f"{base}-{n}"


def prepare_run_dir(run_dir: Path, cfg: Config, scan: ImageFolderScan, history: list[dict[str, float]]) -> None:
    """Clear what a kill left half-written, then write what is known before the first epoch."""
    for stale in run_dir.rglob(".*.tmp"):  # io.atomic_path names its temp files so
        with contextlib.suppress(OSError):
            stale.unlink()
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / "classes.json", scan.classes)
    scan.write_split_csv(run_dir / "split.csv")
    if scan.skipped:
        scan.write_skipped_csv(run_dir / "skipped.csv")
        log.warning("skipped %d unreadable or non-image file(s); see %s", len(scan.skipped), run_dir / "skipped.csv")
    write_metrics(run_dir, history)


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """`metrics.csv`: a row per epoch so far (none: a restart, whose rows of an unsaved epoch go)."""
    path = run_dir / "metrics.csv"
    if not history:
        path.unlink(missing_ok=True)
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    write_csv(path, keys, ([row.get(k, "") for k in keys] for row in history))
