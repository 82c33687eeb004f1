"""A dataset folder written whole: built in a hidden folder of its own next to its target, then
renamed into place, so that an interrupted or concurrent run never leaves a partial dataset under
the target's name."""
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


def build_folder(parent, name):
    """A new, empty hidden folder ``parent/.<name>.*`` (``parent`` made if needed) with the
    permissions a new folder gets (``tempfile.mkdtemp`` makes it private to the user, and the rename
    would keep that); NotADirectoryError naming ``parent`` when it is a file."""
    if Path(parent).exists() and not Path(parent).is_dir():
        raise NotADirectoryError(f"{parent} is a file, not a folder to write the dataset into")
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f'.{name}.', dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    special = folder.stat().st_mode & 0o7000  # a set-group-ID bit inherited from parent stays
    os.chmod(folder, (0o777 & ~umask) | special)
    return folder


@contextmanager
def folder_being_built(parent, name):
    """A new hidden folder (``build_folder``) for the block to build the dataset in and rename into
    place; removed when the block ends, also by an error, Ctrl-C, SIGTERM or SIGHUP
    (``terminate_as_exit``), unless it was renamed."""
    with terminate_as_exit():
        folder = build_folder(parent, name)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def terminate_as_exit():
    """Within the block, kill's default signal (SIGTERM, e.g. a job scheduler's time limit) and the
    hangup of a closed terminal (SIGHUP) raise SystemExit(128 + signal number) instead of ending the
    process at once, so that the block's ``finally`` clauses remove the hidden folder it was building
    (Ctrl-C's KeyboardInterrupt does so already; a SIGKILL cannot be caught). Only for a signal that
    has its default action: a handler of the caller's (or its ignoring the signal, as ``nohup`` does)
    is kept, and so is the block in a thread other than the main one, which cannot handle signals."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    numbers = [getattr(signal, name) for name in ('SIGTERM', 'SIGHUP') if on_main_thread and hasattr(signal, name)]
    numbers = [number for number in numbers if signal.getsignal(number) is signal.SIG_DFL]

    def exit_now(number, frame):
        raise SystemExit(128 + number)
    previous = {number: signal.signal(number, exit_now) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
