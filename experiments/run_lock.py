"""One process per training run: a run's folder holds a lock file ``.<run name>.lock`` that the
process training the run holds (an advisory ``flock``) from the check of what the folder holds to
its final model. A second command on the same run (the same output folder, setting, seed and
category) stops with an error naming the process that holds it, instead of training beside it and
replacing its model when it ends. The system releases the lock when its process ends, a killed one
too; the empty file stays (removing it would let two processes lock two files of one name).
Where ``fcntl`` is missing (Windows) runs are not locked.
"""
import os
import socket
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunInProgressError(OSError):
    """Another process holds the lock of the run."""


def lock_path(run_dir, name):
    """The lock file of the run ``name`` in ``run_dir``."""
    return Path(run_dir) / f'.{name}.lock'


@contextmanager
def run_lock(run_dir, name):
    """Inside: this process holds the lock of the run ``name`` in ``run_dir`` (created if needed),
    with its process id and host written in the lock file; RunInProgressError naming the run and the
    holder when another process holds it."""
    if fcntl is None:
        yield
        return
    path = lock_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a+') as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or 'another process'
            raise RunInProgressError(f"the run {name} in {run_dir} is being trained by {holder} (it holds "
                                     f"{path}); wait for it to end, or stop it, before running it again") from None
        try:
            file.seek(0)
            file.truncate()
            file.write(f'process {os.getpid()} on {socket.gethostname()}\n')
            file.flush()
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
