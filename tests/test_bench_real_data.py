"""The real-data benchmark: its helpers, and whole runs on a tiny category (the real run reads ../shared)."""
import contextlib
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import train_mvtec
from bench import real_data
from experiments import one_class, settings
from experiments.checkpoints import read_meta, read_model
from experiments.mvtec_tasks import load_normal_set, load_test_set
from experiments.prediction import evaluate
from self_sup_data.self_sup_tasks import GENERATOR_VERSION


def test_border_band_is_the_outer_fraction_of_each_side():
    band = real_data.border_band((10, 20), 0.1)
    assert band.shape == (10, 20) and band.dtype == bool
    assert band[0].all() and band[-1].all() and band[:, :2].all() and band[:, -2:].all()
    assert not band[1:-1, 2:-2].any()
    assert real_data.border_band((4, 4), 0.01)[0].all()  # at least one pixel wide


def test_pixel_auroc_by_region_scores_each_region_alone():
    rng = np.random.default_rng(0)
    n, size = 6, 20
    masks = (rng.random((n, size, size)) < 0.2).astype(np.uint8)
    masks[0] = 0  # a normal image
    in_band = real_data.border_band((size, size))
    # the map ranks defects perfectly in the band and backwards inside
    maps = np.where(in_band, masks, 1 - masks) + 0.1 * rng.random((n, size, size))
    has_mask = np.ones(n, bool)
    has_mask[1] = False  # a defective image without mask: left out
    maps[1] = 1 - maps[1]
    dataset = SimpleNamespace(masks=list(masks), has_mask=has_mask)

    result = real_data.pixel_auroc_by_region(dataset, maps)
    assert result['pixel_auroc_border'] == pytest.approx(1.0)
    assert result['pixel_auroc_inner'] == pytest.approx(0.0)
    rng_maps = rng.random((n, size, size))
    result = real_data.pixel_auroc_by_region(dataset, rng_maps)
    for name, region in (('border', in_band), ('inner', ~in_band)):
        expected = roc_auc_score(masks[has_mask][:, region].ravel(), rng_maps[has_mask][:, region].ravel())
        assert result[f'pixel_auroc_{name}'] == pytest.approx(expected)
    # an object: the band of the scored central crop; the zero padding around it counts nowhere
    padded = np.zeros((n, size + 8, size + 8))
    padded[:, 4:-4, 4:-4] = maps
    padded_masks = np.zeros_like(padded, dtype=np.uint8)
    padded_masks[:, 4:-4, 4:-4] = masks
    padded_masks[:, 0, 0] = 1  # a defect pixel outside the crop: not scored
    result = real_data.pixel_auroc_by_region(SimpleNamespace(masks=list(padded_masks), has_mask=has_mask),
                                             padded, crop=size)
    assert result == {'pixel_auroc_border': pytest.approx(1.0), 'pixel_auroc_inner': pytest.approx(0.0)}
    # no defect pixel in the band: NaN there, not an error that loses the benchmark's results
    central = np.zeros_like(masks)
    central[:, 8:12, 8:12] = 1
    result = real_data.pixel_auroc_by_region(SimpleNamespace(masks=list(central), has_mask=has_mask), maps)
    assert np.isnan(result['pixel_auroc_border']) and 0 <= result['pixel_auroc_inner'] <= 1


def test_method_name_names_the_paste_fraction_when_the_generator_used_one():
    assert real_data.method_name('FPI', {'mode': 'uniform'}) == 'FPI'
    assert real_data.method_name('Shift-M', {'paste_fraction': None}) == 'NSA (binary, mixed gradients)'
    assert (real_data.method_name('Shift-Intensity-M', {'paste_fraction': [0.5, 1.0]})
            == 'NSA (logistic, mixed gradients), blend mixed with paste U(0.5, 1)')
    assert real_data.method_name('Shift-Intensity-M-7', {}) == 'NSA (logistic, mixed gradients), seed 7'
    assert real_data.method_name('FPI-Poisson-M-3', {}) == 'FPI-Poisson-M, seed 3'  # no table name


def test_mismatches_names_what_differs_from_the_requested_run():
    args = SimpleNamespace(category='magnetic_tile', res_scale=0.5, epochs=60, batch_size=16, lr=1e-3,
                           recipe='table', loss=None, standardize_input=None)
    self_sup_args = settings.mvtec_self_sup_args(settings.parse_setting('Shift-M'), 'magnetic_tile')
    meta = dict(self_sup_args=self_sup_args, generator_version=GENERATOR_VERSION, res_scale=0.5,
                train_config=dict(epochs=60, batch_size=16, lr=1e-3, loss='bce', workers=0))
    assert real_data.mismatches(meta, args, 'Shift-M') == []
    assert real_data.mismatches(meta, args, 'Shift-M-3') == []  # a seed is not part of the generator
    stored = json.loads(json.dumps(meta))  # tuples come back as lists
    assert real_data.mismatches(stored, args, 'Shift-M') == []
    assert real_data.mismatches(meta, args, 'Shift-Intensity-M') == ['self_sup_args']
    old = {k: v for k, v in meta.items() if k != 'generator_version'}  # a model of generator 1
    assert real_data.mismatches(old, args, 'Shift-M') == ['generator_version']
    other = dict(meta, res_scale=1.0, train_config=dict(epochs=100, batch_size=16, lr=2e-3, loss='bce'))
    assert real_data.mismatches(other, args, 'Shift-M') == ['epochs', 'lr', 'res_scale']
    earlier_loss = SimpleNamespace(**{**vars(args), 'loss': 'bce-bf16'})
    assert real_data.mismatches(meta, earlier_loss, 'Shift-M') == ['loss']
    classifier = dict(meta, self_sup_args=settings.mvtec_self_sup_args(
        settings.parse_setting('CutPaste-3way'), 'magnetic_tile'),
        train_config=dict(meta['train_config'], loss='cross_entropy'))
    assert real_data.mismatches(classifier, earlier_loss, 'CutPaste-3way') == []  # not a BCE setting
    # a calibrated recipe is not a table model; its generator arguments come from the images
    auto = SimpleNamespace(**{**vars(args), 'recipe': 'auto'})
    assert real_data.mismatches(meta, auto, 'Shift-M') == ['network', 'recipe']
    calibrated = dict(meta, recipe='auto', self_sup_args=dict(self_sup_args, num_patches=2),
                      model_config=dict(meta.get('model_config', {}), standardize_input=True))
    assert real_data.mismatches(calibrated, auto, 'Shift-M') == []
    assert real_data.mismatches(calibrated, args, 'Shift-M') == ['network', 'recipe', 'self_sup_args']
    # a calibrated recipe's network standardises its input (the training script's default): an
    # earlier calibrated model without it is another model
    unstandardized = dict(calibrated, model_config=dict(meta.get('model_config', {})))
    assert real_data.mismatches(unstandardized, auto, 'Shift-M') == ['network']
    earlier_network = SimpleNamespace(**{**vars(auto), 'standardize_input': False})  # --no-standardize-input
    assert real_data.mismatches(unstandardized, earlier_network, 'Shift-M') == []
    assert real_data.mismatches(calibrated, earlier_network, 'Shift-M') == ['network']
    assert real_data.mismatches(dict(meta, model_config=dict(standardize_input=True)), args, 'Shift-M') == ['network']
    # options of the training script that this script never gives (a model trained by hand into its folder)
    for changes, field in ((dict(held_out=3), 'held_out'),
                           (dict(param_overrides=dict(num_patches=8)), 'param_overrides'),
                           (dict(model_config=dict(pool=True, paper_network=True)), 'network'),
                           (dict(model_config=dict(pool=False)), 'network'),
                           (dict(train_config=dict(meta['train_config'], select='best')), 'select'),
                           (dict(train_config=dict(meta['train_config'], swa_epochs=5)), 'swa_epochs')):
        assert real_data.mismatches(dict(meta, **changes), args, 'Shift-M') == [field]
    trained_here = dict(meta, held_out=0, param_overrides={}, model_config=dict(
        num_classes=1, in_channels=1, pool=True, preact=False, final_activation='sigmoid', dropout_rate=0.0))
    assert real_data.mismatches(trained_here, args, 'Shift-M') == []


def _rewrite_meta(path, target, **changes):
    """Copy the checkpoint at ``path`` to ``target`` with its meta changed (None deletes a key)."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    for key, value in changes.items():
        if value is None:
            del checkpoint['meta'][key]
        else:
            checkpoint['meta'][key] = value
    torch.save(checkpoint, target)


def train_in_this_process(command, stdout, stderr, cwd):
    """``subprocess.run`` of the benchmark's training command, run in this process: a new Python
    process costs about 10 s of imports per model, and the test below trains four (the command
    itself runs as a process in the test after it)."""
    assert command[1] == str(real_data.REPO / 'train_mvtec.py') and cwd == real_data.REPO
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
        try:
            code = train_mvtec.main(command[2:])
        except SystemExit as stop:
            code = stop.code
    return subprocess.CompletedProcess(command, code)


@pytest.mark.slow
def test_benchmark_keeps_matching_models_and_retrains_stale_ones(tiny_mvtec, tmp_path, monkeypatch,
                                                                 capsys):
    """A finished model of the requested run is kept; one of an older generator is set aside and
    retrained, and so is an interrupted run of another budget (not resumed)."""
    monkeypatch.setattr(real_data.subprocess, 'run', train_in_this_process)
    root, name = tiny_mvtec
    out = tmp_path / 'bench'
    base = ['--data-dir', str(root), '--category', name, '--out', str(out), '--res-scale', '0.25',
            '--epochs', '1', '--batch-size', '2', '--workers', '0', '--device', 'cpu',
            '--settings', 'FPI', '--train-only']
    assert real_data.main(base) == 0
    paths = SimpleNamespace(out=str(out), category=name)
    final, last = real_data.model_path(paths, 'FPI'), real_data.checkpoint_path(paths, 'FPI')
    assert last == final.with_name(f'last_{name}_fpi.pt')
    assert read_meta(final)['generator_version'] == GENERATOR_VERSION
    written = final.stat().st_mtime_ns
    assert real_data.main(base) == 0
    assert final.stat().st_mtime_ns == written and not list(final.parent.glob('stale_*'))

    assert (out / 'logs' / f'{name}_FPI.log').is_file()  # a log of each category and setting
    outputs = [output for suffix in ('', '_flip_average', '_partial', '_flip_average_partial')
               for output in real_data.output_files(out, suffix)]
    for output in outputs:  # an earlier evaluation's, of the model about to be set aside
        output.write_text(f'## {name}: res-scale 0.25 ...')
    other = tmp_path / 'other'  # and the tables of another category
    other.mkdir()
    for output in real_data.output_files(other, ''):
        output.write_text('## carpet: res-scale 0.25 ...')
    real_data.remove_outputs(SimpleNamespace(out=str(other), category=name))
    assert all(output.is_file() for output in real_data.output_files(other, ''))
    _rewrite_meta(final, final, generator_version=None)  # as trained before the field existed
    assert real_data.main(base) == 0
    assert not any(output.exists() for output in outputs)
    assert read_meta(final)['generator_version'] == GENERATOR_VERSION
    stale = sorted(p.name for p in final.parent.glob('stale_*'))
    assert len(stale) == 2 and stale[0].endswith(final.name) and stale[1].endswith(last.name)
    assert 'generator_version' not in read_meta(final.parent / stale[0])

    # an interrupted run of 3 epochs (a last checkpoint, no final model) is not resumed for 1 epoch;
    # set aside with the same time stamp as the earlier stale files, it does not replace them
    train_config = dict(read_meta(final)['train_config'], epochs=3)
    _rewrite_meta(final, last, train_config=train_config)
    final.unlink()
    stamp = int(stale[1].split('_')[1])
    os.utime(last, (stamp, stamp))
    assert real_data.main(base) == 0
    assert read_meta(final)['train_config']['epochs'] == 1
    stale_now = sorted(p.name for p in final.parent.glob('stale_*'))
    assert set(stale) < set(stale_now) and len(stale_now) == 3
    assert read_meta(final.parent / (set(stale_now) - set(stale)).pop())['train_config']['epochs'] == 3

    # a model named twice would count twice in the tables
    for twice in (['FPI', 'FPI'], ['FPI', 'FPI-0']):
        capsys.readouterr()
        assert real_data.main(base[:-3] + ['--train-only', '--settings'] + twice) == 1
        assert (f'real_data: --settings FPI and {twice[1]} name the same model (FPI, seed 0); give each model once'
                in capsys.readouterr().err)

    # a training the script refuses (the data moved: resuming is another run) stops the benchmark
    # with the end of its log
    shutil.copytree(root, tmp_path / 'moved')
    moved = [str(tmp_path / 'moved') if arg == str(root) else arg for arg in base]
    capsys.readouterr()
    assert real_data.main(moved) == 1
    error = capsys.readouterr().err
    assert 'real_data: FPI: training failed (exit status 1)' in error and 'cannot resume' in error


@pytest.mark.slow
def test_benchmark_trains_and_tables_a_decoder_and_cutpaste_3way(tiny_mvtec, tmp_path, capsys, monkeypatch):
    """End to end on a tiny category: CutPaste's classifier is scored by a Gaussian density, and
    only its row has the pooled image AUROC, equal to the one-class module's own evaluation."""
    root, name = tiny_mvtec
    out = tmp_path / 'bench'
    base = ['--data-dir', str(root), '--category', name, '--out', str(out), '--res-scale', '0.25',
            '--epochs', '1', '--batch-size', '2', '--workers', '0', '--device', 'cpu']
    assert real_data.main(base + ['--settings', 'CutPaste', 'CutPaste-3way', '--bf16']) == 0
    table = pd.read_csv(out / 'real_data.csv').set_index('setting')
    assert list(table.index) == ['CutPaste', 'CutPaste-3way']
    assert table.loc['CutPaste-3way', 'method'] == 'CutPaste (3-way classifier) + Gaussian density'
    assert np.isnan(table.loc['CutPaste', 'image AUROC (pooled)'])

    path = real_data.model_path(SimpleNamespace(out=str(out), category=name), 'CutPaste-3way')
    model, meta = read_model(path, 'cpu')
    assert meta['train_config']['bf16'] is True  # --bf16 reached the training script
    values, _ = one_class.evaluate_two_stage(model, load_normal_set(str(root), meta),
                                             load_test_set(str(root), meta), ['gde'])['gde']
    for column, metric in (('image AUROC (pooled)', 'image_auroc_pooled'),
                           ('image AUROC (mean)', 'image_auroc_mean'), ('pixel AUROC', 'pixel_auroc')):
        assert table.loc['CutPaste-3way', column] == pytest.approx(values[metric])

    # tabulating the decoder alone (nothing trained again) has no pooled column; a model of another
    # budget than the heading states is left out of the tables (and the run fails), the others kept
    assert real_data.main(base + ['--settings', 'CutPaste', '--evaluate-only']) == 0
    assert 'image AUROC (pooled)' not in pd.read_csv(out / 'real_data.csv').columns
    capsys.readouterr()
    other_budget = [('2' if arg == '1' and base[i - 1] == '--epochs' else arg) for i, arg in enumerate(base)]
    assert real_data.main(other_budget + ['--settings', 'CutPaste', '--evaluate-only']) == 1
    error = capsys.readouterr().err
    assert "real_data: CutPaste: " in error
    assert "was trained with other ['epochs'] than this run states; left out" in error
    assert real_data.main(base + ['--settings', 'CutPaste', '--evaluate-only']) == 0
    plain = (out / 'real_data.md').read_text()
    evaluate_model = real_data.evaluate_model
    monkeypatch.setattr(real_data, 'evaluate_model', lambda args, key, device: (
        evaluate_model(args, key, device) if key == 'CutPaste' else exec('raise ValueError("maps contains NaN")')))
    assert real_data.main(base + ['--settings', 'CutPaste-3way', 'CutPaste', '--evaluate-only']) == 1
    error = capsys.readouterr().err
    assert 'real_data: CutPaste-3way: maps contains NaN' in error and 'left out of the tables: CutPaste-3way' in error
    assert (out / 'real_data.md').read_text() == plain  # the whole run's table stays
    partial = (out / 'real_data_partial.md').read_text()  # the others' table, saying what it lacks
    assert 'Left out (see the run\'s errors): CutPaste-3way.' in partial and '| CutPaste ' in partial
    assert (out / 'heatmaps_partial.png').is_file()
    monkeypatch.setattr(real_data, 'evaluate_model', evaluate_model)
    # a missing model too (it was printed and left out, and the whole run's table replaced without it)
    assert real_data.main(base + ['--settings', 'CutPaste', 'CutPaste-1', '--evaluate-only']) == 1
    error = capsys.readouterr().err
    assert 'real_data: CutPaste-1: no trained model at' in error and 'left out of the tables: CutPaste-1' in error
    assert (out / 'real_data.md').read_text() == plain
    assert 'Left out (see the run\'s errors): CutPaste-1.' in (out / 'real_data_partial.md').read_text()
    # a whole run's tables make the partial ones out of date: they are removed
    assert real_data.main(base + ['--settings', 'CutPaste', '--evaluate-only']) == 0
    assert not (out / 'real_data_partial.md').exists() and not (out / 'heatmaps_partial.png').exists()
    assert 'removed the tables and figures of an earlier partial run: real_data_partial.md' in capsys.readouterr().out

    # flip averaging writes its own tables and figure beside the plain ones; not for a classifier
    plain = (out / 'real_data.md').read_text()
    assert 'recipe table, BCE settings trained with bce' in plain.splitlines()[0]  # the heading says what ran
    assert real_data.main(base + ['--settings', 'CutPaste', '--evaluate-only', '--flip-average']) == 0
    assert (out / 'real_data.md').read_text() == plain
    assert (out / 'heatmaps_flip_average.png').is_file()
    averaged = pd.read_csv(out / 'real_data_flip_average.csv').set_index('setting')
    model, meta = read_model(real_data.model_path(SimpleNamespace(out=str(out), category=name),
                                                  'CutPaste'), 'cpu')
    values = evaluate(model, load_test_set(str(root), meta), flip_average=True)
    assert averaged.loc['CutPaste', 'image AUROC (mean)'] == pytest.approx(values['image_auroc_mean'])
    assert 'maps averaged with the vertical flip' in (out / 'real_data_flip_average.md').read_text()
    assert real_data.main(base + ['--settings', 'CutPaste-3way', '--evaluate-only',
                                  '--flip-average']) == 1


def test_an_unreadable_model_or_test_set_is_one_line_naming_it(tiny_mvtec, tmp_path, capsys, monkeypatch):
    root, name = tiny_mvtec
    out = tmp_path / 'bench'
    base = ['--data-dir', str(root), '--category', name, '--out', str(out), '--res-scale', '0.25',
            '--epochs', '1', '--batch-size', '2', '--workers', '0', '--settings', 'FPI']
    path = real_data.model_path(SimpleNamespace(out=str(out), category=name), 'FPI')
    path.parent.mkdir(parents=True)
    path.write_bytes(b'garbage')  # a half-copied model, say
    for extra in ([], ['--evaluate-only']):
        capsys.readouterr()
        assert real_data.main(base + extra) == 1
        error = capsys.readouterr().err
        assert error.startswith('real_data: ') and f'cannot read checkpoint {path}' in error
        assert 'Traceback' not in error
    # a test set that cannot be evaluated stops the run before anything is trained
    monkeypatch.setattr(real_data, 'train', lambda *args: pytest.fail('trained'))
    shutil.rmtree(root / name / 'test' / 'good')
    assert real_data.main(base) == 1
    assert capsys.readouterr().err.startswith('real_data: ') and path.read_bytes() == b'garbage'


def test_relative_paths_mean_the_same_folders_to_the_training_run(tmp_path, monkeypatch):
    """The training subprocess runs from the repository's root: the paths it gets are absolute."""
    monkeypatch.chdir(tmp_path)
    args = real_data.parse_args(['--data-dir', 'data', '--out', 'out'])
    assert (args.data_dir, args.out) == (str(tmp_path / 'data'), str(tmp_path / 'out'))


@pytest.mark.parametrize('argv,message', [
    (['--epochs', '0'], '--epochs out of range: 0'),
    (['--lr', 'nan'], '--lr out of range: nan'),
    (['--res-scale', '0'], '--res-scale out of range: 0.0'),
    (['--device', 'gpu'], "unknown device 'gpu'"),
    (['--train-only', '--flip-average'], '--flip-average applies to the evaluation, and --train-only evaluates'),
])
def test_bad_budgets_are_refused_before_any_model_is_set_aside(argv, message, capsys):
    with pytest.raises(SystemExit):
        real_data.parse_args(['--data-dir', 'data', '--out', 'out'] + argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('flags, passed', [([], []), (['--no-standardize-input'], ['--no-standardize-input']),
                                           (['--standardize-input'], ['--standardize-input'])])
def test_the_input_standardisation_flag_reaches_the_training_command(tmp_path, monkeypatch, flags, passed):
    commands = []
    monkeypatch.setattr(real_data.subprocess, 'run',
                        lambda command, **kwargs: commands.append(command) or SimpleNamespace(returncode=0))
    args = real_data.parse_args(['--data-dir', 'data', '--out', str(tmp_path), '--recipe', 'auto'] + flags)
    real_data.train(args, 'Shift-M')
    assert [flag for flag in commands[0] if 'standardize-input' in flag] == passed
