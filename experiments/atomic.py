"""The one atomic file writer: results (checkpoints, tables, figures) never exist half-written.

``write_atomic(path, write)`` calls ``write(f)`` on a temporary file in ``path``'s folder (a
unique name from ``tempfile.mkstemp``), flushes it to disk (``os.fsync``) and renames it to
``path`` (``os.replace``, atomic on POSIX and Windows). On any exception the temporary file is
removed and ``path`` is left as it was.
"""
import os
import tempfile
from pathlib import Path


def write_atomic(path, write, binary=True):
    """Write ``path`` through ``write(f)`` (``f`` an open file, bytes when ``binary`` else UTF-8
    text) on a temporary file in the same folder, then rename it to ``path``; returns the Path.
    Creates the folder when needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else dict(encoding='utf-8'))) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_torch_atomic(obj, path):
    """``torch.save(obj)`` to ``path`` atomically (``write_atomic``)."""
    import torch  # here, so that writing other files needs no torch (exported models)
    return write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text):
    """``text`` to ``path`` (UTF-8) atomically (``write_atomic``)."""
    return write_atomic(path, lambda f: f.write(text), binary=False)
