"""The Magnetic-tile-defect converter: a tiny synthetic source tree, and the real data when present."""
import filecmp
import random
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from self_sup_data import magnetic_tile
from self_sup_data.magnetic_tile import DEFECT_FOLDERS, NORMAL_FOLDER, convert

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
OTHER_COUNTS = 'holds .* images, the public dataset'  # the tiny sources' warning
pytestmark = pytest.mark.filterwarnings(f'ignore:.*{OTHER_COUNTS}')


def _write_source(src, n_free=10, n_defect=2, rng=None):
    """A source tree like the public one: MT_*/Imgs/<name>.jpg with <name>.png masks, odd sizes."""
    rng = np.random.default_rng(0) if rng is None else rng
    for folder in [NORMAL_FOLDER, *DEFECT_FOLDERS]:
        images_dir = src / folder / 'Imgs'
        images_dir.mkdir(parents=True)
        for i in range(n_free if folder == NORMAL_FOLDER else n_defect):
            h, w = rng.integers(40, 90, 2)
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(images_dir / f'exp{i}_num_{i * 7}.jpg')
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4:h // 2, w // 4:w // 2] = 255
            mask[0, 0] = 100  # a grey pixel, as in the published masks (thresholded away)
            Image.fromarray(mask).save(images_dir / f'exp{i}_num_{i * 7}.png')


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def test_tiny_source_counts_names_masks(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    with pytest.warns(UserWarning, match='MT_Free/Imgs holds 10 images, the public dataset 952'):
        category = convert(tmp_path / 'src', tmp_path / 'out')
    assert category == tmp_path / 'out' / 'magnetic_tile'
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['magnetic_tile']  # no temp folder left
    (tmp_path / 'plain').mkdir()  # the permissions of a new folder (mkdtemp's are private)
    assert category.stat().st_mode & 0o777 == (tmp_path / 'plain').stat().st_mode & 0o777
    files = _tree(category)
    assert [f for f in files if f.startswith('train/good/')] == [f'train/good/{i:03d}.png' for i in range(6)]
    assert [f for f in files if f.startswith('test/good/')] == [f'test/good/{i:03d}.png' for i in range(4)]
    for defect in DEFECT_FOLDERS.values():
        expected = [f'test/{defect}/000.png', f'test/{defect}/001.png']
        assert [f for f in files if f.startswith(f'test/{defect}/')] == expected
        assert [f for f in files if f.startswith(f'ground_truth/{defect}/')] == [
            f'ground_truth/{defect}/000_mask.png', f'ground_truth/{defect}/001_mask.png']
    assert len(files) == 10 + 5 * 4
    for name in files:
        with Image.open(category / name) as image:
            assert image.mode == 'L' and image.size == (256, 256)
            if name.startswith('ground_truth/'):
                assert set(np.unique(np.asarray(image))) == {0, 255}


def test_source_images_of_any_suffix_case_and_no_resource_forks(tmp_path):
    _write_source(tmp_path, n_free=2, n_defect=2)
    images = tmp_path / 'MT_Crack' / 'Imgs'
    (images / 'exp1_num_7.jpg').rename(images / 'exp1_num_7.JPG')
    (images / '._exp0_num_0.jpg').write_bytes(b'a macOS resource fork')
    (images / '._exp0_num_0.png').write_bytes(b'a macOS resource fork')
    pairs = magnetic_tile.source_images(tmp_path, 'MT_Crack', with_masks=True)
    assert [(image.name, mask.name) for image, mask in pairs] == [
        ('exp0_num_0.jpg', 'exp0_num_0.png'), ('exp1_num_7.JPG', 'exp1_num_7.png')]


@pytest.mark.slow
def test_tiny_source_split_is_a_fixed_shuffle_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    plan = magnetic_tile.conversion_plan(tmp_path / 'src')
    free = sorted((tmp_path / 'src' / NORMAL_FOLDER / 'Imgs').glob('*.jpg'))
    shuffled = list(free)
    random.Random(0).shuffle(shuffled)
    test_good = [source for source, _, name, _ in plan if name.startswith('test/good/')]
    assert test_good == sorted(shuffled[:4])
    first = convert(tmp_path / 'src', tmp_path / 'a')
    second = convert(tmp_path / 'src', tmp_path / 'b')
    assert _tree(first) == _tree(second)
    assert all(filecmp.cmp(first / f, second / f, shallow=False) for f in _tree(first))


def test_missing_folder_and_missing_mask_are_named(tmp_path):
    _write_source(tmp_path / 'src')
    (tmp_path / 'src' / 'MT_Fray').rename(tmp_path / 'src' / 'fray')
    with pytest.raises(FileNotFoundError, match=r'MT_Fray.*Imgs.*does not exist'):
        convert(tmp_path / 'src', tmp_path / 'out')
    (tmp_path / 'src' / 'fray').rename(tmp_path / 'src' / 'MT_Fray')
    missing = sorted((tmp_path / 'src' / 'MT_Crack' / 'Imgs').glob('*.png'))[1]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f'has no mask .*{missing.name}'):
        convert(tmp_path / 'src', tmp_path / 'out')
    assert not (tmp_path / 'out').exists() or list((tmp_path / 'out').iterdir()) == []


def test_a_source_with_other_counts_than_the_published_ones_warns_naming_the_folder(tmp_path, monkeypatch):
    _write_source(tmp_path)
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    monkeypatch.setattr(magnetic_tile, 'PUBLISHED_COUNTS', {NORMAL_FOLDER: 10, **dict.fromkeys(DEFECT_FOLDERS, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        magnetic_tile.conversion_plan(tmp_path)  # the published counts: no warning
    crack = tmp_path / 'MT_Crack' / 'Imgs'
    for path in crack.glob('exp1_*'):
        path.unlink()
    with pytest.warns(UserWarning, match=rf'^{crack} holds 1 images, the public dataset 2: the split and '
                                         r'numbering will differ') as caught:
        magnetic_tile.conversion_plan(tmp_path)
    assert len(caught) == 1 and 'MT_Free' not in str(caught[0].message)


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path):
    _write_source(tmp_path / 'src')
    image = sorted((tmp_path / 'src' / 'MT_Fray' / 'Imgs').glob('*.jpg'))[0]
    with Image.open(image) as opened:
        width, height = opened.size
    Image.fromarray(np.full((height * 2, width // 2), 255, np.uint8)).save(image.with_suffix('.png'))
    with pytest.raises(ValueError, match=rf'^mask {image.with_suffix(".png")} is {width // 2}x{height * 2} '
                                         rf'but its image {image} is {width}x{height} \(as displayed'):
        convert(tmp_path / 'src', tmp_path / 'out')  # one message, not wrapped as an unreadable image
    assert not (tmp_path / 'out').exists()


def test_a_jpeg_turned_by_its_exif_orientation_is_paired_with_its_mask_as_displayed(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    image = sorted((tmp_path / 'src' / 'MT_Crack' / 'Imgs').glob('*.jpg'))[0]
    shown = np.full((40, 60), 60, np.uint8)
    shown[5:15, 40:55] = 250  # the crack, where the mask marks it, on the image as viewers show it
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 40:55] = 255
    exif = Image.new('L', (1, 1)).getexif()
    exif[0x0112] = 6  # stored sideways, turned upright by the tag
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(image, exif=exif.tobytes(), quality=100)
    Image.fromarray(mask).save(image.with_suffix('.png'))
    category = convert(tmp_path / 'src', tmp_path / 'out')
    converted = np.asarray(Image.open(category / 'test' / 'crack' / '000.png'))
    converted_mask = np.asarray(Image.open(category / 'ground_truth' / 'crack' / '000_mask.png')) > 0
    assert converted[converted_mask].mean() > 200 and converted[~converted_mask].mean() < 100
    # a mask drawn on the stored (sideways) pixels would not lie on the converted image: refused
    Image.fromarray(np.ascontiguousarray(np.rot90(mask, 1))).save(image.with_suffix('.png'))
    with pytest.raises(ValueError, match=r'is 40x60 but its image .* is 60x40 \(as displayed'):
        convert(tmp_path / 'src', tmp_path / 'other')


def test_an_empty_defect_mask_is_converted_with_a_warning_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    mask_path = tmp_path / 'src' / 'MT_Crack' / 'Imgs' / 'exp1_num_7.png'
    with Image.open(mask_path) as mask:
        Image.fromarray(np.zeros(np.asarray(mask).shape, np.uint8)).save(mask_path)
    with pytest.warns(UserWarning, match=r"1 defect masks mark no pixel, as in the source .* e.g. "
                                         r"ground_truth/crack/001_mask.png \(from .*exp1_num_7.png\)"):
        category = convert(tmp_path / 'src', tmp_path / 'out')
    assert not np.asarray(Image.open(category / 'ground_truth' / 'crack' / '001_mask.png')).any()
    assert (category / 'test' / 'crack' / '001.png').is_file()


def test_a_colour_mask_is_read_by_its_largest_channel(tmp_path):
    path = tmp_path / 'red.png'
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48, 0] = 255  # pure red: 76 in greyscale, which the threshold would drop
    Image.fromarray(mask).save(path)
    converted = np.asarray(magnetic_tile.convert_mask(path))
    assert converted.shape == (256, 256) and set(np.unique(converted)) == {0, 255}
    assert (converted > 0).sum() == 128 * 128


def test_a_second_run_into_the_same_folder_does_not_mix_with_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    convert_image, started = magnetic_tile.convert_image, []

    def with_another_run(path):  # the other run starts after this one and finishes first
        if not started:
            started.append(path)
            convert(tmp_path / 'src', tmp_path / 'out')
        return convert_image(path)
    monkeypatch.setattr(magnetic_tile, 'convert_image', with_another_run)
    with pytest.raises(FileExistsError, match='magnetic_tile already exists'):
        convert(tmp_path / 'src', tmp_path / 'out')
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['magnetic_tile']  # no build folder left
    assert len(_tree(tmp_path / 'out' / 'magnetic_tile')) == 10 + 5 * 4  # the other run's, complete


def test_failed_conversion_leaves_no_category(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')

    def broken(path):
        raise OSError(f"disk full while writing {path}")
    monkeypatch.setattr(magnetic_tile, 'convert_mask', broken)
    with pytest.raises(OSError, match='disk full'):
        convert(tmp_path / 'src', tmp_path / 'out')
    assert list((tmp_path / 'out').iterdir()) == []


@pytest.mark.parametrize('signal_name', ['SIGTERM', 'SIGHUP'])
def test_a_conversion_killed_by_sigterm_or_hangup_leaves_no_build_folder(tmp_path, monkeypatch, request, signal_name):
    """kill's default signal (a scheduler's time limit) or a closed terminal's hangup ended the process
    without its cleanup, and the hidden build folder stayed; it now exits through it."""
    number = getattr(signal, signal_name)
    outside = signal.signal(number, signal.SIG_DFL)  # e.g. nohup ignores hangups
    request.addfinalizer(lambda: signal.signal(number, outside))
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    convert_image = magnetic_tile.convert_image

    def killed_midway(path):
        if len(list((tmp_path / 'out').rglob('*.png'))) >= 3:
            signal.raise_signal(number)
        return convert_image(path)
    monkeypatch.setattr(magnetic_tile, 'convert_image', killed_midway)
    handler = signal.getsignal(number)
    with pytest.raises(SystemExit) as stopped:
        convert(tmp_path / 'src', tmp_path / 'out')
    assert stopped.value.code == 128 + number
    assert list((tmp_path / 'out').iterdir()) == []  # neither the category nor a hidden build folder
    assert signal.getsignal(number) == handler  # restored


def test_a_signal_the_caller_ignores_stays_ignored_during_a_build(request):
    """Under nohup a hangup is ignored, and a conversion goes on through it; kill's SIGTERM, at its default,
    still exits through the cleanup."""
    from self_sup_data.folders import terminate_as_exit
    outside = {number: signal.getsignal(number) for number in (signal.SIGHUP, signal.SIGTERM)}
    request.addfinalizer(lambda: [signal.signal(number, handler) for number, handler in outside.items()])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with terminate_as_exit():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)  # ignored: the block goes on
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_truncated_source_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    crack = sorted((tmp_path / 'src').rglob('*.jpg'))[0]
    crack.write_bytes(crack.read_bytes()[:200])
    with pytest.raises(ValueError, match=f'cannot read image {crack}'):
        convert(tmp_path / 'src', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()  # found while the source is checked, before anything is written


def test_an_output_that_is_a_file_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(magnetic_tile, 'N_TEST_GOOD', 4)
    _write_source(tmp_path / 'src')
    (tmp_path / 'afile').write_text('notes')
    with pytest.raises(SystemExit):
        magnetic_tile.main([str(tmp_path / 'src'), str(tmp_path / 'afile')])
    assert f"{tmp_path / 'afile'} is a file, not a folder to write the dataset into" in capsys.readouterr().err
    assert (tmp_path / 'afile').read_text() == 'notes'


def test_existing_output_is_not_overwritten(tmp_path):
    _write_source(tmp_path / 'src')
    (tmp_path / 'out' / 'magnetic_tile').mkdir(parents=True)
    with pytest.raises(FileExistsError, match='magnetic_tile already exists'):
        convert(tmp_path / 'src', tmp_path / 'out')
    (tmp_path / 'linked').mkdir()
    (tmp_path / 'linked' / 'magnetic_tile').symlink_to(tmp_path / 'gone')  # a link to nothing
    with pytest.raises(FileExistsError, match='magnetic_tile already exists'):
        convert(tmp_path / 'src', tmp_path / 'linked')
    with pytest.raises(SystemExit) as stop:  # the command line: one line, no traceback
        magnetic_tile.main([str(tmp_path / 'src'), str(tmp_path / 'out')])
    assert stop.value.code == 2


def test_a_source_without_enough_normal_images_is_refused(tmp_path):
    _write_source(tmp_path / 'src')  # 10 normal images: all of them would be test images
    with pytest.raises(ValueError, match=r'MT_Free/Imgs holds 10 images; the split needs more than '
                                         r'the 240 normal test images'):
        convert(tmp_path / 'src', tmp_path / 'out')
    assert not (tmp_path / 'out' / 'magnetic_tile').exists()


@pytest.mark.slow
@pytest.mark.skipif(not ((SHARED_DATA / 'magnetic_tile_source').is_dir() and (SHARED_DATA / 'magnetic_tile').is_dir()),
                    reason=f"needs the public source and its published conversion in {SHARED_DATA} "
                           "(magnetic_tile_source/ and magnetic_tile/); absent on this machine")
def test_conversion_matches_published_conversion_file_for_file(tmp_path):
    with pytest.warns(UserWarning, match=r"4 defect masks mark no pixel, as in the source .* e.g. "
                                         r"ground_truth/uneven/\d{3}_mask.png \(from .*MT_Uneven"):
        category = convert(SHARED_DATA / 'magnetic_tile_source', tmp_path)
    reference = SHARED_DATA / 'magnetic_tile'
    files = _tree(category)
    assert files == _tree(reference)
    different = [f for f in files if not filecmp.cmp(category / f, reference / f, shallow=False)]
    assert different == [], f"{len(different)} files differ, e.g. {different[:5]}"
