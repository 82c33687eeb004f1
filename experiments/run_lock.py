"""One process per training run: a run's folder holds a lock file ``.<run name>.lock`` that the
process training the run holds (an advisory ``flock``) from the check of what the folder holds to
its final model (for ``--recipe search``, from before its candidates). A second command on the same
run (the same output folder, setting, seed and category) stops with an error naming the process
that holds it, instead of training beside it and replacing its model when it ends. The system
releases the lock when its process ends, a killed one too (its forked DataLoader workers close their
copies of the lock file at once: ``_close_in_forked_child``); the empty file stays (removing it would
let two processes lock two files of one name). Where ``fcntl`` is missing (Windows), the folder
cannot be written (nothing can be trained into it) or its file system has no locks, runs are not
locked.

The evaluations that write into one folder take turns at its results instead (``results_lock``): each
reads the folder's earlier results, merges its own and writes them while it holds the folder's
``.results.csv.lock``, so that two of them ending at once cannot each write a table without the
other's results.
"""
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_held = {}  # absolute lock file path -> its open file, of the locks this process holds
CHECK_WAIT = 1.0  # seconds that a lock naming no holder is tried again (see _try_lock)


def _close_in_forked_child():
    """In a process forked from one that holds locks (a DataLoader worker): close its copies of the
    lock files, never unlocking them (the lock belongs to the file they share with the parent), so
    that a lock is released when its holder ends, a killed one too, not when its last worker does."""
    for file in _held.values():
        file.close()
    _held.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_close_in_forked_child)


class RunInProgressError(OSError):
    """Another process holds the lock of the run."""


def lock_path(run_dir, name):
    """The lock file of the run ``name`` in ``run_dir``."""
    return Path(run_dir) / f'.{name}.lock'


def _in_progress(run_dir, name, file):
    """RunInProgressError naming the holder that the lock ``file`` (held by another process) names."""
    file.seek(0)
    holder = file.read().strip() or 'another process'
    return RunInProgressError(f"the run {name} in {run_dir} is being trained by {holder} (it holds "
                              f"{lock_path(run_dir, name)}); wait for it to end, or stop it, before running "
                              f"it again")


def _try_lock(file):
    """Take the exclusive lock of the open ``file`` without waiting for a holder that trains; True if
    taken, False if another process holds it. A lock held by a process that names no holder in the
    file is one that checks (``refuse_run_in_progress``) for an instant, or one that has just taken
    it: tried again for up to CHECK_WAIT seconds."""
    deadline = time.monotonic() + CHECK_WAIT
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            file.seek(0)
            if file.read().strip() or time.monotonic() > deadline:
                return False
            time.sleep(CHECK_WAIT / 20)


def refuse_run_in_progress(run_dir, name):
    """RunInProgressError when another process holds the lock of the run ``name`` in ``run_dir``
    (nothing is created: a check before the run, e.g. before refusing its files as a finished or
    interrupted run's)."""
    path = lock_path(run_dir, name)
    if fcntl is None or os.path.abspath(path) in _held or not path.is_file():
        return
    try:
        file = open(path)
    except OSError:
        return
    with file:
        try:
            locked = _try_lock(file)
        except OSError:  # a file system without locks
            return
        if not locked:
            raise _in_progress(run_dir, name, file)
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _open_lock_file(path):
    """The lock file ``path`` open for appending, created with its folder if needed; None where the
    folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, 'a+')
    except OSError:
        return None


def _acquire(run_dir, name):
    """The open lock file of the run, locked by this process, with its process id and host written
    in it; None where runs are not locked (see the module docstring). RunInProgressError when
    another process holds it."""
    path = lock_path(run_dir, name)
    file = _open_lock_file(path)
    if file is None:  # a folder that cannot be written: nothing can be trained into it
        return None
    try:
        locked = _try_lock(file)
    except OSError as error:
        file.close()
        warnings.warn(f"cannot lock {path} ({error.strerror or error}): a second command on the run {name} "
                      f"would not be stopped")
        return None
    if not locked:
        error = _in_progress(run_dir, name, file)
        file.close()
        raise error
    file.truncate(0)
    file.write(f'process {os.getpid()} on {socket.gethostname()}\n')
    file.flush()
    return file


@contextmanager
def run_lock(run_dir, name):
    """Inside: this process holds the lock of the run ``name`` in ``run_dir`` (``_acquire``; the
    lock file and its folder are created if needed). Reentrant: inside a lock that the process
    already holds, it does nothing."""
    key = os.path.abspath(lock_path(run_dir, name))
    file = None if fcntl is None or key in _held else _acquire(run_dir, name)
    if file is None:
        yield
        return
    with _holding(key, file, release=lambda file: file.truncate(0)):  # no holder named once it is released
        yield


@contextmanager
def _holding(key, file, release=None):
    """Inside: the locked open ``file`` is this process's lock ``key`` (in ``_held``); then
    ``release(file)`` (None: nothing), the lock released and the file closed."""
    _held[key] = file
    try:
        yield
    finally:
        del _held[key]
        if release is not None:
            release(file)
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        file.close()


RESULTS_LOCK = '.results.csv.lock'


@contextmanager
def results_lock(out_dir):
    """Inside: this process holds the lock of the results in ``out_dir`` (``RESULTS_LOCK``, created with
    its folder if needed; ``_wait_for_lock``). Reentrant, as ``run_lock``."""
    path = Path(out_dir) / RESULTS_LOCK
    key = os.path.abspath(path)
    file = None if fcntl is None or key in _held else _wait_for_lock(path)
    if file is None:
        yield
        return
    with _holding(key, file):
        yield


def _wait_for_lock(path):
    """The open lock file ``path``, locked by this process once another process holding it has released
    it (a line says that it waits); None where its folder cannot be written or its file system has no
    locks (not locked)."""
    file = _open_lock_file(path)
    if file is None:
        return None
    try:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'waiting for another evaluation that writes its results into {path.parent}', flush=True)
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    except OSError:
        file.close()
        return None
    return file
