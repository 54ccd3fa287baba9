"""An out_dir belongs to one run (docs/conventions.md#runs).

* A lock file (``out_dir/.dvae.lock``, an exclusive ``flock``) keeps a second process out
  while a run is alive; the kernel drops the lock when the process dies, even by ``kill -9``,
  so a stale lock never blocks a resume.
* A new run refuses a folder holding a checkpoint unless told to resume or overwrite.
* The outputs a run appends to (``metrics.jsonl``, TensorBoard) are cut back to the step the
  run starts from, so no step appears twice and nothing of an abandoned run is mixed in.
* Temporary files of saves killed before their rename are removed at start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from . import checkpoint as ckpt

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
GRID = "reconstructions.png"
LOCK = ".dvae.lock"


class RunDir:
    """The run's folder, locked for the life of this object (until :meth:`release`)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out_dir {str(self.path)!r} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"out_dir {str(self.path)!r} is not writable: "
                             f"{err.strerror or err}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            who = ("another Trainer of this process (close() it first)"
                   if holder == str(os.getpid()) else f"another dvae process (pid {holder})")
            raise ValueError(f"out_dir {str(self.path)!r} is in use by {who}; wait for it or "
                             "choose another out_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        ckpt.remove_orphans(self.path, CHECKPOINT)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder this run's: refuse a checkpoint of another run unless ``resume``
        (continue it) or ``overwrite`` (delete its outputs)."""
        if overwrite:
            for name in (CHECKPOINT, METRICS, GRID):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / TENSORBOARD, ignore_errors=True)
        elif self.checkpoint.exists() and not resume:
            raise ValueError(f"out_dir {str(self.path)!r} holds a checkpoint of another run; "
                             "continue it with --resume, replace it with --overwrite, or "
                             "choose another out_dir")

    def cut_back(self, step: int) -> None:
        """Keep only the metrics of steps ``<= step`` (a run restarting at ``step``); a line
        cut short by a kill is dropped. TensorBoard is cut by the writer's ``purge_step``;
        at step 0 its folder is removed."""
        if step == 0:
            shutil.rmtree(self.path / TENSORBOARD, ignore_errors=True)
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) \
                    and record["step"] <= step:
                kept.append(line)
        tmp = self.metrics.with_name(METRICS + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics)

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()
