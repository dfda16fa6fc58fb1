"""Atomic outputs: the one way bertedge writes a folder or file a user asked for.

Every output (export's folder, package's bundle or archive, predict's and Ray's `--out`) is
built under a hidden `.NAME.partial-PID-*` path beside its destination and renamed into place
only when complete, so a failure, a full disk, SIGTERM or Ctrl-C leaves either the old output or
the new one, never half of one. While it is built, an exclusive lock on `.NAME.lock` keeps a
second writer out (it fails in one line instead of racing), and partials a killed run left
behind (SIGKILL cannot be caught) are removed by the next writer of the same destination.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bertedge.errors import BertedgeError, find_in_chain

# errno values that mean "this place cannot take the output", not a bug
WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class Terminated(SystemExit):
    """SIGTERM turned into an exception, so cleanup runs; exits with 128 + 15 like the default."""


@contextlib.contextmanager
def terminate_cleanly(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """While inside, each of `signals` (SIGTERM; with SIGINT, Ctrl-C too) raises `Terminated`
    (exit status 128 + the signal: 143, 130) instead of killing the process or raising a
    KeyboardInterrupt that a library in between may swallow.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(128 + signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    except Exception as e:  # a signal inside an extension's import or call comes back wrapped
        stop = find_in_chain(e, Terminated)  # e.g. "ImportError: initialization failed" from onnxruntime
        if stop is None:
            raise
        raise stop from None
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


def signal_name(code: object) -> str:
    """How a stop's exit status reads in its one line.

    >>> signal_name(143), signal_name(130)
    ('SIGTERM', 'an interrupt')
    """
    return "SIGTERM" if code == 128 + signal.SIGTERM else "an interrupt"


def write_error(e: OSError, dest: Path, what: str = "the output") -> BertedgeError:
    """A one-line error for an OSError met while writing `dest`.

    >>> str(write_error(OSError(28, "No space left on device"), Path("out/b")))
    "cannot write the output 'out/b' (No space left on device) -- free some space or choose another --out"
    """
    fix = "free some space or choose another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
        else "choose an --out in a place you can write to"
    return BertedgeError(f"cannot write {what} '{dest}' ({e.strerror or type(e).__name__})", fix)


def partial_prefix(dest: Path) -> str:
    """The name prefix of a destination's hidden partial outputs.

    >>> partial_prefix(Path("runs/bundle"))
    '.bundle.partial-'
    """
    return f".{dest.name}.partial-"


def remove_stale_partials(dest: Path) -> None:
    """Remove partial outputs of `dest` left by runs that are gone (call with the lock held)."""
    for stale in dest.parent.glob(partial_prefix(dest) + "*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(dest: Path, what: str = "the output") -> Iterator[None]:
    """Hold an exclusive lock on `dest` (a `.NAME.lock` file beside it); fail at once if held."""
    path = dest.parent / f".{dest.name}.lock"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(e, dest, what) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BertedgeError(f"another bertedge process is writing {what} '{dest}'",
                                "wait for it to finish, or choose another --out") from None
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()


def replace(built: Path, dest: Path) -> None:
    """Move `built` onto `dest`, replacing a folder or file already there."""
    if dest.is_dir() and not dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=partial_prefix(dest) + "old-", dir=dest.parent))
        dest.rename(old / dest.name)
        os.replace(built, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, dest)


@contextlib.contextmanager
def atomic_output(dest: Path, *, folder: bool, what: str = "the output", announce: bool = True) -> Iterator[Path]:
    """Yield a hidden path beside `dest` to build into; on success it replaces `dest`.

    Args:
        dest: the output the user named (a folder when `folder`, else a file).
        folder: build a folder (the yielded path exists and is empty) or a file (it does not exist).
        what: how errors name the output ("the bundle", "the predictions", ...).
        announce: on SIGTERM, say on stderr in one line that `dest` was not written (off for a
            caller that says so itself, after its own cleanup).

    Raises:
        BertedgeError: another process holds the lock, or the place cannot be written (full disk,
            read-only, permissions); nothing is left behind either way.
        Terminated: SIGTERM arrived (the partial output is removed first).
    """
    dest = Path(dest)
    try:
        with lock(dest, what), terminate_cleanly():
            remove_stale_partials(dest)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(dest)}{os.getpid()}-", dir=dest.parent))
            except OSError as e:
                raise write_error(e, dest, what) from None
            target = tmp if folder else tmp / dest.name
            try:
                yield target
                replace(target, dest)
            except OSError as e:
                if e.errno in WRITE_ERRORS:
                    raise write_error(e, dest, what) from None
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Terminated as e:  # anywhere while the handler was set: one line, then the exit status
        if announce:
            sys.stderr.write(f"stopped by {signal_name(e.code)}: {what} '{dest}' not written\n")
            sys.stderr.flush()
        raise
