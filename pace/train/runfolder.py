"""One run per output folder: a lock, no stale temporary files, no silent overwriting of records."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator, List

RECORDS = (
    "checkpoint.pt",
    "metrics.jsonl",
    "result.json",
    "adapter.safetensors",
    "adapter.json",
    "curves.png",
)


class RunFolderError(ValueError):
    """The output folder holds another run's records, or another process is writing it."""


def refuse_existing(out_dir: Path, resume: bool, overwrite: bool) -> List[str]:
    """The records in ``out_dir`` a new run would replace; refused unless ``resume`` (they are
    continued) or ``overwrite``."""
    if resume:
        return []
    found = [name for name in RECORDS if (out_dir / name).exists()]
    if found and not overwrite:
        raise RunFolderError(f"{out_dir} holds the records of a run ({', '.join(found)})")
    return found


@contextlib.contextmanager
def claim(out_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out_dir`` for one run: refuse a folder another process holds or one with a run's
    records unless resuming it or told to overwrite them (which deletes them first, so the folder
    never mixes two runs); remove temporary files a killed run left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"{out_dir} is in use by another pace-train run") from None
        for stale in out_dir.glob(".*.tmp"):  # pace.io.atomic_write's names: .<file>.<random>.tmp
            stale.unlink(missing_ok=True)
        for name in refuse_existing(out_dir, resume, overwrite):
            (out_dir / name).unlink()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
