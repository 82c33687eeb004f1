"""Setting keys -> generator arguments; per-category and chest X-ray parameters."""
import io

import cv2
import pytest
import torch

from experiments import settings
from experiments.settings import (CATEGORY_PARAMS, KIND_DEFAULTS, category_params, chest_xray_self_sup_args,
                                  mvtec_self_sup_args, paper_setting_key, parse_setting,
                                  training_epochs)
from self_sup_data.self_sup_tasks import SyntheticAnomaly

PAPER_SEEDS = (923874273, 2388222932, 676346783, 123425)

# base -> (mode without -M, label_mode, shift, resize, same, uses gamma, loss, activation)
EXPECTED_BASES = {
    'Shift': (cv2.NORMAL_CLONE, 'binary', True, True, False, True, 'bce', 'sigmoid'),
    'Shift-Intensity': (cv2.NORMAL_CLONE, 'logistic-intensity', True, True, False, True, 'bce',
                        'sigmoid'),
    'Shift-Raw-Intensity': (cv2.NORMAL_CLONE, 'intensity', True, True, False, True, 'mse', 'relu'),
    'Shift-Intensity-Swap': ('swap', 'logistic-intensity', True, True, False, True, 'bce',
                             'sigmoid'),
    'FPI': ('uniform', 'continuous', False, False, False, False, 'bce', 'sigmoid'),
    'FPI-Poisson': (cv2.NORMAL_CLONE, 'logistic-intensity', False, False, False, False, 'bce',
                    'sigmoid'),
    'CutPaste': ('swap', 'binary', True, False, True, False, 'bce', 'sigmoid'),
}
POISSON = ('Shift', 'Shift-Intensity', 'Shift-Raw-Intensity', 'FPI-Poisson')


def all_key_forms():
    for base in EXPECTED_BASES:
        for mixed in ((False, True) if base in POISSON else (False,)):
            for seed in (None,) + PAPER_SEEDS:
                key = base + ('-M' if mixed else '') + ('' if seed is None else f'-{seed}')
                yield key, base, mixed, seed


@pytest.mark.parametrize('key,base,mixed,seed', list(all_key_forms()))
def test_every_key_form_parses_to_its_base_arguments(key, base, mixed, seed):
    mode, label_mode, shift, resize, same, gamma, loss, activation = EXPECTED_BASES[base]
    if mixed:
        mode = cv2.MIXED_CLONE
    s = parse_setting(key)
    assert (s.key, s.base, s.mixed, s.seed) == (key, base, mixed, seed)
    args = s.self_sup_args
    assert (args['mode'], args['label_mode'], args['shift'], args['resize'], args['same']) == (
        mode, label_mode, shift, resize, same)
    assert args['gamma_params'] == ((2, 0.05, 0.03) if gamma else None)
    assert (s.loss, s.final_activation) == (loss, activation)
    slug = base.lower().replace('-', '_') if base != 'CutPaste' else 'cut_paste'
    assert s.dir_name == slug + ('_m' if mixed else '')
    assert s.fname == s.dir_name + ('' if seed is None else f'_{seed}')
    assert s.run_seed == (settings.DEFAULT_SEED if seed is None else seed)
    assert key == s.seedless_key + ('' if seed is None else f'-{seed}')
    assert parse_setting(s.seedless_key).seed is None


def test_examples_from_the_paper():
    s = parse_setting('Shift-Intensity-M-923874273')
    assert (s.base, s.mixed, s.seed, s.self_sup_args['mode']) == (
        'Shift-Intensity', True, 923874273, cv2.MIXED_CLONE)
    assert s.fname == 'shift_intensity_m_923874273'
    assert s.run_name('zipper') == 'zipper_shift_intensity_m_923874273'
    cut = parse_setting('CutPaste').self_sup_args
    assert (cut['mode'], cut['same']) == ('swap', True)


@pytest.mark.parametrize('key', ['shift', 'Shift-X', 'Shift--1', 'Shift-M-M', 'Shift-1-M', '',
                                 'Shift-Intensity-', 'Shift-Intensity-Swap2', 'NSA', None, 3,
                                 'Shift-Intensity\n', 'Shift-\u0661\u0662', 'Shift-007', 'Shift-00'])
def test_unknown_keys_raise_with_the_valid_forms(key):
    with pytest.raises(ValueError, match='BASE\\[-M\\]\\[-SEED\\].*Shift-Intensity-Swap'):
        parse_setting(key)


@pytest.mark.parametrize('key', ['CutPaste-M', 'FPI-M-3', 'Shift-Intensity-Swap-M'])
def test_mixed_gradients_only_for_poisson_bases(key):
    with pytest.raises(ValueError, match='-M .*only'):
        parse_setting(key)


def test_cutpaste_three_way_is_a_classifier_setting():
    s = parse_setting('CutPaste-3way-7')
    assert (s.base, s.seed, s.fname, s.model) == ('CutPaste-3way', 7, 'cut_paste_3way_7', 'classifier')
    assert (s.loss, s.final_activation) == ('cross_entropy', 'identity')
    assert s.self_sup_args['cutpaste_patch_generation'] and s.self_sup_args['same']
    assert parse_setting('CutPaste-3').base == 'CutPaste'  # a seed, not the 3-way task
    assert parse_setting('Shift').model == 'enc_dec'
    with pytest.raises(ValueError, match='-M .*only'):
        parse_setting('CutPaste-3way-M')
    args = mvtec_self_sup_args(s, 'bottle')
    assert args['cutpaste_patch_generation'] and args['mode'] == 'swap'


def test_setting_is_frozen():
    with pytest.raises(AttributeError):
        parse_setting('Shift').seed = 3


def test_object_category_arguments_follow_the_paper():
    args = mvtec_self_sup_args(parse_setting('Shift-Intensity'), 'screw')
    assert args['width_bounds_pct'] == ((0.03, 0.12), (0.03, 0.12))
    assert args['num_patches'] == 4
    assert args['intensity_logistic_params'] == (1, 3)
    assert args['skip_background'] == (200, 60)
    assert (args['min_object_pct'], args['min_overlap_pct']) == (0.5, 0.25)
    assert args['resize_bounds'] == (0.7, 1.3)
    assert args['gamma_params'] == (2, 0.05, 0.03)
    assert args['mode'] == cv2.NORMAL_CLONE and args['label_mode'] == 'logistic-intensity'
    assert training_epochs(category_params('screw')) == 560
    assert training_epochs(category_params('bottle')) == 320


def test_cable_patches_span_the_released_codes_widths():
    # this project had (0.1, 0.2), which drew neither the small nor the large patches the paper's code does
    args = mvtec_self_sup_args(parse_setting('Shift'), 'cable')
    assert args['width_bounds_pct'] == ((0.05, 0.4), (0.05, 0.4))


@pytest.mark.parametrize('name', ['cable', 'transistor'])
def test_objects_without_background_have_no_mask(name):
    args = mvtec_self_sup_args(parse_setting('Shift'), name)
    assert 'skip_background' not in args and args['num_patches'] == 3


def test_texture_category_arguments_follow_the_paper():
    args = mvtec_self_sup_args(parse_setting('Shift-Intensity-M'), 'wood')
    assert args['num_patches'] == 4 and args['resize_bounds'] == (0.5, 2)
    assert args['intensity_logistic_params'] == (1 / 6, 15)
    assert 'skip_background' not in args
    assert args['mode'] == cv2.MIXED_CLONE


def test_paper_tables_cover_the_fifteen_categories():
    assert set(CATEGORY_PARAMS) >= set(settings.WIDTH_BOUNDS_PCT)
    assert all(len(t) == 15 for t in (settings.WIDTH_BOUNDS_PCT, settings.NUM_PATCHES,
                                      settings.INTENSITY_LOGISTIC_PARAMS, settings.EPOCHS))
    assert set(settings.BACKGROUND) == set(settings.MIN_OBJECT_PCT) == set(settings.MIN_OVERLAP_PCT)


def test_paper_setting_key_uses_mixed_gradients_for_textures():
    assert paper_setting_key('Shift-Intensity', 'carpet') == 'Shift-Intensity-M'
    assert paper_setting_key('Shift-Intensity', 'bottle', seed=123425) == 'Shift-Intensity-123425'
    assert [paper_setting_key(base, 'carpet') for base in ('CutPaste', 'FPI', 'Shift-Intensity-Swap')] == [
        'CutPaste', 'FPI', 'Shift-Intensity-Swap']  # no -M where there is no Poisson blend
    assert parse_setting('Shift-0').seed == 0 and parse_setting('Shift-10').seed == 10


def test_custom_category_uses_texture_defaults_unless_object():
    texture = mvtec_self_sup_args(parse_setting('Shift'), 'my_fabric')
    assert texture['num_patches'] == 4 and texture['resize_bounds'] == (0.5, 2)
    obj = mvtec_self_sup_args(parse_setting('Shift'), 'my_part', kind='object')
    assert obj['num_patches'] == 3 and obj['resize_bounds'] == (0.7, 1.3)
    assert 'skip_background' not in obj


def test_custom_category_params_are_data(monkeypatch):
    monkeypatch.setitem(CATEGORY_PARAMS, 'my_tile', dict(intensity_logistic_params=(0.5, 2),
                                                         background=(0, 10), min_object_pct=0.4))
    args = mvtec_self_sup_args(parse_setting('Shift-Intensity'), 'my_tile')
    assert args['intensity_logistic_params'] == (0.5, 2)
    assert args['skip_background'] == (0, 10) and args['min_object_pct'] == 0.4
    assert 'min_overlap_pct' not in args  # generator default


def test_a_calibrated_recipe_keeps_the_object_mask_and_the_budget_of_the_table_entry():
    bottle = category_params('bottle', use_entry=False)  # the start of --recipe auto and search
    assert (bottle['background'], bottle['min_object_pct'], bottle['min_overlap_pct']) == ((200, 60), 0.7, 0.25)
    assert bottle['num_patches'] == KIND_DEFAULTS['object']['num_patches']  # the recipe: defaults
    assert bottle['intensity_logistic_params'] == KIND_DEFAULTS['object']['intensity_logistic_params']
    assert category_params('magnetic_tile', use_entry=False) == KIND_DEFAULTS['texture']  # no mask there
    # nor the training budget, which no calibration sets: the paper's 560 epochs of screw stay
    screw = category_params('screw', use_entry=False)
    assert screw['epochs'] == category_params('screw')['epochs'] == 560
    assert screw['num_patches'] == KIND_DEFAULTS['object']['num_patches']


def test_overrides_and_flags():
    setting = parse_setting('Shift-Intensity')
    args = mvtec_self_sup_args(setting, 'bottle',
                               overrides=dict(num_patches=2, intensity_logistic_params=(1, 5),
                                              width_bounds_pct=((0.1, 0.2), (0.1, 0.3)),
                                              background=None),
                               single_patch=False, use_mask=False, ellipse=True,
                               cutpaste_patch_gen=True)
    assert args['num_patches'] == 2 and args['intensity_logistic_params'] == (1, 5)
    assert args['width_bounds_pct'] == ((0.1, 0.2), (0.1, 0.3))
    assert 'skip_background' not in args  # --no_mask
    assert args['num_ellipses'] == settings.NUM_ELLIPSES
    assert args['cutpaste_patch_generation'] is True
    assert mvtec_self_sup_args(setting, 'bottle', single_patch=True)['num_patches'] == 1
    assert training_epochs(category_params('bottle'), ellipse=True) == 320 + 240
    with pytest.raises(KeyError, match='num_patchs'):
        mvtec_self_sup_args(setting, 'bottle', overrides=dict(num_patchs=2))


def test_chest_xray_arguments():
    args = chest_xray_self_sup_args(parse_setting('Shift-Intensity-M'))
    assert args['gamma_params'] == (2, 0.03, 0.05)
    assert args['num_patches'] == 3 and args['intensity_logistic_params'] == (1 / 2, 4)
    assert args['skip_background'] == (0, 20)
    assert (args['min_object_pct'], args['min_overlap_pct']) == (0.7, 0.7)
    assert training_epochs(settings.chest_xray_params()) == 240
    assert chest_xray_self_sup_args(parse_setting('FPI'))['gamma_params'] is None


def test_arguments_are_plain_types_that_load_with_weights_only():
    args = mvtec_self_sup_args(parse_setting('Shift-Intensity-M-1'), 'capsule', ellipse=True)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == args


def test_command_line_overrides():
    import argparse
    parser = argparse.ArgumentParser()
    settings.add_task_arguments(parser)
    args = parser.parse_args(['--width-bounds', '0.05', '0.2', '0.1', '0.3', '--num-patches', '2',
                              '--background', '0', '20', '--gamma', '2', '0.03', '0.05', '--no_mask'])
    assert settings.param_overrides(args) == dict(
        width_bounds_pct=((0.05, 0.2), (0.1, 0.3)), num_patches=2, background=(0, 20),
        gamma_params=(2, 0.03, 0.05))
    sup = settings.self_sup_args_from_args(parse_setting('Shift'),
                                           category_params('x', overrides=settings.param_overrides(args)),
                                           args)
    assert 'skip_background' not in sup and sup['gamma_params'] == (2, 0.03, 0.05)
    for bad in (['--num-patches', '0'], ['--width-bounds', '0.2', '0.1', '0.1', '0.2']):
        with pytest.raises(ValueError):
            settings.param_overrides(parser.parse_args(bad))
    for brightness, threshold in (('nan', '10'), ('300', '10'), ('-1', '10'), ('0', '-1'), ('0', 'inf'), ('0', 'nan')):
        with pytest.raises(ValueError, match=r"^--background must be BRIGHTNESS THRESHOLD with BRIGHTNESS a grey level "
                                             r"from 0 to 255 \(of the images as read, 8 bits\) and THRESHOLD a finite "
                                             rf"value >= 0, got {brightness} {threshold}$"):
            settings.param_overrides(parser.parse_args(['--background', brightness, threshold]))
    assert settings.param_overrides(parser.parse_args(['--background', '255', '0']))['background'] == (255, 0)


def test_clip_at_border_reaches_only_the_settings_that_shift_patches():
    assert category_params('carpet')['clip_at_border'] is False  # the paper's placement
    assert category_params('magnetic_tile')['clip_at_border'] is True  # its defects reach the border
    for key in ('Shift-Intensity-M', 'Shift-Intensity-Swap', 'CutPaste', 'CutPaste-3way'):
        assert mvtec_self_sup_args(parse_setting(key), 'magnetic_tile')['clip_at_border'] is True
        assert 'clip_at_border' not in mvtec_self_sup_args(parse_setting(key), 'carpet')
    for key in ('FPI', 'FPI-Poisson'):  # patches stay where they were in the source image
        assert 'clip_at_border' not in mvtec_self_sup_args(parse_setting(key), 'magnetic_tile')


def test_clip_at_border_from_the_command_line():
    import argparse
    parser = argparse.ArgumentParser()
    settings.add_task_arguments(parser)
    setting = parse_setting('Shift-Intensity')
    for argv, expected in ((['--clip-at-border'], True), (['--no-clip-at-border'], False), ([], True)):
        args = parser.parse_args(argv)
        params = category_params('magnetic_tile', overrides=settings.param_overrides(args))
        sup = settings.self_sup_args_from_args(setting, params, args)
        assert sup.get('clip_at_border', False) is expected
    args = parser.parse_args(['--clip-at-border'])
    assert settings.param_overrides(args) == dict(clip_at_border=True)
    assert mvtec_self_sup_args(setting, 'carpet', overrides=settings.param_overrides(args))['clip_at_border']


def test_paste_fraction_reaches_only_the_poisson_blending_settings():
    overrides = dict(paste_fraction=(0.2, 0.6))
    for key in ('Shift-Intensity-M', 'Shift', 'FPI-Poisson-M'):
        setting = parse_setting(key)
        assert mvtec_self_sup_args(setting, 'carpet', overrides=overrides)['paste_fraction'] == (0.2, 0.6)
        assert 'paste_fraction' not in mvtec_self_sup_args(setting, 'carpet')  # the paper's seamless blend
    for key in ('Shift-Intensity-Swap', 'FPI', 'CutPaste'):  # nothing is blended
        assert 'paste_fraction' not in mvtec_self_sup_args(parse_setting(key), 'carpet', overrides=overrides)
        assert 'paste_fraction' not in mvtec_self_sup_args(parse_setting(key), 'magnetic_tile')
    # magnetic_tile's tuned value: its seamless blends are invisible
    assert mvtec_self_sup_args(parse_setting('Shift-Intensity-M'), 'magnetic_tile')['paste_fraction'] == (0.5, 1)


def test_normal_fraction_from_the_command_line():
    import argparse
    parser = argparse.ArgumentParser()
    settings.add_task_arguments(parser)
    setting = parse_setting('Shift-Intensity-M')
    args = parser.parse_args(['--normal-fraction', '0.25'])
    assert settings.param_overrides(args) == dict(normal_fraction=0.25)
    sup = settings.self_sup_args_from_args(
        setting, category_params('carpet', overrides=settings.param_overrides(args)), args)
    assert sup['normal_fraction'] == 0.25
    SyntheticAnomaly(**sup)  # valid generator arguments
    # unset: the paper's, absent from the parameters and the generator's arguments (a model's
    # metadata), so that runs from before the option resume and merge with runs after it
    assert 'normal_fraction' not in category_params('carpet')
    assert 'normal_fraction' not in mvtec_self_sup_args(setting, 'carpet')
    with pytest.raises(ValueError, match='--normal-fraction: normal_fraction must be a number in'):
        settings.param_overrides(parser.parse_args(['--normal-fraction', '1']))


def test_paste_fraction_from_the_command_line():
    import argparse
    parser = argparse.ArgumentParser()
    settings.add_task_arguments(parser)
    args = parser.parse_args(['--paste-fraction', '0.25', '0.75'])
    assert settings.param_overrides(args) == dict(paste_fraction=(0.25, 0.75))
    sup = settings.self_sup_args_from_args(parse_setting('Shift-Intensity-M'),
                                           category_params('carpet', overrides=settings.param_overrides(args)),
                                           args)
    SyntheticAnomaly(**sup)  # valid generator arguments
    assert sup['paste_fraction'] == (0.25, 0.75)
    for bad in (['--paste-fraction', '0.75', '0.25'], ['--paste-fraction', '0', '1.5']):
        with pytest.raises(ValueError, match='--paste-fraction'):
            settings.param_overrides(parser.parse_args(bad))
