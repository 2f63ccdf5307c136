"""Files that survive a crash (every write goes to a temporary file, then is renamed), writes off
the critical path, and whole modules as bytes for other processes."""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from autoprune.errors import AutopruneError


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# read once, at import: setting it for a moment from a writer thread would race other threads' files
_UMASK = _read_umask()


def check_writable_under(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file or directory that cannot be written: the directory it
    is (an existing directory) or the nearest existing one above it must be a directory this
    process can write in."""
    path = Path(path)
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AutopruneError(f"cannot create {path}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise AutopruneError(f"cannot write under {ancestor} ({exc.strerror}); choose another place for "
                             f"{path.name}") from None


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse an output directory that is a file or cannot be created (before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AutopruneError(f"{path} exists and is not a directory; choose another output directory")
    check_writable_under(path)


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse an output file that names a directory or cannot be written (before any work)."""
    path = Path(path)
    if path.is_dir():
        raise AutopruneError(f"{path} is a directory; give the output a file name")
    check_writable_under(path)


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open would (0666 less the umask)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` so that readers see either the old file or the whole new one."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, keys in insertion order) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def model_to_bytes(model: torch.nn.Module) -> bytes:
    """A whole module as bytes (what travels to and from worker processes)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def model_from_bytes(data: bytes) -> torch.nn.Module:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class BackgroundWriter:
    """Runs write jobs on one worker thread, in the order given, so a search does not wait
    for the disk (each atomic write ends in an fsync).

    At most one job is in flight: `submit` first waits for the previous job, so the files
    on disk are never more than one job behind. A job's exception is raised again by the
    next `submit` or by `close`. `close` (or leaving the `with` block, on an exception
    too) waits for the job in flight, so an interrupted search keeps what it submitted.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoprune-writer")
        self._pending = None

    def submit(self, job, *args) -> None:
        """Run `job(*args)` after the jobs before it; the arguments must not change afterwards."""
        self.wait()
        self._pending = self._executor.submit(job, *args)

    def wait(self) -> None:
        """Block until the job in flight is done; raise its exception, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WriterLock:
    """An exclusive lock on `path` (a lock file) for as long as this process holds the object.

    The operating system drops it when the process ends, however it ends (a `kill -9`
    leaves no stale lock, only the file, which the next writer takes over). A second
    writer gets one clear error naming the holder's PID. Released, the lock file is
    removed.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = None
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise AutopruneError(f"{what} is being written by another autoprune process (PID {holder}); wait "
                                     "for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:  # the holder removed the file as we opened it: lock the file that is there now
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()  # while still held, so that nobody locks a file on its way out
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
