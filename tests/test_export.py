"""Exported models: ONNX Runtime's maps match PyTorch's; the spec travels in the file;
predict.py --onnx needs no torch; TorchScript matches too."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _smooth_texture, save_checkpoint
from experiments import export
from experiments.detector import SPEC_KEY, Detector
from experiments.torch_model import load_checkpoint
from self_sup_data.images import read_image

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """The checkpoint of an untrained 64-pixel grey texture model with thresholds, which reads 16-bit
    images with an intensity window (``train_mvtec.py --intensity-range``), and its training images'
    grey-level spans."""
    folder = tmp_path_factory.mktemp('export')
    path = save_checkpoint(folder / 'models', 'Shift', 'tiny', 'texture')
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta']['thresholds'] = dict(image=0.5, pixel=0.7, fpr=0.01, flip_average=False,
                                            images=6, source='test')
    checkpoint['meta']['bit_depth'] = [100, 4000]
    checkpoint['meta']['train_image_span'] = [120, 255]
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope='module')
def exported(checkpoint, tmp_path_factory):
    """(checkpoint, ONNX file with a fixed size, ONNX file with a dynamic size) of that model."""
    folder = tmp_path_factory.mktemp('onnx')
    return (checkpoint, export.export(checkpoint, 'onnx', folder / 'fixed.onnx'),
            export.export(checkpoint, 'onnx', folder / 'dynamic.onnx', dynamic_size=True))


def real_looking(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [_smooth_texture(rng, size, 1) for _ in range(n)]


@pytest.mark.slow
def test_onnx_maps_match_pytorch_on_random_and_real_looking_images(exported):
    path, fixed, _ = exported
    torch_run, spec = load_checkpoint(path)
    onnx_run = Detector.load(fixed).run
    rng = np.random.default_rng(1)
    random = rng.integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    textures = np.stack(real_looking(5, 64)).transpose(0, 3, 1, 2)
    for batch in (random, textures, textures[:1]):  # the batch size is dynamic
        expected, actual = torch_run(batch), onnx_run(batch)
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_onnx_file_carries_the_spec_and_the_detector_uses_it(exported):
    import onnx  # a slow test: the quick loop does not pay for the import
    path, fixed, dynamic = exported
    torch_detector, onnx_detector = Detector.load(path), Detector.load(fixed)
    assert json.loads(onnx.load(fixed).metadata_props[0].value) == torch_detector.spec
    assert onnx.load(fixed).metadata_props[0].key == SPEC_KEY
    assert onnx_detector.threshold == 0.5 and onnx_detector.pixel_threshold == 0.7
    deep = Path(fixed).with_name('deep.png')  # a 16-bit file: read with the model's window
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(deep)
    np.testing.assert_array_equal(onnx_detector.read(deep), read_image(deep, [100, 4000]))
    images = real_looking(2, 64) + real_looking(1, 100, seed=2)  # any size, as predict takes them
    expected_scores, expected_maps = torch_detector.predict(images)
    scores, maps = onnx_detector.predict(images)
    for expected, actual in zip(expected_maps, maps):
        assert actual.shape == expected.shape and np.abs(actual - expected).max() <= TOLERANCE
    np.testing.assert_allclose(scores['mean'], expected_scores['mean'], atol=TOLERANCE)
    faint = [np.full((64, 64), 7, np.uint8)] + images  # a uniform image: noted by the exported model too
    assert onnx_detector.contrast_notes(range(4), faint) == torch_detector.contrast_notes(range(4), faint) != []
    older = onnx.load(fixed)  # an export whose spec lacks an entry that inference reads
    spec = json.loads(older.metadata_props[0].value)
    del spec['flip_average_error']
    older.metadata_props[0].value = json.dumps(spec)
    onnx.save(older, fixed.with_name('older.onnx'))
    with pytest.raises(ValueError, match=r"ONNX model .*older.onnx has no \['flip_average_error'\] in its "
                                         r"'nsa_spec' metadata .*export it again"):
        Detector.load(fixed.with_name('older.onnx'))
    session_input = Detector.load(dynamic).run.session.get_inputs()[0]
    assert session_input.shape == ['batch', 1, 'height', 'width']
    assert Detector.load(fixed).run.session.get_inputs()[0].shape == ['batch', 1, 64, 64]
    batch = np.stack(real_looking(1, 96)).transpose(0, 3, 1, 2)  # another multiple of 32
    expected = load_checkpoint(path)[0](batch)
    assert np.abs(Detector.load(dynamic).run(batch) - expected).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated')
def test_torchscript_export_matches(exported, tmp_path):
    path = exported[0]
    out = export.export(path, 'torchscript', tmp_path / 'model.torchscript.pt')
    extra = {'nsa_spec.json': ''}
    scripted = torch.jit.load(out, _extra_files=extra)
    run, spec = load_checkpoint(path)
    assert json.loads(extra['nsa_spec.json']) == spec
    batch = np.stack(real_looking(2, 64)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        maps = scripted(torch.from_numpy(batch))[:, 0].numpy()
    assert np.abs(maps - run(batch)).max() <= TOLERANCE
    with pytest.raises(ValueError, match=f'cannot read checkpoint {out}: it is a TorchScript export'):
        Detector.load(out)


def test_export_errors_are_named(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main(['-m', str(tmp_path / 'missing.pt')])
    assert f'no checkpoint at {tmp_path / "missing.pt"}: the file does not exist' in capsys.readouterr().err
    with pytest.raises(ValueError, match=f'{tmp_path} is a folder'):
        export.export(tmp_path)
    # never over the model it is made from, and an ONNX file only under a name that loads as one
    model = tmp_path / 'model.pt'
    model.write_bytes(checkpoint.read_bytes())
    for fmt, out in (('torchscript', model), ('onnx', tmp_path / '.' / 'model.pt')):
        with pytest.raises(ValueError, match='would replace the model it is made from|name an ONNX'):
            export.export(model, fmt, out)
    with pytest.raises(ValueError, match=r'name an ONNX export \*.onnx .* not .*model.onnx.pt for --format onnx'):
        export.export(model, 'onnx', tmp_path / 'model.onnx.pt')
    with pytest.raises(ValueError, match=r'a TorchScript one anything else, not .*script.onnx for --format '
                                         r'torchscript'):
        export.export(model, 'torchscript', tmp_path / 'script.onnx')
    assert model.read_bytes() == checkpoint.read_bytes()
    onnx_file = tmp_path / 'model.onnx'
    onnx_file.write_bytes(b'an ONNX export, as far as the name says')
    with pytest.raises(ValueError, match='it is an ONNX export .*give the checkpoint it was exported from'):
        export.export(onnx_file, 'onnx', tmp_path / 'again.onnx')
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export.export(checkpoint, 'tflite')
    broken = tmp_path / 'broken.onnx'
    broken.write_bytes(b'not a model')
    with pytest.raises(ValueError, match=f'cannot read ONNX model {broken}'):
        Detector.load(broken)


@pytest.mark.slow
def test_predict_with_onnx_imports_no_torch(exported, tmp_path):
    path, fixed, _ = exported
    image_dir = tmp_path / 'images'
    image_dir.mkdir()
    from PIL import Image
    for index, image in enumerate(real_looking(3, 80)):
        Image.fromarray(image[:, :, 0]).save(image_dir / f'{index}.png')
    out = tmp_path / 'out'
    code = ('import runpy, sys; sys.argv = sys.argv[1:]\n'
            'try:\n    runpy.run_path(sys.argv[0], run_name="__main__")\n'
            'except SystemExit as e:\n    status = e.code\n'
            'print("torch imported:", "torch" in sys.modules); sys.exit(status)')
    result = subprocess.run([sys.executable, '-c', code, str(ROOT / 'predict.py'), '--onnx',
                             str(fixed), '-i', str(image_dir), '-o', str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'torch imported: False' in result.stdout
    expected = Detector.load(path).predict([np.asarray(Image.open(p))
                                            for p in sorted(image_dir.iterdir())])[1]
    for index, map_ in enumerate(expected):
        assert np.abs(np.load(out / 'maps' / f'{index}.npy') - map_).max() <= TOLERANCE


@pytest.mark.slow
def test_a_standardising_model_exports_with_its_standardisation(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=True)
    saved['meta']['model_config'] = dict(saved['meta']['model_config'], standardize_input=True)
    path = tmp_path / checkpoint.name
    torch.save(saved, path)
    torch_run, _ = load_checkpoint(path)
    onnx_run = Detector.load(export.export(path, 'onnx', tmp_path / 'standardized.onnx', dynamic_size=True)).run
    for side in (64, 96):
        batch = np.stack(real_looking(3, side)).transpose(0, 3, 1, 2)
        expected = torch_run(batch)
        assert np.abs(onnx_run(batch) - expected).max() <= TOLERANCE
    plain_run, _ = load_checkpoint(checkpoint)  # the same weights, without the standardisation
    assert np.abs(plain_run(batch) - expected).max() > 100 * TOLERANCE
