"""Training scripts: input errors end in one line and write nothing; short real runs; resume."""
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import train_chest_xray
import train_mvtec
from conftest import make_mvtec_category, save_checkpoint
from experiments import cli, mvtec_tasks
from experiments.settings import trained_model_path
from experiments.training import cpu_has_bf16, last_checkpoint_path, load_model
from self_sup_data.images import image_span, read_image, resize
from self_sup_data.self_sup_tasks import GENERATOR_VERSION

FAST = ['--epochs', '2', '--batch-size', '3', '--res-scale', '0.25', '--workers', '0',
        '--no-figures', '--checkpoint-every', '100']


def run_error(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize('argv,expected', [
    (['-s', 'Shift-Intensty'], 'unknown setting key'),
    (['-s', 'CutPaste-M'], '-M (mixed gradients) applies only'),
    (['-s', 'Shift', '-n', 'carpet'], "category 'carpet' not found"),
    (['-s', 'Shift', '-c', 'object'], "no object categories in {root}: found tiny, textures by their names (MVTec "
                                      "AD's grouping; other names are textures unless --kind object); pass --kind "
                                      "object to treat them as objects, or choose with -n NAME"),
    (['-s', 'Shift', '-c', 'texture', '--kind', 'object'], 'found tiny, objects by --kind object; pass --kind texture'),
    (['-s', 'Shift', '--num-patches', '0'], '--num-patches'),
    (['-s', 'Shift', '--width-bounds', '0.1', '0.6', '0.1', '0.2'], '--width-bounds'),
    (['-s', 'Shift', '--batch-size', '-1'], '--batch-size'),
    (['-s', 'Shift', '--res-scale', '0'], '--res-scale'),
    (['-s', 'Shift', '--epochs', '4', '--swa-epochs', '4'], '--swa-epochs must be less than --epochs (4), got 4'),
    (['-s', 'Shift', '--swa-epochs', '-3'], '--swa-epochs must be 0 or more, got -3'),
    (['-s', 'Shift', '--swa-epochs', '100000'], "--swa-epochs must be less than the 320 epochs that category 'tiny' "
                                                "trains for without --epochs, got 100000; pass --epochs"),
    (['-s', 'Shift', '--checkpoint-minutes', '-5'], '--checkpoint-minutes must be 0 or more, got -5.0'),
    (['-s', 'Shift', '--checkpoint-minutes', 'nan'], '--checkpoint-minutes must be 0 or more, got nan'),
])
def test_mvtec_input_errors_write_nothing(tiny_mvtec, tmp_path, capsys, argv, expected):
    root, _ = tiny_mvtec
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, argv + ['-d', str(root), '-o', str(out)], capsys)
    assert expected.format(root=root) in message and 'train_mvtec.py: error:' in message
    assert not out.exists()


@pytest.mark.slow
def test_a_second_model_of_the_seed_under_the_output_folder_is_refused_before_training(tiny_mvtec, tmp_path, capsys):
    root, name = tiny_mvtec
    out = tmp_path / 'out'
    argv = ['-s', 'Shift-1', '-d', str(root), '-o', str(out), '--epochs', '1', '--evaluate']
    model = save_checkpoint(out, 'Shift', name, 'texture', seed=0)
    train_mvtec.plan(train_mvtec.parse_args(argv))  # another seed's model: fine
    copy = out / 'backup' / 'final_1.pt'
    save_checkpoint(out / 'backup', 'Shift-1', name, 'texture', seed=1).rename(copy)  # a copy of seed 1 elsewhere
    final = trained_model_path(out, train_mvtec.settings.parse_setting('Shift-1'), name)
    message = run_error(train_mvtec.main, argv, capsys)
    assert (f"--evaluate would find two models of category '{name}', setting 'Shift', seed 1: {copy} and {final} "
            f"(the model this run writes); keep one model per seed under OUT_DIR") in message
    assert not final.exists()
    train_mvtec.plan(train_mvtec.parse_args(argv[:-1]))  # without --evaluate nothing reads them together
    message = run_error(train_mvtec.main, ['-s', 'Shift-0'] + argv[2:], capsys)  # the twin of Shift's seed 0
    assert f"{model} is a run of Shift, which trains seed 0 as Shift-0 does; use -s Shift" in message
    copy.unlink()
    seed_0 = save_checkpoint(out / 'backup', 'Shift', name, 'texture', seed=0)  # two models of seed 0 already
    message = run_error(train_mvtec.main, argv, capsys)
    assert f"--evaluate would find two models of category '{name}', setting 'Shift', seed 0: " in message
    assert str(model) in message and str(seed_0) in message and 'this run writes' not in message


def test_missing_data_dir_and_unwritable_output(tiny_mvtec, tmp_path, capsys):
    root, name = tiny_mvtec
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(tmp_path / 'nowhere'),
                                           '-o', str(tmp_path / 'out')], capsys)
    assert 'nowhere' in message and 'does not exist' in message
    assert not (tmp_path / 'out').exists()
    blocker = tmp_path / 'file.txt'
    blocker.write_text('not a folder')
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(root), '-n', name,
                                           '-o', str(blocker / 'out')], capsys)
    assert 'cannot write to output folder' in message


def test_without_a_data_folder_category_choices_are_refused(tmp_path, capsys):
    for choice in (['-n', 'bottle'], ['-c', 'object']):
        message = run_error(train_mvtec.main, ['-s', 'Shift', '-o', str(tmp_path / 'out')] + choice, capsys)
        assert message == (f"train_mvtec.py: error: {' '.join(choice)} chooses categories of a data folder, and "
                           f"there is none: pass -d DATA_DIR (without it, the built-in demo category "
                           f"demo_texture trains)")
        assert not (tmp_path / 'out').exists()


def test_an_evaluation_folder_that_is_a_file_is_refused_before_training(tiny_mvtec, tmp_path, capsys):
    root, name = tiny_mvtec
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'eval').write_text('a file')
    for data in (['-d', str(root), '-n', name, '--evaluate'], []):  # real data, the demo
        message = run_error(train_mvtec.main, ['-s', 'Shift', '-o', str(tmp_path / 'out')] + data, capsys)
        assert f"cannot write to output folder {tmp_path / 'out' / 'eval'}: " in message and 'is a file' in message
        assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['eval']


def test_a_file_where_a_folder_of_the_run_or_its_evaluation_should_be_is_refused_before_training(
        tiny_mvtec, tmp_path, capsys):
    """The evaluation's figures and tables folders, and the run's folder: a file in the way is named before
    anything is trained (it failed the evaluation, or the run, only after training or calibration)."""
    root, name = tiny_mvtec
    out = tmp_path / 'out'
    for in_the_way, folder, options in (('eval/figures', 'eval/figures', ['--evaluate']),
                                        ('eval/tables', 'eval/tables', ['--evaluate']),
                                        ('shift', f'shift/{name}', [])):
        shutil.rmtree(out, ignore_errors=True)
        (out / in_the_way).parent.mkdir(parents=True, exist_ok=True)
        (out / in_the_way).write_text('a file')
        message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(root), '-n', name, '-o', str(out)]
                            + options + [flag for flag in FAST if flag != '--no-figures'], capsys)
        assert message == (f"train_mvtec.py: error: cannot write to output folder {out / folder}: "
                           f"{out / in_the_way} is a file")
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()) == [in_the_way]
    # without figures, a file named figures is no folder of the evaluation's
    shutil.rmtree(out)
    (out / 'eval').mkdir(parents=True)
    (out / 'eval' / 'figures').write_text('a file')
    cli.check_evaluation_dir(out / 'eval', figures=False)


def test_unknown_category_lists_the_found_ones(tmp_path, capsys):
    make_mvtec_category(tmp_path / 'data', 'gears', n_train=2)
    make_mvtec_category(tmp_path / 'data', 'fabric', n_train=2)
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-n', 'gear',
                                           '-o', str(tmp_path / 'out')], capsys)
    assert "'gear' not found" in message and 'fabric, gears' in message
    # a format given without -n: its layout named, not MVTec AD's train/good
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(tmp_path / 'data'), '--format', 'loco',
                                           '-o', str(tmp_path / 'out')], capsys)
    assert (f"no categories in {tmp_path / 'data'} (loco layout: <cat>/defects_config.json, "
            f"<cat>/train/good/*.png") in message and message.endswith('found: none')


@pytest.mark.slow
def test_training_a_tiny_category_lowers_the_loss_and_resume_skips_it(tiny_mvtec, tmp_path, capsys):
    root, name = tiny_mvtec
    out = tmp_path / 'out'
    argv = ['-s', 'Shift-Intensity-M-7', '-d', str(root), '-o', str(out), '-n', name] + FAST
    assert train_mvtec.main(argv) == 0
    path = trained_model_path(out, 'Shift-Intensity-M-7', name)
    assert path == out / 'shift_intensity_m' / name / f'final_{name}_shift_intensity_m_7.pt'
    assert last_checkpoint_path(path.parent, f'{name}_shift_intensity_m_7').is_file()
    printed = capsys.readouterr().out
    assert f"train_mvtec.py: {name}_shift_intensity_m_7: trained on 6 images; model in {path}\n" in printed
    model, meta = load_model(path)
    assert (meta['setting'], meta['category'], meta['seed'], meta['kind']) == (
        'Shift-Intensity-M-7', name, 7, 'texture')
    assert (meta['train_size'], meta['in_channels'], meta['res_scale']) == (64, 1, 0.25)
    assert meta['self_sup_args']['label_mode'] == 'logistic-intensity'
    assert meta['self_sup_args']['mode'] == 2  # cv2.MIXED_CLONE
    assert meta['model_config']['final_activation'] == 'sigmoid'
    assert meta['generator_version'] == GENERATOR_VERSION
    losses = meta['epoch_losses']
    assert len(losses) == 2 and losses[-1] < losses[0]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)

    modified = path.stat().st_mtime_ns
    capsys.readouterr()
    assert train_mvtec.main(argv + ['--resume']) == 0
    assert 'skipping' in capsys.readouterr().out
    assert path.stat().st_mtime_ns == modified


@pytest.mark.slow
def test_category_groups_and_overrides_reach_the_run(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'gears', n_train=2)
    make_mvtec_category(data, 'fabric', n_train=2)
    args = train_mvtec.parse_args(['-s', 'Shift-Intensity', '-d', str(data), '-o', str(tmp_path / 'out'),
                                   '-c', 'object', '--kind', 'object', '--logistic', '0.5', '3',
                                   '--no_mask', '--single_patch', '--res-scale', '0.25',
                                   '--swa-epochs', '20', '--swa-lr', '2e-4', '--loss', 'bce-bf16'])
    setting, _, categories, _ = train_mvtec.plan(args)
    assert categories == ['fabric', 'gears']
    dataset, model, config, meta, _ = train_mvtec.prepare_run(args, setting, data, 'gears')
    assert meta['kind'] == 'object' and meta['self_sup_args']['num_patches'] == 1
    assert meta['self_sup_args']['intensity_logistic_params'] == (0.5, 3)
    assert config.epochs == 320 and config.batch_size == 64 and config.lr == 1e-3
    assert (config.swa_epochs, config.swa_lr) == (20, 2e-4)  # checked against the default epochs
    assert config.loss == 'bce-bf16'
    assert model.config['in_channels'] == dataset.in_channels == 1


def test_a_run_whose_blends_are_too_small_for_its_crops_is_warned_of(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'tiles', n_train=2)
    argv = ['-s', 'Shift-Intensity', '-d', str(data), '-o', str(tmp_path / 'out'), '--recipe', 'table',
            '--res-scale', '0.125', '--width-bounds', '0.05', '0.2', '0.05', '0.2']  # 32-pixel crops, 8-pixel blends
    args = train_mvtec.parse_args(argv)
    setting, _, _, _ = train_mvtec.plan(args)
    with pytest.warns(UserWarning, match=r'training samples: width_bounds_pct .* 32 x 32 pixels'):
        train_mvtec.prepare_run(args, setting, data, 'tiles')
    args = train_mvtec.parse_args(argv[:-5] + ['--width-bounds', '0.05', '0.4', '0.05', '0.4'])
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        train_mvtec.prepare_run(args, setting, data, 'tiles')


def test_demo_weight_averaging_longer_than_its_budget_is_refused_before_the_demo_is_written(tmp_path, capsys):
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, ['-s', 'Shift', '--swa-epochs', str(train_mvtec.DEMO_EPOCHS),
                                           '-o', str(out)], capsys)
    assert (f"--swa-epochs must be less than the {train_mvtec.DEMO_EPOCHS} epochs that category 'demo_texture' "
            f"trains for") in message
    assert not out.exists()


@pytest.mark.slow
def test_demo_mode_generates_the_demo_data_and_a_small_budget(tmp_path, capsys):
    args = train_mvtec.parse_args(['-s', 'Shift-Intensity', '-o', str(tmp_path)])
    _, data_dir, categories, _ = train_mvtec.plan(args)
    assert data_dir == tmp_path / 'demo_data' and categories == ['demo_texture']
    assert (data_dir / 'demo_texture' / 'train' / 'good').is_dir()
    assert (args.epochs, args.batch_size, args.res_scale) == (
        train_mvtec.DEMO_EPOCHS, train_mvtec.DEMO_BATCH_SIZE, train_mvtec.DEMO_RES_SCALE)
    assert 'demo dataset' in capsys.readouterr().out
    assert args.evaluate is True  # the quick start ends with the evaluation


@pytest.mark.slow
def test_evaluate_ends_training_with_the_evaluation_of_every_seed_of_the_setting(tmp_path, capsys):
    data, out = tmp_path / 'data', tmp_path / 'out'
    make_mvtec_category(data, 'tiles')
    argv = ['-s', 'Shift-7', '-d', str(data), '-o', str(out), '--recipe', 'table'] + FAST
    assert train_mvtec.main(argv) == 0
    assert not (out / 'eval').exists()  # off by default on real data
    capsys.readouterr()
    assert train_mvtec.main(argv + ['--resume', '--evaluate']) == 0  # finished: evaluated only
    printed = capsys.readouterr().out.splitlines()
    results = pd.read_csv(out / 'eval' / 'results.csv')
    assert len(results) == 1 and results['setting'][0] == 'Shift' and results['seed'][0] == 7
    row = next(line.split() for line in printed if line.startswith('tiles'))
    assert row[:3] == ['tiles', 'Shift', '7']
    assert [float(v) for v in row[3:]] == pytest.approx(
        [results[m][0] for m in cli.SUMMARY_COLUMNS], abs=5e-4)

    # a second seed into the same folder: the tables hold both seeds, not the last one alone
    argv[1] = 'Shift-8'
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*trained differently')  # the same arguments
        assert train_mvtec.main(argv + ['--evaluate']) == 0
    printed = capsys.readouterr().out.splitlines()
    results = pd.read_csv(out / 'eval' / 'results.csv')
    assert sorted(results['seed']) == [7, 8] and set(results['setting']) == {'Shift'}
    rows = [line.split() for line in printed if line.split()[:2] == ['tiles', 'Shift']]
    assert sorted(row[2] for row in rows) == ['7', '8']
    table = pd.read_csv(out / 'eval' / 'tables' / 'image_auroc_mean.csv')
    assert '±' in table.to_string()  # mean ± std over the two seeds

    # another setting into the same folder: the tables keep the other setting's results
    shift_results = results.set_index('seed')
    argv[1] = 'FPI-7'
    assert train_mvtec.main(argv + ['--evaluate']) == 0
    printed = capsys.readouterr().out
    results = pd.read_csv(out / 'eval' / 'results.csv')
    assert sorted(zip(results['setting'], results['seed'])) == [('FPI', 7), ('Shift', 7), ('Shift', 8)]
    kept = results[results['setting'] == 'Shift'].set_index('seed')
    pd.testing.assert_frame_equal(kept, shift_results, check_dtype=False, check_like=True)  # as evaluated before
    assert "the tables also hold 2 earlier results of other settings, categories or seeds" in printed
    assert [line.split()[:3] for line in printed.splitlines() if line.startswith('tiles  ')] == [['tiles', 'FPI', '7']]
    assert set(pd.read_csv(out / 'eval' / 'tables' / 'image_auroc_mean.csv').columns) >= {'Shift', 'FPI'}

    # a model deleted since leaves the tables; an unreadable results file leaves this evaluation's
    trained_model_path(out, 'Shift-8', 'tiles').unlink()
    assert train_mvtec.main(argv + ['--evaluate', '--resume']) == 0
    assert (f"note: 1 earlier results left out of the tables: their models are gone, were written again or given "
            f"other thresholds since they were evaluated, e.g. {trained_model_path(out, 'Shift-8', 'tiles')}"
            ) in capsys.readouterr().out
    results = pd.read_csv(out / 'eval' / 'results.csv')
    assert sorted(zip(results['setting'], results['seed'])) == [('FPI', 7), ('Shift', 7)]
    (out / 'eval' / 'results.csv').write_text('not,a results table\n')
    assert train_mvtec.main(argv + ['--evaluate', '--resume']) == 0
    assert f"cannot read the results {out / 'eval' / 'results.csv'}" in capsys.readouterr().err
    assert list(pd.read_csv(out / 'eval' / 'results.csv')['setting']) == ['FPI']


@pytest.mark.slow
def test_evaluate_keeps_two_stage_results_and_leaves_out_flip_averaged_ones_and_other_kinds(tmp_path, capsys):
    data, out = tmp_path / 'data', tmp_path / 'out'
    for category in ('tiles', 'grain'):
        make_mvtec_category(data, category)
    argv = ['-s', 'Shift', '-d', str(data), '-o', str(out), '--recipe', 'table', '--no-figures'] + FAST
    assert train_mvtec.main(argv) == 0
    evaluation = ['-m', str(out), '-d', str(data), '-o', str(out / 'eval'), '--no-figures']

    def evaluated():
        results = pd.read_csv(out / 'eval' / 'results.csv')
        return sorted(zip(results['category'], results['setting'], results['flip_average']))

    mvtec_tasks.main(evaluation + ['--one-class', 'gde'])
    # tiles evaluated again by the training command: the two-stage results of its model stay
    assert train_mvtec.main(argv + ['-n', 'tiles', '--resume', '--evaluate']) == 0
    assert evaluated() == [('grain', 'Shift', False), ('grain', 'Shift+GDE', False),
                           ('tiles', 'Shift', False), ('tiles', 'Shift+GDE', False)]
    # flip-averaged results are not merged with plain ones
    mvtec_tasks.main(evaluation + ['--flip-average'])
    capsys.readouterr()
    assert train_mvtec.main(argv + ['-n', 'tiles', '--resume', '--evaluate']) == 0
    assert ('note: 1 earlier results left out of the tables: they were evaluated with --flip-average'
            in capsys.readouterr().out)
    assert evaluated() == [('tiles', 'Shift', False)]
    # a category trained as another kind: its earlier results of the first kind leave the tables
    assert train_mvtec.main(argv + ['-n', 'grain', '--resume', '--evaluate']) == 0
    assert train_mvtec.main(argv[:1] + ['FPI'] + argv[2:] + ['-n', 'tiles', '--kind', 'object', '--evaluate']) == 0
    assert ('note: 1 earlier results left out of the tables: this evaluation gives their categories (tiles) '
            'another kind' in capsys.readouterr().out)
    assert evaluated() == [('grain', 'Shift', False), ('tiles', 'FPI', False)]
    assert set(pd.read_csv(out / 'eval' / 'tables' / 'image_auroc_mean.csv').columns) >= {'Shift', 'FPI'}


@pytest.mark.slow
def test_evaluate_checks_the_test_masks_before_training_and_may_score_images_only(tmp_path,
                                                                                  capsys):
    """Defect images without masks (image-level labels only) stop --evaluate before anything is
    trained, naming the image and the flag; with --allow-missing-masks the run ends with image
    figures and undefined pixel figures."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    make_mvtec_category(data, 'plates', with_masks=False)
    argv = ['-s', 'Shift-7', '-d', str(data), '-o', str(out), '--recipe', 'table',
            '--evaluate'] + FAST
    error = run_error(train_mvtec.main, argv, capsys)
    assert 'plates/test/crack/000.png' in error and '--allow-missing-masks' in error
    assert not list(out.rglob('*.pt'))
    make_mvtec_category(tmp_path / 'normal_only', 'plates', defects={})
    error = run_error(train_mvtec.main, argv[:3] + [str(tmp_path / 'normal_only')] + argv[4:],
                      capsys)
    assert "the test set of 'plates' has no defect images" in error
    assert not list(out.rglob('*.pt'))

    with pytest.warns(UserWarning, match='plates: 3 of 3 defect images have no mask'):
        assert train_mvtec.main(argv + ['--allow-missing-masks']) == 0
    printed = capsys.readouterr()
    row = next(line.split() for line in printed.out.splitlines()
               if line.split()[:2] == ['plates', 'Shift'])
    image_mean, image_max, pixel_auroc, au_pro = (float(value) for value in row[3:])
    assert 0 <= image_mean <= 1 and 0 <= image_max <= 1
    assert math.isnan(pixel_auroc) and math.isnan(au_pro)
    assert 'note: plates: pixel metrics: no defect image has a mask' in printed.err

    # a model whose evaluation fails: the run ends with status 1, naming it
    model_path = trained_model_path(out, 'Shift-7', 'plates')
    checkpoint = torch.load(model_path, weights_only=True)
    checkpoint['model'] = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v
                           for k, v in checkpoint['model'].items()}
    checkpoint['meta'].pop('weights_sha256', None)
    torch.save(checkpoint, model_path)
    with pytest.warns(UserWarning, match='no mask'):
        assert train_mvtec.main(argv + ['--allow-missing-masks', '--resume']) == 1
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1].startswith('failed: plates Shift seed 7')
    assert 'results failed (nothing was written, and the output folder keeps the files' in error
    assert (f"warning: the tables in {out / 'eval'} still show 1 results of models gone, trained again or given "
            f"other thresholds since they were evaluated, e.g. {model_path}") in error


def test_evaluate_reads_every_test_image_and_mask_before_training(tmp_path, capsys):
    """An unreadable test image, or a mask of another size than its image, stops --evaluate
    before anything is trained (not in the evaluation after the whole training budget)."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    category = make_mvtec_category(data, 'plates')
    argv = ['-s', 'Shift-7', '-d', str(data), '-o', str(out), '--recipe', 'table',
            '--evaluate'] + FAST
    broken = category / 'test' / 'good' / '001.png'
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    error = run_error(train_mvtec.main, argv, capsys)
    assert f'cannot read image {broken}' in error
    assert not out.exists() or not list(out.rglob('*.pt'))

    make_mvtec_category(data, 'plates')  # whole again
    mask = category / 'ground_truth' / 'crack' / '002_mask.png'
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    error = run_error(train_mvtec.main, argv, capsys)
    assert f'mask {mask} is 32x32' in error and 'plates/test/crack/002.png is 64x64' in error
    assert not out.exists() or not list(out.rglob('*.pt'))


def write_chest_images(folder, count=4, size=64):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        image = (60 + 120 * rng.random((size // 8, size // 8))).astype(np.uint8)
        Image.fromarray(image).resize((size, size), Image.BICUBIC).save(folder / f'{i:05d}.png')
        names.append(f'{i:05d}.png')
    return names


@pytest.mark.slow
def test_chest_xray_training_and_errors(tmp_path, capsys):
    names = write_chest_images(tmp_path / 'images')
    listing = tmp_path / 'norm_train.txt'
    listing.write_text('\n'.join(names) + '\n')
    out = tmp_path / 'out'
    base = ['-s', 'Shift-Intensity', '-d', str(tmp_path / 'images'), '-o', str(out), '--res', '64',
            '--epochs', '1', '--batch-size', '2', '--workers', '0', '--no-figures']
    assert train_chest_xray.main(base + ['-l', str(listing)]) == 0
    model, meta = load_model(trained_model_path(out, 'Shift-Intensity', 'chest_xray'))
    assert meta['dataset'] == 'chest_xray' and meta['self_sup_args']['gamma_params'] == (2, 0.03, 0.05)
    assert meta['train_config']['epochs'] == 1 and meta['in_channels'] == 1
    assert meta['generator_version'] == GENERATOR_VERSION
    assert meta['train_names'] == names and meta['train_size'] == 32  # the evaluation's checks and crop
    assert meta['train_image_shape'] == dict(aspect=[1.0, 1.0], long_side=[64, 64])  # predict.py's notes
    spans = [image_span(resize(read_image(tmp_path / 'images' / name), meta['low_res'])) for name in names]
    assert meta['train_image_span'] == [min(spans), max(spans)]  # as read and resized for training
    # the list rewritten at the same path with other images (as the list builder does): another run
    listing.write_text('\n'.join(names[1:]) + '\n')
    message = run_error(train_chest_xray.main, base + ['-l', str(listing), '--resume'], capsys)
    assert 'other arguments' in message and 'normal_list_sha256' in message
    # the same images in another order, or images of the same names in another folder: another run
    other = [f'b/{name}' for name in write_chest_images(tmp_path / 'images' / 'b')]
    for listed in (names[::-1], other):
        listing.write_text('\n'.join(listed) + '\n')
        message = run_error(train_chest_xray.main, base + ['-l', str(listing), '--resume'], capsys)
        assert 'other arguments' in message and 'normal_list_order_sha256' in message
    # the same list, an image replaced under its name: another run
    listing.write_text('\n'.join(names) + '\n')
    image = tmp_path / 'images' / names[0]
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    message = run_error(train_chest_xray.main, base + ['-l', str(listing), '--resume'], capsys)
    assert 'other arguments' in message and 'train_contents_sha256' in message
    assert 'normal_list' not in message.split('other arguments')[1]

    listing.write_text('\n'.join(names + ['missing.png']) + '\n')
    fresh = tmp_path / 'fresh'
    message = run_error(train_chest_xray.main,
                        base[:5] + [str(fresh)] + base[6:] + ['-l', str(listing)], capsys)
    assert 'missing.png' in message and not fresh.exists()
    listing.write_text('\n'.join(names + names[:1]) + '\n')  # a name repeated: its image weighted twice
    message = run_error(train_chest_xray.main,
                        base[:5] + [str(fresh)] + base[6:] + ['-l', str(listing)], capsys)
    assert (f"file list {listing} names 1 images more than once, e.g. ['{names[0]}']; each training image "
            f"is listed once") in message and not fresh.exists()
    message = run_error(train_chest_xray.main, base + ['-l', str(tmp_path / 'nolist.txt')], capsys)
    assert 'nolist.txt' in message
    listing.write_text('\n'.join(names) + '\n')  # a background over every pixel would train on no patch
    message = run_error(train_chest_xray.main, base[:5] + [str(fresh)] + base[6:]
                        + ['-l', str(listing), '--background', '128', '200'], capsys)
    assert ("category 'chest_xray': --background 128 200 leaves no object pixel in any training image"
            in message)
    assert not list(fresh.rglob('*.pt'))
    message = run_error(train_chest_xray.main, ['-s', 'CutPaste-3way'] + base[2:] + ['-l', str(listing)],
                        capsys)
    assert "'CutPaste-3way' trains a classifier" in message


@pytest.mark.parametrize('module', [train_mvtec, train_chest_xray])
def test_hyphen_flags_and_the_papers_underscore_spellings_parse_alike(module):
    base = ['-s', 'Shift', '-l', 'list.txt'] if module is train_chest_xray else ['-s', 'Shift']
    hyphen = module.parse_args(base + ['--data-dir', 'd', '--out-dir', 'o', '--single-patch',
                                       '--cutpaste-patch-gen', '--no-mask', '--no-pool'])
    underscore = module.parse_args(base + ['--data_dir', 'd', '--out_dir', 'o', '--single_patch',
                                           '--cutpaste_patch_gen', '--no_mask', '--no_pool'])
    assert vars(hyphen) == vars(underscore)
    assert (hyphen.data_dir, hyphen.out_dir) == ('d', 'o')
    assert hyphen.single_patch and hyphen.cutpaste_patch_gen and hyphen.no_mask and hyphen.no_pool


def test_class_name_flag_in_both_spellings():
    for flag in ('--class-name', '--class_name'):
        assert train_mvtec.parse_args(['-s', 'Shift', '-o', 'o', flag, 'carpet']).class_name == 'carpet'


@pytest.mark.parametrize('text,expected', [
    ('processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n', False),
    ('flags\t\t: fpu avx2 avx512f avx512_bf16\n', True),
    ('flags\t\t: fpu avx2 amx_tile amx_bf16\n', True),
    ('Features\t: fp asimd sve bf16 i8mm\n', True),  # Arm
    ('model name\t: bf16-capable marketing name\nflags\t\t: fpu avx2\n', False),  # flags only
])
def test_cpu_has_bf16_reads_the_flags_of_cpuinfo(tmp_path, text, expected):
    path = tmp_path / 'cpuinfo'
    path.write_text(text)
    assert cpu_has_bf16(path) is expected
    assert cpu_has_bf16(tmp_path / 'absent') is None  # not Linux: unknown


@pytest.mark.parametrize('has_bf16', [False, True, None])
def test_bf16_on_a_cpu_without_bf16_instructions_gets_a_note_before_training(
        tiny_mvtec, tmp_path, capsys, monkeypatch, has_bf16):
    root, name = tiny_mvtec
    monkeypatch.setattr('experiments.cli.cpu_has_bf16', lambda: has_bf16)
    trained = []
    monkeypatch.setattr(train_mvtec, 'train_unless_finished', lambda *args: trained.append(args))
    base = ['-s', 'Shift', '-d', str(root), '-n', name, '-o', str(tmp_path / 'out'), '--device', 'cpu',
            '--no-evaluate']
    for extra, noted in ((['--bf16'], has_bf16 is False), ([], False), (['--no-bf16'], False)):
        capsys.readouterr()
        assert train_mvtec.main(base + extra) == 0
        out = capsys.readouterr().out
        assert ('--bf16 on a CPU without bfloat16 instructions' in out) is noted
    assert len(trained) == 3  # the note does not stop training


@pytest.mark.parametrize('module', ['self_sup_data.demo', 'self_sup_data.chest_xray'])
def test_a_negative_seed_of_the_data_commands_is_refused_before_anything_is_written(module, tmp_path, capsys):
    import importlib
    out = str(tmp_path / 'out')
    argv = [out] if module.endswith('demo') else ['--csv', 'table.csv', '--out', out]
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(argv + ['--seed', '-1'])
    assert '--seed must be 0 or more, got -1' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command, argv', [
    ('train_mvtec.py', ['-s', 'Shift', '-o', '']),
    ('train_chest_xray.py', ['-s', 'Shift', '-d', ' ', '-l', 'list.txt', '-o', 'out']),
    ('predict.py', ['-m', 'model.pt', '-i', 'images', '', '-o', 'out']),
    ('predict.py', ['--onnx', '', '-i', 'images', '-o', 'out']),
    ('experiments.mvtec_tasks', ['-m', 'models', '-d', 'data', '-o', '']),
    ('experiments.thresholds', ['-m', '']),
    ('experiments.export', ['-m', 'model.pt', '-o', '']),
    ('self_sup_data.demo', ['']),
    ('self_sup_data.magnetic_tile', ['source', '']),
    ('self_sup_data.chest_xray', ['--csv', 'Data_Entry_2017.csv', '--out', '']),
])
def test_an_empty_path_is_refused_by_its_flag(command, argv, tmp_path, capsys, monkeypatch):
    """An unset shell variable (-o "$OUT") would otherwise mean the current folder."""
    import importlib
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(command.removesuffix('.py'))
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == (101 if command == 'predict.py' else 2)  # predict.py: could not start
    assert 'an empty path' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_evaluation_options_are_refused_before_any_model_is_read(tmp_path, capsys):
    from conftest import make_chest_test_set
    from experiments import chest_xray_tasks, mvtec_tasks
    model_dir, data_dir, normal, anomalous, _ = make_chest_test_set(tmp_path, seeds=(1,))
    out = tmp_path / 'out'
    chest = ['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '-l', str(normal), str(anomalous)]
    for main, argv, expected in (
            (mvtec_tasks.main, ['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '--batch-size', '0'],
             '--batch-size must be a positive integer, got 0'),
            (chest_xray_tasks.main, chest + ['--batch-size', '-4'], '--batch-size must be a positive integer, got -4'),
            (chest_xray_tasks.main, chest + ['--device', 'mps'], "device 'mps': this project runs on"),
            (chest_xray_tasks.main, chest + ['--device', 'cpu:1'], "device 'cpu:1': this project runs on"),
            (chest_xray_tasks.main, chest + ['--bbox-csv', str(tmp_path / 'boxes.cvs')],
             f"the bounding-box table {tmp_path / 'boxes.cvs'} (--bbox-csv) does not exist"),
            (mvtec_tasks.main, ['-m', str(model_dir), '-d', str(data_dir), '-o', str(normal / 'out')],
             f"cannot write to output folder {normal / 'out'}: {normal} is a file"),
            (chest_xray_tasks.main, chest + ['--name', ''], "--name must name the test set"),
            (chest_xray_tasks.main, chest + ['--name', '../up'], "--name must name the test set")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert expected in str(stop.value)
        assert not out.exists()  # nothing evaluated, nothing written


def test_an_evaluation_whose_every_result_failed_keeps_the_earlier_files(tmp_path, capsys):
    from types import SimpleNamespace
    from experiments.cli import run_evaluation
    figure = tmp_path / 'figures' / 'a_Shift.png'
    figure.parent.mkdir()
    figure.write_bytes(b'an earlier evaluation\'s figure')
    written = []
    failed = [dict(category='a', setting='Shift', seed=0, checkpoint='m.pt', error='ValueError: changed data')]
    with pytest.raises(SystemExit) as stop:
        run_evaluation(SimpleNamespace(out_dir=tmp_path, no_figures=False, batch_size=32, device='cpu',
                                       prog='eval'),
                       lambda figure_dir: failed,
                       written.append, 'no models')
    assert stop.value.code == 1 and written == [] and figure.is_file()
    assert 'failed: a Shift seed 0 (m.pt): ValueError: changed data' in capsys.readouterr().err
    mixed = failed + [dict(category='b', setting='Shift', seed=0, checkpoint='n.pt')]
    with pytest.raises(SystemExit):
        run_evaluation(SimpleNamespace(out_dir=tmp_path, no_figures=False, batch_size=32, device='cpu',
                                       prog='eval'),
                       lambda figure_dir: mixed,
                       written.append, 'no models')
    assert written == [mixed] and not figure.exists()  # a new evaluation: its failed figure goes


@pytest.mark.parametrize('script', ['train_mvtec.py', 'train_chest_xray.py'])
def test_a_training_script_stopped_by_ctrl_c_says_how_to_go_on(script, monkeypatch, capsys):
    import runpy
    from pathlib import Path
    from experiments import settings

    def interrupted(key):
        raise KeyboardInterrupt
    monkeypatch.setattr(settings, 'parse_setting', interrupted)  # Ctrl-C as the script starts
    listed = ['-l', 'list.txt', '-d', '.'] if script == 'train_chest_xray.py' else []
    monkeypatch.setattr('sys.argv', [script, '-s', 'Shift', '-o', 'out'] + listed)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / script), run_name='__main__')
    assert exit_info.value.code == 130  # 128 + SIGINT, as a shell reports it
    assert capsys.readouterr().err == (f"{script}: interrupted; the same command with --resume continues "
                                       f"from the last checkpoint (written every --checkpoint-minutes; a run "
                                       f"without one starts again)\n")


@pytest.mark.parametrize('module, stopped, argv, note', [
    ('thresholds', 'Detector.load', ['-m', 'model.pt'], 'no thresholds were stored'),
    ('export', 'export', ['-m', 'model.pt'], 'nothing was written'),
    ('mvtec_tasks', 'evaluate_checkpoints', ['-m', 'models', '-o', 'OUT'],
     'OUT/results.csv and its tables are written as a whole when an evaluation ends (an interrupt while they '
     'are written waits for them; its figures as each model is evaluated)'),
    ('chest_xray_tasks', 'evaluate_checkpoints', ['-m', 'models', '-o', 'OUT', '-d', 'data', '-l', 'n', 'a'],
     'OUT/results.csv and its tables are written as a whole when an evaluation ends (an interrupt while they '
     'are written waits for them; its figures as each model is evaluated)')])
def test_a_command_stopped_by_ctrl_c_says_what_was_kept(module, stopped, argv, note, tmp_path, monkeypatch, capsys):
    import importlib
    command = importlib.import_module(f'experiments.{module}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    owner, _, name = stopped.rpartition('.')
    monkeypatch.setattr(getattr(command, owner) if owner else command, name, interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.endswith(f'python -m experiments.{module}: interrupted; {note}\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_one_line_warnings_formats_inside_and_restores_after():
    from experiments.arguments import one_line_warnings
    original = warnings.formatwarning
    with pytest.raises(RuntimeError):
        with one_line_warnings('tool.py'):
            assert warnings.formatwarning(UserWarning('3 images left out'), UserWarning, 'lib.py', 7) == \
                'tool.py: warning: 3 images left out\n'
            raise RuntimeError
    assert warnings.formatwarning is original


def test_one_line_warnings_print_each_text_once():
    """A check before training and the evaluation after it warn of the same test set; a library may
    reset the warning filters between them (``resetwarnings`` here), which would show it again."""
    from experiments.arguments import one_line_warnings

    @one_line_warnings('tool.py')
    def command(texts):
        for text in texts:
            warnings.warn(text)
            warnings.resetwarnings()
    with warnings.catch_warnings(record=True) as caught:
        original = warnings.showwarning
        command(['1 mask matches no image', '2 files left out', '1 mask matches no image'])
        assert [str(w.message) for w in caught] == ['1 mask matches no image', '2 files left out']
        command(['1 mask matches no image'])  # the next command's own
        assert [str(w.message) for w in caught][2:] == ['1 mask matches no image']
        assert warnings.showwarning is original
