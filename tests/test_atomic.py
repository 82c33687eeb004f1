import os
import time

import pytest
import torch

from experiments import atomic
from experiments.atomic import (save_torch_atomic, temporary_prefix, temporary_target, write_atomic,
                               write_atomic_set, write_text_atomic)


def test_write_atomic_writes_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / 'sub' / 'table.csv'
    assert write_text_atomic(path, 'a,b\n1,2\n') == path
    assert path.read_text(encoding='utf-8') == 'a,b\n1,2\n'
    save_torch_atomic({'epoch': 3}, tmp_path / 'sub' / 'model.pt')
    assert torch.load(tmp_path / 'sub' / 'model.pt', weights_only=True) == {'epoch': 3}
    assert sorted(os.listdir(path.parent)) == ['model.pt', 'table.csv']


@pytest.mark.skipif(os.name != 'posix', reason='POSIX permissions')
def test_written_files_get_the_permissions_of_files_that_open_creates(tmp_path):
    (tmp_path / 'plain.txt').write_text('x')  # 0666 less the umask
    write_text_atomic(tmp_path / 'atomic.txt', 'x')  # mkstemp alone: 0600
    assert (tmp_path / 'atomic.txt').stat().st_mode == (tmp_path / 'plain.txt').stat().st_mode


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    save_torch_atomic({'epoch': 1}, path)

    def partial_then_fail(f):
        f.write(b'partial')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        write_atomic(path, partial_then_fail)
    assert os.listdir(tmp_path) == ['checkpoint.pt']
    assert torch.load(path, weights_only=True) == {'epoch': 1}


def test_an_interrupted_write_leaves_no_file_at_all(tmp_path, monkeypatch):
    def interrupted(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)  # save_torch_atomic imports torch when called
    with pytest.raises(KeyboardInterrupt):
        save_torch_atomic({'epoch': 2}, tmp_path / 'new.pt')
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_during_torch_save_or_just_after_the_rename_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """torch.save reports a Ctrl-C during its write as a RuntimeError raised while handling it; one
    that comes just after the rename finds no temporary file to remove: both end as the Ctrl-C."""
    path = tmp_path / 'last.pt'
    save_torch_atomic({'epoch': 1}, path)

    def interrupted_inside_torch(obj, f):
        f.write(b'partial')
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 3958208 vs 3958104')
    monkeypatch.setattr(torch, 'save', interrupted_inside_torch)
    with pytest.raises(KeyboardInterrupt):
        save_torch_atomic({'epoch': 2}, path)
    assert os.listdir(tmp_path) == ['last.pt']
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    real_replace = os.replace

    def interrupted_after_the_rename(source, target):
        real_replace(source, target)
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, 'replace', interrupted_after_the_rename)
    with pytest.raises(KeyboardInterrupt):
        save_torch_atomic({'epoch': 3}, path)
    assert os.listdir(tmp_path) == ['last.pt'] and torch.load(path, weights_only=True) == {'epoch': 3}


def test_the_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(atomic.os, 'fsync', lambda fd: events.append('fsync'))
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, 'replace', lambda a, b: (events.append('replace'), real_replace(a, b)))
    write_text_atomic(tmp_path / 'a.md', 'x')
    assert events == ['fsync', 'replace'] + (['fsync'] if os.name == 'posix' else [])  # the folder


def test_concurrent_writers_use_distinct_temporary_names(tmp_path):
    names = []

    def record(f):
        names.extend(os.listdir(tmp_path))
    write_atomic(tmp_path / 'a.png', record)
    write_atomic(tmp_path / 'a.png', record)
    temporary = [n for n in names if n != 'a.png']
    assert len(set(temporary)) == 2 and all(n.startswith('.a.png.') for n in temporary)


def test_stale_temporaries_of_other_runs_in_the_folder_are_kept(tmp_path):
    from experiments.training import is_run_file
    names = ['final_tiny_shift.pt', 'last_tiny_shift.pt', 'tiny_shift_validation.csv',
             'tiny_shift_samples_epoch0004.png', 'last_tiny_shift_1.pt', 'tiny_shift_1_loss.png',
             'notes.txt']
    for name in names:  # a temporary file of each, as a killed (or a running) save leaves it
        (tmp_path / f'.{name}.ab3_x9yz.tmp').write_bytes(b'half')
    (tmp_path / '.hidden.tmp').write_bytes(b'not a write_atomic file')
    assert [atomic.temporary_target(p) for p in sorted(tmp_path.glob('.*.tmp'))][:2] == [
        'final_tiny_shift.pt', None]
    removed = atomic.remove_stale_temporaries(tmp_path, lambda name: is_run_file(name, 'tiny_shift'))
    assert sorted(atomic.temporary_target(p) for p in removed) == sorted(names[:4])
    assert sorted(atomic.temporary_target(p) for p in tmp_path.glob('.*.tmp') if atomic.temporary_target(p)) \
        == sorted(names[4:])
    young = tmp_path / '.notes.txt.ab3_x9yz.tmp'
    os.utime(young, (time.time() - 5,) * 2)  # written 5 s ago: perhaps another process's, still writing
    assert atomic.remove_stale_temporaries(tmp_path, older_than=10) == []
    os.utime(young, (time.time() - 20,) * 2)
    assert atomic.remove_stale_temporaries(tmp_path, lambda name: name == 'notes.txt', older_than=10) == [young]
    assert len(atomic.remove_stale_temporaries(tmp_path)) == 2  # all of them


def test_a_file_with_the_longest_name_is_written_through_a_shorter_temporary_name(tmp_path):
    """A name of 250 bytes is valid, and so must be its write: the temporary name (name plus 14
    bytes) is cut to the file system's limit."""
    name = '検査画像' * 20 + 'x.npy'  # 245 bytes in UTF-8
    assert len(name.encode()) == 245
    written = write_atomic(tmp_path / name, lambda f: f.write(b'map'))
    assert written.read_bytes() == b'map' and [p.name for p in tmp_path.iterdir()] == [name]
    prefix = temporary_prefix(name)
    assert len(prefix.encode()) + 12 <= 255 and name.startswith(prefix[1:-1])
    assert temporary_prefix('final_a.pt') == '.final_a.pt.'
    assert temporary_target(tmp_path / f'{prefix}abcdefgh.tmp') == prefix[1:-1]


def test_a_full_disk_is_an_os_error_naming_the_file_even_through_torch_save(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError raised while handling the OSError."""
    def full_disk(obj, f):
        try:
            raise OSError(28, 'No space left on device')
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 7')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError, match=f'cannot write {tmp_path / "last.pt"}: No space left on device') as caught:
        save_torch_atomic({'epoch': 2}, tmp_path / 'last.pt')
    assert caught.value.errno == 28 and os.listdir(tmp_path) == []
    monkeypatch.undo()
    folder = tmp_path / 'locked'
    folder.mkdir()
    def refused(**kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(atomic.tempfile, 'mkstemp', refused)
    with pytest.raises(OSError, match=f'cannot write {folder / "table.csv"}: Permission denied'):
        write_text_atomic(folder / 'table.csv', 'a\n')


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / 'afile').write_text('mine')
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'afile' / 'x.txt'}: {tmp_path / 'afile'} is a "
                                      f"file, not a folder; an earlier file there is unchanged"):
        write_text_atomic(tmp_path / 'afile' / 'x.txt', 'text')
    assert (tmp_path / 'afile').read_text() == 'mine'


def test_a_folder_that_cannot_be_looked_into_keeps_the_writes_own_error(tmp_path, monkeypatch):
    def refused(self):
        raise PermissionError(13, 'Permission denied', str(self))
    monkeypatch.setattr(atomic.Path, 'exists', refused)
    assert atomic.file_in_the_way(tmp_path / 'locked' / 'x.txt') is None
    error = atomic._write_error(tmp_path / 'locked' / 'x.txt', PermissionError(13, 'Permission denied'))
    assert str(error) == f"[Errno 13] cannot write {tmp_path / 'locked' / 'x.txt'}: Permission denied; an earlier " \
                         f"file there is unchanged"


def test_a_temporary_file_that_cannot_be_removed_keeps_the_error_naming_the_file(tmp_path, monkeypatch):
    """A folder that turns read-only during a write: the rename and the removal of the temporary file
    both fail, and the error is still the one naming the file being written."""
    def refuse(*args, **kwargs):
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(atomic.os, 'replace', refuse)
    monkeypatch.setattr(atomic.Path, 'unlink', refuse)
    with pytest.raises(OSError, match=r'cannot write .*figure\.png: Operation not permitted'):
        write_text_atomic(tmp_path / 'figure.png', 'x')


def text_write(text):
    return lambda f: f.write(text)


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path):
    paths = [tmp_path / 'results.csv', tmp_path / 'tables' / 'a.md', tmp_path / 'tables' / 'b.md']
    assert write_atomic_set([(path, text_write(f'new {path.name}'), False) for path in paths]) == paths
    assert [path.read_text() for path in paths] == ['new results.csv', 'new a.md', 'new b.md']

    def fail(f):
        f.write('partial')
        raise OSError(28, 'No space left on device')
    writes = [(paths[0], text_write('newer'), False), (paths[1], fail, False), (paths[2], text_write('newer'), False)]
    with pytest.raises(OSError, match=r'cannot write .*a\.md: No space left on device'):
        write_atomic_set(writes)
    assert [path.read_text() for path in paths] == ['new results.csv', 'new a.md', 'new b.md']
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['a.md', 'b.md', 'results.csv']


def test_a_folder_in_the_set_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / 'results.csv').write_text('old')
    (tmp_path / 'b.md').mkdir()
    with pytest.raises(OSError, match=r'cannot write .*b\.md: Is a directory; an earlier file there is unchanged'):
        write_atomic_set([(tmp_path / 'results.csv', text_write('new'), False),
                          (tmp_path / 'b.md', text_write('x'), False)])
    assert (tmp_path / 'results.csv').read_text() == 'old'
    assert sorted(os.listdir(tmp_path)) == ['b.md', 'results.csv']


def test_a_rename_that_fails_midway_leaves_the_later_files_as_they_were_and_no_temporary_file(tmp_path, monkeypatch):
    paths = [tmp_path / name for name in ('a.md', 'b.md', 'results.csv')]
    for path in paths:
        path.write_text('old')
    original, renamed = os.replace, []

    def replace_once(source, target):
        if renamed:
            raise PermissionError(1, 'Operation not permitted')
        renamed.append(target)
        original(source, target)
    monkeypatch.setattr(atomic.os, 'replace', replace_once)
    with pytest.raises(OSError, match=r'cannot write .*b\.md: Operation not permitted'):
        write_atomic_set([(path, text_write('new'), False) for path in paths])
    assert [path.read_text() for path in paths] == ['new', 'old', 'old']  # the last one, results.csv, old
    assert sorted(os.listdir(tmp_path)) == ['a.md', 'b.md', 'results.csv']
