"""Checkpoints that are never half-written, never silently different and never run code.

File format: one header line ``dvae-checkpoint 1 sha256=<64 hex digits> bytes=<n>``, then the
``torch.save`` payload (n bytes). Writing serialises to memory, then writes a temporary file in
the same folder, fsyncs it and renames it over the old one (``os.replace`` is atomic on POSIX),
so a crash or ``kill -9`` at any moment leaves either the old checkpoint or the new one.
Loading checks the header, the length and the checksum before unpickling, and unpickles with
``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings, lists and
dicts only, so a file crafted to run code is refused instead of executed.

Every failure a user can meet (missing, truncated, damaged, foreign file; disk full) is a
:class:`CheckpointError` (a ``ValueError``) whose message names the file and the problem.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

MAGIC = b"dvae-checkpoint"
VERSION = 1
TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says which file and why."""


def _header(digest: str, size: int) -> bytes:
    return MAGIC + f" {VERSION} sha256={digest} bytes={size}\n".encode()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically, with a
    checksum. Raises :class:`CheckpointError` when the folder is not writable or the disk is
    full; the previous checkpoint at ``path`` is then untouched."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    header = _header(hashlib.sha256(payload).hexdigest(), len(payload))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {err.strerror or err}"
                              ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write checkpoint {str(path)!r}: "
                                  f"{err.strerror or err}") from None
        raise


def remove_orphans(folder: str | os.PathLike, name: str = "checkpoint.pt") -> list[Path]:
    """Delete temporary files left by saves that were killed before their rename; returns
    them. Call it only while holding the folder's run lock (no save can be in flight)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(f"{name}.*{TMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def digest(path: str | os.PathLike) -> str:
    """The sha256 of a checkpoint's payload, read from its header (the file is not loaded):
    what identifies the weights a prior was trained on."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            head = f.readline(256)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {name!r}: {err.strerror or err}"
                              ) from None
    fields = head.rstrip(b"\n").split(b" ")
    if len(fields) != 4 or fields[0] != MAGIC or not fields[2].startswith(b"sha256="):
        raise CheckpointError(f"{name!r} is not a dvae checkpoint (no dvae-checkpoint header)")
    return fields[2].removeprefix(b"sha256=").decode()


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_atomic`, verifying its checksum.

    Raises :class:`CheckpointError` naming the file when it is missing, not a dvae checkpoint,
    truncated, damaged (checksum mismatch) or holds anything but plain data.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {name!r} does not exist" if not path.exists()
                              else f"checkpoint {name!r} is not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {name!r}: {err.strerror or err}"
                              ) from None
    end = data.find(b"\n", 0, 256)
    fields = data[:end].split(b" ") if end > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"{name!r} is not a dvae checkpoint (no dvae-checkpoint header; "
                              "a file written by torch.save or an older dvae is not accepted)")
    try:
        version = int(fields[1])
        digest = fields[2].removeprefix(b"sha256=").decode()
        size = int(fields[3].removeprefix(b"bytes="))
    except ValueError:
        raise CheckpointError(f"checkpoint {name!r} has a damaged header") from None
    if version != VERSION:
        raise CheckpointError(f"checkpoint {name!r} has format version {version}; this dvae "
                              f"reads version {VERSION}")
    payload = memoryview(data)[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {name!r} is truncated or damaged: {len(payload)} "
                              f"bytes of payload, the header says {size}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {name!r} is damaged: its checksum does not match "
                              "its contents")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {name!r} holds something other than plain data "
                              f"and was not loaded: {first}") from None
    if not isinstance(state, dict) or not {"config", "model", "step"} <= state.keys():
        raise CheckpointError(f"{name!r} is not a dvae training checkpoint (expected a "
                              "mapping with config, model and step)")
    return state
