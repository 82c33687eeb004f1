"""A dataset folder written whole: built in a hidden folder of its own next to its target, then
renamed into place, so that an interrupted or concurrent run never leaves a partial dataset under
the target's name."""
import os
import tempfile
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
