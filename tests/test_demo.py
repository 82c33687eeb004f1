import shutil
import signal
import socket
import warnings

import cv2
import numpy as np
import pytest

from self_sup_data import demo
from self_sup_data.demo import DEFECT_KINDS, DEMO_CATEGORY, MIN_CHANGE, add_defect, make_demo_dataset


def no_network(*args, **kwargs):
    raise AssertionError("the demo dataset must not touch the network")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0)


def file_contents(category_dir):
    return {str(p.relative_to(category_dir)): p.read_bytes()
            for p in sorted(category_dir.rglob("*")) if p.is_file()}


def test_layout(demo_root):
    assert demo_root.name == DEMO_CATEGORY
    assert len(list((demo_root / "train" / "good").glob("*.png"))) == demo.N_TRAIN
    assert len(list((demo_root / "test" / "good").glob("*.png"))) == demo.N_TEST_GOOD
    assert sorted(p.name for p in (demo_root / "test").iterdir()) == sorted(DEFECT_KINDS + ("good",))
    for kind in DEFECT_KINDS:
        images = sorted((demo_root / "test" / kind).glob("*.png"))
        assert len(images) == demo.N_PER_DEFECT
        for image_path in images:
            image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
            mask = cv2.imread(str(demo_root / "ground_truth" / kind / f"{image_path.stem}_mask.png"),
                              cv2.IMREAD_UNCHANGED)
            assert image.shape == mask.shape == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
            assert image.dtype == mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}
    assert sum(p.stat().st_size for p in demo_root.rglob("*")) < 5e6
    assert not [p for p in demo_root.parent.iterdir() if p != demo_root]  # no temp folders left


def test_deterministic_for_a_seed(demo_root, tmp_path):
    again = make_demo_dataset(tmp_path / "a", seed=0)
    assert file_contents(again) == file_contents(demo_root)
    other = make_demo_dataset(tmp_path / "b", seed=1)
    assert file_contents(other) != file_contents(demo_root)


def test_existing_dataset_is_reused_or_replaced(tmp_path):
    path = make_demo_dataset(tmp_path, seed=3)
    marker = path / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    assert make_demo_dataset(tmp_path, seed=3) == path and marker.stat().st_mtime_ns == stamp
    first = file_contents(path)
    with pytest.warns(UserWarning, match=r"demo_texture held the demo made with seed 3 \(format version \d+\); "
                                         r"it is replaced by that of seed 4: models trained on the earlier"):
        assert make_demo_dataset(tmp_path, seed=4) == path
    assert file_contents(path) != first
    assert file_contents(path) == file_contents(make_demo_dataset(tmp_path / "fresh", seed=4))
    assert [p.name for p in tmp_path.iterdir() if p.name != "fresh"] == [DEMO_CATEGORY]


def test_a_dataset_another_process_finished_meanwhile_is_kept_for_its_readers(demo_root, tmp_path,
                                                                             monkeypatch):
    # torchrun: every process builds the demo; the first to finish starts reading its copy, which
    # a later one must not move away (its reader then found no image)
    target = tmp_path / DEMO_CATEGORY
    write = demo._write_category

    def write_while_another_process_finishes(build_dir, seed, texture):
        write(build_dir, seed, texture)
        shutil.copytree(demo_root, target)  # the other process renames its copy into place
        (target / "being_read").touch()

    monkeypatch.setattr(demo, "_write_category", write_while_another_process_finishes)
    assert make_demo_dataset(tmp_path, seed=0) == target
    assert (target / "being_read").is_file()  # the same folder, not replaced
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_CATEGORY]  # its own copy removed


def test_another_process_finishing_just_before_an_earlier_seeds_copy_is_replaced_is_kept(demo_root, tmp_path,
                                                                                         monkeypatch):
    make_demo_dataset(tmp_path, seed=3)  # an earlier demo of another seed
    target = tmp_path / DEMO_CATEGORY
    made_with, checks = demo._made_with, []

    def another_process_finishes_after_the_check(category_dir, seed, texture):
        answer = made_with(category_dir, seed, texture)
        checks.append(answer)
        if len(checks) == 2:  # the check after building: the other process renames its copy in
            shutil.rmtree(target)
            shutil.copytree(demo_root, target)
            (target / "being_read").touch()
        return answer
    monkeypatch.setattr(demo, "_made_with", another_process_finishes_after_the_check)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing replaced, so no replacement warning
        assert make_demo_dataset(tmp_path, seed=0) == target
    assert (target / "being_read").is_file() and [p.name for p in tmp_path.iterdir()] == [DEMO_CATEGORY]


def test_a_demo_killed_by_sigterm_leaves_no_build_folder(tmp_path, monkeypatch):
    write_category = demo._write_category

    def killed_midway(build_dir, seed, texture):
        write_category(build_dir, seed, texture)
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(demo, "_write_category", killed_midway)
    with pytest.raises(SystemExit):
        make_demo_dataset(tmp_path)
    assert list(tmp_path.iterdir()) == []
    ignored = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a caller's own handling is kept
    try:
        assert make_demo_dataset(tmp_path / 'kept').is_dir()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, ignored)


def test_a_new_dataset_folder_gets_the_permissions_of_a_new_folder(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        category = make_demo_dataset(tmp_path, seed=3)
        (tmp_path / 'plain').mkdir()
        assert category.stat().st_mode & 0o777 == (tmp_path / 'plain').stat().st_mode & 0o777 == 0o755
        shared = tmp_path / 'shared'  # a group's folder: new folders in it keep its group
        shared.mkdir()
        os.chmod(shared, 0o2775)
        assert make_demo_dataset(shared, seed=3).stat().st_mode & 0o7777 == 0o2755
    finally:
        os.umask(umask)


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / DEMO_CATEGORY / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=DEMO_CATEGORY):
        make_demo_dataset(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / DEMO_CATEGORY).symlink_to(tmp_path / "gone")  # a link to nothing
    with pytest.raises(FileExistsError, match=f"{DEMO_CATEGORY} exists and was not made by make_demo_dataset"):
        make_demo_dataset(tmp_path / "elsewhere")


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_info_file_is_named(tmp_path, content):
    info = make_demo_dataset(tmp_path, seed=3) / demo.INFO_FILE
    info.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{info} is not a {demo.INFO_FILE} written by make_demo_dataset"):
        make_demo_dataset(tmp_path, seed=3)
    assert info.read_bytes() == content  # nothing replaced


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_masks_are_exact(kind):
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (128, 128)).astype(np.uint8), (0, 0), 2)
    for _ in range(10):
        image, mask = add_defect(texture, kind, rng)
        assert image.dtype == np.uint8 and mask.dtype == bool and mask.shape == texture.shape
        changed = np.abs(image.astype(int) - texture)
        np.testing.assert_array_equal(changed > 0, mask)
        assert changed[mask].min() >= MIN_CHANGE
        assert mask.sum() >= demo.MIN_DEFECT_PIXELS


def test_command_line(tmp_path, capsys):
    demo.main([str(tmp_path), "--seed", "2"])
    assert capsys.readouterr().out.strip() == str(tmp_path / DEMO_CATEGORY)


def test_loads_as_an_mvtec_category(demo_root):
    from self_sup_data.mvtec import SelfSupMVTecDataset, list_categories
    assert list_categories(demo_root.parent) == [DEMO_CATEGORY]
    test = SelfSupMVTecDataset(demo_root.parent, DEMO_CATEGORY, is_train=False, res_scale=0.5)
    assert test.in_channels == 1 and test.low_res == 128 and test.has_mask.all()
    assert len(test) == demo.N_TEST_GOOD + len(DEFECT_KINDS) * demo.N_PER_DEFECT
    assert all(test.masks[i].any() == bool(test.labels[i]) for i in range(len(test)))


def test_other_textures_are_categories_of_their_own(demo_root, tmp_path, capsys):
    demo.main([str(tmp_path), "--texture", "grass"])
    grass = tmp_path / "demo_grass"
    assert capsys.readouterr().out.strip() == str(grass)
    assert sorted(p.name for p in grass.iterdir()) == sorted(p.name for p in demo_root.iterdir())
    brick_image = cv2.imread(str(demo_root / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
    grass_image = cv2.imread(str(grass / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
    assert grass_image.shape == brick_image.shape and not np.array_equal(grass_image, brick_image)
    # the brick category beside it is made and kept apart, and each is reused as it is
    assert make_demo_dataset(tmp_path) == tmp_path / DEMO_CATEGORY
    assert file_contents(make_demo_dataset(tmp_path, texture="grass")) == file_contents(grass)
    with pytest.raises(ValueError, match="'bark'.*brick, grass, gravel"):
        make_demo_dataset(tmp_path, texture="bark")
