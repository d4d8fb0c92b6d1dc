"""Crash-safe file writes: a killed process leaves either the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a hidden temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # concurrent writers never share one
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted (Ctrl-C) or failed (disk full): no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically (see :func:`atomic_write_bytes`)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool = True):
    """Hold an exclusive advisory lock on the file ``path`` (created if needed) for the block:
    another process (or thread) asking for it waits until the block ends, or with ``wait=False``
    gets :class:`BlockingIOError` at once. Yields the open lock file. POSIX ``flock``; where there
    is none (Windows), the block runs unlocked and gets None."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield None
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, advice: str):
    """Claim ``folder`` for one writer (``what``: "training run", "shop build") for the block, or
    raise :class:`~fashsim.errors.FolderInUseError` at once when another process holds it, naming
    that process and ``advice`` (what to do instead). The claim is an :func:`exclusive_lock` on
    ``folder/.writer.lock``, which records the holder's process id; it ends with the block or
    the process, so a killed writer leaves nothing to clean up."""
    from .errors import FolderInUseError

    path = Path(folder) / ".writer.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as claim:
        try:
            handle = claim.enter_context(exclusive_lock(path, wait=False))
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            raise FolderInUseError(f"{path.parent} is in use by another {what} ({holder}); {advice}") from None
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}".encode())
            handle.flush()
        yield
