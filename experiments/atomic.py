"""The one atomic file writer: results (checkpoints, tables, figures) never exist half-written.

``write_atomic(path, write)`` calls ``write(f)`` on a temporary file in ``path``'s folder (a
unique name ``.<name>.<random>.tmp`` from ``tempfile.mkstemp``; ``<name>`` cut short where the
whole would pass the file system's MAX_NAME_BYTES), flushes it to disk
(``os.fsync``), renames it to ``path`` (``os.replace``, atomic on POSIX and Windows) and, on
POSIX, flushes the folder so that the rename is on disk too. The file gets the permissions of a
file that ``open`` creates (0666 less the process's umask; ``mkstemp`` alone makes it 0600). On
any exception the temporary file is removed and ``path`` is left as it was (a write that the
system refuses, a full disk or a folder that cannot be written, is an OSError naming ``path``); a
process killed while writing leaves the temporary file, which ``remove_stale_temporaries``
deletes on the next run. ``write_atomic_set`` writes files that belong together (results.csv and
its tables) as a set: all the temporary files first, then the renames; ``signals_held`` keeps Ctrl-C
from stopping the renames midway.
"""
import contextlib
import errno
import functools
import os
import signal
import tempfile
import threading
import time
from pathlib import Path


MAX_NAME_BYTES = 255  # the longest file name (UTF-8 bytes) of common file systems
TEMPORARY_EXTRA_BYTES = len('..') + 8 + len('.tmp')  # mkstemp's random part is 8 characters


def temporary_prefix(name):
    """``.<name>.``, the prefix of ``name``'s temporary files, with ``name`` cut to the bytes that
    leave room for the random part and the suffix within MAX_NAME_BYTES."""
    room = MAX_NAME_BYTES - TEMPORARY_EXTRA_BYTES
    return '.' + name.encode()[:room].decode(errors='ignore') + '.'


@functools.cache
def new_file_mode():
    """0666 less the process's umask: the permissions of a file that ``open`` creates (read once:
    ``os.umask`` can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, write, binary=True):
    """Write ``path`` through ``write(f)`` (``f`` an open file, bytes when ``binary`` else UTF-8
    text) on a temporary file in the same folder, then rename it to ``path``; returns the Path.
    Creates the folder when needed."""
    return write_atomic_set([(path, write, binary)])[0]


def write_atomic_set(writes):
    """Write the files of ``writes`` (``(path, write, binary)`` each, as ``write_atomic`` takes them) as
    one set: every temporary file first, the renames, in the order given, only once all are written, so
    that a failed write (a full disk) leaves every path as it was; returns the Paths. A path that is a
    folder is refused, an OSError naming it, before anything is written (a rename onto it would fail
    midway). A rename that fails all the same (a file made immutable, a folder made read-only meanwhile)
    leaves the files before it in ``writes`` new and the others as they were: put the one that tells of
    the others last. Hold Ctrl-C around it (``signals_held``) to keep an interrupt out of the renames."""
    writes = [(Path(path), write, binary) for path, write, binary in writes]
    for path, _, _ in writes:
        try:
            folder = path.is_dir() and not path.is_symlink()  # a link to a folder is replaced, not entered
        except OSError as error:  # a folder above that cannot be looked into
            raise _write_error(path, error) from error
        if folder:
            raise _write_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    temporaries = []
    try:
        for path, write, binary in writes:
            temporaries.append(_temporary_file(path, write, binary))
        for tmp, (path, _, _) in zip(temporaries, writes):
            _rename(tmp, path)
    except BaseException:
        for tmp in temporaries:
            _discard(tmp)  # those renamed are gone
        raise
    for folder in dict.fromkeys(path.parent for path, _, _ in writes):
        _sync_folder(folder)
    return [path for path, _, _ in writes]


def _temporary_file(path, write, binary):
    """A new temporary file beside ``path`` (``temporary_prefix``), written through ``write`` and
    flushed to disk -> its name; on any exception it is removed and the error raised as
    ``_raise_write_failure`` makes it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix='.tmp')
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        if os.name == 'posix':
            os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else dict(encoding='utf-8'))) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as error:
        _discard(tmp)
        _raise_write_failure(path, error)
    return tmp


def _rename(tmp, path):
    """Rename the temporary file ``tmp`` to ``path``; on any exception ``tmp`` is removed (gone where
    an interrupt came just after the rename) and the error raised as ``_raise_write_failure`` makes it."""
    try:
        os.replace(tmp, path)
    except BaseException as error:
        _discard(tmp)
        _raise_write_failure(path, error)


def _discard(tmp):
    """Remove the temporary file ``tmp`` where it can be: a folder that has become read-only keeps
    it (``remove_stale_temporaries`` deletes it on a later run), and the error that stopped the write
    is the one raised."""
    with contextlib.suppress(OSError):
        Path(tmp).unlink(missing_ok=True)


def _raise_write_failure(path, error):
    """Raise ``error`` of a write of ``path`` as the caller should see it: a KeyboardInterrupt that
    it was raised while handling as that interrupt (torch.save reports a failed write, a full disk,
    or a Ctrl-C during it as a RuntimeError raised while handling it: the Ctrl-C stays a
    KeyboardInterrupt, on which the scripts end with a line), an OSError behind it as one naming
    ``path`` (``_write_error``), anything else as it is."""
    interrupt = _interrupt_in(error)
    if interrupt is not None and interrupt is not error:
        raise interrupt from None
    cause = error if isinstance(error, OSError) else error.__context__
    if isinstance(error, Exception) and isinstance(cause, OSError):
        raise _write_error(path, cause) from error
    raise error


def _sync_folder(folder):
    """Flush ``folder`` to disk (POSIX), so that the renames into it are on disk too."""
    if os.name == 'posix':
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _interrupt_in(error):
    """The KeyboardInterrupt that ``error`` is, or was raised while handling (its ``__context__``
    chain); None if none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__context__
    return None


def file_in_the_way(path):
    """The file (not a folder) that stands where a folder above ``path`` should be, e.g. ``out`` for
    ``out/model.onnx`` when ``out`` is a file; None if there is none, or if a folder above cannot be
    looked into (the caller's own error says why)."""
    try:
        return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
    except OSError:
        return None


def write_failure_reason(path, error):
    """Why writing ``path`` failed with the OSError ``error``: a file that stands where a folder
    above it should be (``file_in_the_way``), else the error's own words."""
    blocking = file_in_the_way(path)
    return f'{blocking} is a file, not a folder' if blocking else error.strerror or error


def _write_error(path, error):
    """OSError (of ``error``'s errno) naming the file that could not be written and why."""
    message = f'cannot write {path}: {write_failure_reason(path, error)}; an earlier file there is unchanged'
    return OSError(message) if error.errno is None else OSError(error.errno, message)


def temporary_target(path):
    """The name of the file that the temporary file ``path`` of ``write_atomic``
    (``.<name>.<random>.tmp``) was to become (its start, for a name cut short); None for another
    file."""
    name = Path(path).name
    if not (name.startswith('.') and name.endswith('.tmp')):
        return None
    target, dot, _ = name[1:-len('.tmp')].rpartition('.')
    return target if dot and target else None


def remove_stale_temporaries(folder, owned=None, older_than=0):
    """Delete the temporary files that ``write_atomic`` left in ``folder`` when its process was
    killed, of the files whose names ``owned(name)`` accepts (None: all) and that were last written
    more than ``older_than`` seconds ago; returns their paths. Call it only where no other process
    is writing those files (other runs may share the folder: ``owned`` keeps their files out), or
    with an ``older_than`` that no write of them lasts."""
    now = time.time()
    stale = sorted(path for path in Path(folder).glob('.*.tmp')
                   if temporary_target(path) and (owned is None or owned(temporary_target(path)))
                   and _age(path, now) > older_than)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _age(path, now):
    """Seconds since ``path`` was last written (0 where it is gone)."""
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0


def save_torch_atomic(obj, path):
    """``torch.save(obj)`` to ``path`` atomically (``write_atomic``)."""
    import torch  # here, so that writing other files needs no torch (exported models)
    return write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text):
    """``text`` to ``path`` (UTF-8) atomically (``write_atomic``)."""
    return write_atomic(path, lambda f: f.write(text), binary=False)


HELD_SIGNALS = ('SIGINT', 'SIGTERM')  # Ctrl-C, and kill's default signal


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and kill's default signal (HELD_SIGNALS) until the block ends, then deliver
    them (``signal.raise_signal``: a KeyboardInterrupt, or the process ends): files that belong
    together, each written atomically, are written as a whole set (results.csv and its tables).
    Only the main thread can hold signals; in another one the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signals = [getattr(signal, name) for name in HELD_SIGNALS if hasattr(signal, name)]
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in signals}
    try:
        yield
    finally:  # delivered also where the block failed: Ctrl-C still stops the command
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in sorted(set(received), key=lambda number: number != getattr(signal, 'SIGTERM', None)):
            signal.raise_signal(number)  # SIGTERM first: Ctrl-C's KeyboardInterrupt would end the loop
