"""Where results are written: checked before any work, held by one run, replaced atomically.

A run that trains for an hour must not find out afterwards that its output directory is a file,
read-only, full, or in use by another run. :func:`check_output_dir` answers all of that before
the model loads; :class:`RunLock` keeps a second run out of a directory a run is writing;
:func:`write_atomically` makes every file appear whole or not at all (a temporary name in the
same directory, fsync, rename), so an interrupted save never leaves half a file behind a name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .analysis.memory import human_bytes
from .errors import ConfigError

#: files whose presence marks a directory as holding an earlier run's results
RUN_MARKERS = ("summary.json", "delta", "checkpoints")
LOCK_FILE = ".deltatune.lock"


def refuse_file(path: Path, flag: str) -> None:
    """An output that must be a directory (or not exist yet) is not a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file; choose a directory")


def check_output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False,
                     needed_bytes: int = 0) -> Path:
    """``path`` made ready for a run's output: created if missing, and refused (ConfigError)
    when it is a file, holds an earlier run (unless ``resume`` continues it or ``overwrite``
    replaces it), is not writable, or its file system has less than ``needed_bytes`` free."""
    directory = Path(path)
    refuse_file(directory, "output directory")
    earlier = [m for m in RUN_MARKERS if (directory / m).exists()]
    if earlier and not (resume or overwrite):
        raise ConfigError(
            f"output directory {str(directory)!r} holds an earlier run ({', '.join(earlier)}); "
            "continue it with --resume, replace it with --overwrite, or choose another directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output directory {str(directory)!r} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise ConfigError(
            f"output directory {str(directory)!r} has {human_bytes(free)} free, and this run writes about "
            f"{human_bytes(needed_bytes)} (delta and checkpoints); free some space or choose another directory"
        )
    return directory


def unused_directory(preferred: Path) -> Path:
    """``preferred``, or ``preferred-2``, ``-3``... : the first that holds no earlier run."""
    candidate, number = preferred, 1
    while any((candidate / m).exists() for m in RUN_MARKERS):
        number += 1
        candidate = preferred.with_name(f"{preferred.name}-{number}")
    return candidate


def clear_run(directory: Path) -> None:
    """Remove an earlier run's results from ``directory`` (``--overwrite``); other files stay."""
    for marker in RUN_MARKERS:
        target = directory / marker
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class RunLock:
    """An exclusive lock on a directory for one run (``flock``, released when the process
    ends however it ends). A second run into the same directory fails at once, naming the first."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.handle = None

    def __enter__(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"output directory {str(self.path.parent)!r} is in use by another deltatune run ({holder}); "
                "wait for it to finish or choose another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the lock; the file stays, empty of meaning
            self.handle = None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary_path)`` then rename it to ``path``: readers see the old file or the
    whole new one, never a part. A full disk becomes a clear error naming the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    except OSError as exc:
        temporary_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"no space left on the device holding {str(path.parent)!r} while writing {path.name}") from None
        raise
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def check_fresh_directory(path: Path, flag: str, *, overwrite: bool) -> None:
    """An output directory a command fills as a whole (a merged model, an exported delta) is
    new or empty, unless ``overwrite`` says its files may be replaced."""
    refuse_file(path, flag)
    if path.is_dir() and not overwrite:
        held = sorted(p.name for p in path.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise ConfigError(f"{flag} {str(path)!r} already holds files ({shown}); choose a new or empty "
                              "directory, or pass --overwrite to replace it")


def write_directory_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary_directory)`` then put it in ``path``'s place: ``path`` holds the old
    contents or the whole new ones, never a mixture, and an earlier ``path`` goes only once
    the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(temporary)
        for written in temporary.rglob("*"):
            if written.is_file():
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
        earlier = None
        if path.exists():
            earlier = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.earlier."))
            os.replace(path, earlier / path.name)
        os.replace(temporary, path)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"no space left on the device holding {str(path.parent)!r} while writing {path.name}") from None
        raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the rename stands
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
