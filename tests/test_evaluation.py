"""Evaluation: result tables, map prediction, checkpoint evaluation and the command line."""
import math
import os
import time

import numpy as np
import pandas as pd
import pytest

from experiments import cli, tables


def record(category, kind, setting, seed, value, **more):
    return dict(category=category, kind=kind, setting=setting, seed=seed, image_auroc_mean=value, **more)


def two_group_records():
    return [
        record('bottle', 'object', 'Shift', 1, 0.90), record('bottle', 'object', 'Shift', 2, 0.80),
        record('screw', 'object', 'Shift', 1, 0.70), record('screw', 'object', 'Shift', 2, 0.50),
        record('carpet', 'texture', 'Shift', 1, 1.00), record('carpet', 'texture', 'Shift', 2, 0.60),
        record('bottle', 'object', 'FPI', None, 0.75),
        record('screw', 'object', 'FPI', None, 0.65),
        record('carpet', 'texture', 'FPI', None, 0.5),
    ]


def test_table_layout_and_mean_std_by_hand():
    table = tables.metric_table(two_group_records(), 'image_auroc_mean')
    assert list(table.index) == [('object', 'bottle'), ('object', 'screw'), ('object', 'average'),
                                 ('texture', 'carpet'), ('texture', 'average'), ('all', 'average')]
    assert list(table.columns) == ['Shift', 'FPI']
    shift = table['Shift']
    # bottle: mean 0.85, sample std of (0.9, 0.8) = 0.0707
    assert shift[('object', 'bottle')] == '0.850 ± 0.071'
    assert shift[('object', 'screw')] == '0.600 ± 0.141'
    # object average: per seed (0.8, 0.65) -> mean 0.725, std 0.106
    assert shift[('object', 'average')] == '0.725 ± 0.106'
    assert shift[('texture', 'carpet')] == '0.800 ± 0.283'
    assert shift[('texture', 'average')] == '0.800 ± 0.283'
    # total: per seed (0.8667, 0.6333) -> mean 0.75, std 0.165
    assert shift[('all', 'average')] == '0.750 ± 0.165'
    # one seed: the value alone
    assert table['FPI'][('object', 'bottle')] == '0.750'
    assert table['FPI'][('object', 'average')] == '0.700'
    assert table['FPI'][('all', 'average')] == '0.633'


def test_percent_format_and_nan():
    assert tables.format_cell(0.9724, 0.0041, percent=True) == '97.2 ± 0.4'
    assert tables.format_cell(0.9724, math.nan) == '0.972'
    assert tables.format_cell(math.nan, 0.1) == 'NaN'
    # rounded from the decimal form, so that both formats agree (0.8255 * 100 is 82.54999999999999)
    for value, fraction, percent in ((0.8255, '0.826', '82.6'), (0.8245, '0.825', '82.5'), (0.0065, '0.007', '0.7'),
                                     (1.0, '1.000', '100.0'), (0.97249999, '0.972', '97.2')):
        assert (tables.format_cell(value, math.nan), tables.format_cell(value, math.nan, percent=True)) == (
            fraction, percent)


def test_seeds_up_to_the_largest_are_kept_exactly_beside_missing_ones(tmp_path):
    big = 2 ** 62
    records = [record('a', 'object', 'Shift', seed, 0.5) for seed in (big + 1, big + 2, None)]
    assert list(tables.results_frame(records)['seed']) == [big + 1, big + 2, pd.NA]
    tables.write_results(records, tmp_path / 'results.csv')
    assert [r['seed'] for r in tables.read_results(tmp_path / 'results.csv')] == [big + 1, big + 2, None]


def test_a_category_named_average_keeps_its_row_apart_from_the_averages():
    records = [record('average', 'object', 'Shift', 1, 0.9), record('bottle', 'object', 'Shift', 1, 0.7),
               record('carpet', 'texture', 'Shift', 1, 0.2)]
    means, _ = tables.summarize(records, 'image_auroc_mean')
    assert list(means.index) == [('object', 'average'), ('object', 'bottle'), ('object', 'average of categories'),
                                 ('texture', 'carpet'), ('texture', 'average of categories'),
                                 ('all', 'average of categories')]
    assert means['Shift'].tolist() == pytest.approx([0.9, 0.7, 0.8, 0.2, 0.2, 0.6])


def test_missing_cell_makes_its_averages_nan():
    records = two_group_records() + [record('carpet', 'texture', 'CutPaste', 1, math.nan),
                                     record('bottle', 'object', 'CutPaste', 1, 0.9),
                                     record('screw', 'object', 'CutPaste', 1, 0.7)]
    means, _ = tables.summarize(records, 'image_auroc_mean')
    assert means.loc[('object', 'average'), 'CutPaste'] == pytest.approx(0.8)
    assert math.isnan(means.loc[('texture', 'average'), 'CutPaste'])
    assert math.isnan(means.loc[('all', 'average'), 'CutPaste'])
    # a category that has no record at all for a setting also leaves a NaN cell
    records = [r for r in records if not (r['category'] == 'screw' and r['setting'] == 'CutPaste')]
    means, _ = tables.summarize(records, 'image_auroc_mean')
    assert math.isnan(means.loc[('object', 'screw'), 'CutPaste'])
    assert math.isnan(means.loc[('object', 'average'), 'CutPaste'])


def test_average_without_std_when_seeds_differ():
    records = [record('a', 'texture', 'Shift', 1, 0.5), record('a', 'texture', 'Shift', 2, 0.7),
               record('b', 'texture', 'Shift', 3, 0.9), record('b', 'texture', 'Shift', 4, 0.9)]
    table = tables.metric_table(records, 'image_auroc_mean')
    # one group only: no group average, only the total
    assert list(table.index) == [('texture', 'a'), ('texture', 'b'), ('all', 'average')]
    assert table.loc[('all', 'average'), 'Shift'] == '0.750'


def test_single_category_has_no_average_rows():
    table = tables.metric_table([record('tile', 'texture', 'Shift', 1, 0.5)], 'image_auroc_mean')
    assert list(table.index) == [('texture', 'tile')]


def test_paper_layout_merges_mixed_variant_for_textures():
    records = [record('bottle', 'object', 'Shift-Intensity', 1, 0.9),
               record('bottle', 'object', 'Shift-Intensity-M', 1, 0.1),
               record('carpet', 'texture', 'Shift-Intensity', 1, 0.2),
               record('carpet', 'texture', 'Shift-Intensity-M', 1, 0.8),
               record('carpet', 'texture', 'FPI', 1, 0.6)]
    plain = tables.metric_table(records, 'image_auroc_mean')
    assert list(plain.columns) == ['Shift-Intensity', 'Shift-Intensity-M', 'FPI']
    merged = tables.metric_table(records, 'image_auroc_mean', paper_layout=True)
    column = tables.paper_column('Shift-Intensity')
    assert list(merged.columns) == [column, 'FPI']
    assert merged.loc[('object', 'bottle'), column] == '0.900'
    assert merged.loc[('texture', 'carpet'), column] == '0.800'
    assert merged.loc[('all', 'average'), column] == '0.850'
    # a category of another kind keeps its results under their own settings
    other = records + [record('magnetic_tile', None, 'Shift-Intensity', 1, 0.4),
                       record('magnetic_tile', None, 'Shift-Intensity-M', 1, 0.6)]
    merged = tables.metric_table(other, 'image_auroc_mean', paper_layout=True)
    assert list(merged.columns) == [column, 'FPI', 'Shift-Intensity', 'Shift-Intensity-M']
    assert merged.loc[('other', 'magnetic_tile'), 'Shift-Intensity-M'] == '0.600'
    assert merged.loc[('all', 'average'), 'Shift-Intensity'] == 'NaN'  # bottle and carpet have none


def test_paper_layout_keeps_a_category_without_the_merged_variant():
    """A texture with only the plain setting is a NaN row of the merged column, and its averages
    are NaN, not averages over the other categories."""
    records = [record('bottle', 'object', 'Shift', 1, 0.9),
               record('carpet', 'texture', 'Shift-M', 1, 0.8),
               record('carpet', 'texture', 'Shift', 1, 0.7),
               record('grid', 'texture', 'Shift', 1, 0.1)]
    merged = tables.metric_table(records, 'image_auroc_mean', paper_layout=True)
    column = tables.paper_column('Shift')
    assert list(merged.columns) == [column]
    assert list(merged.index) == [('object', 'bottle'), ('object', 'average'), ('texture', 'carpet'),
                                  ('texture', 'grid'), ('texture', 'average'), ('all', 'average')]
    assert merged.loc[('texture', 'grid'), column] == 'NaN'
    assert merged.loc[('texture', 'average'), column] == 'NaN'
    assert merged.loc[('all', 'average'), column] == 'NaN'
    assert merged.loc[('object', 'average'), column] == '0.900'


def test_paper_layout_files_a_failed_result_under_its_categorys_kind():
    """A checkpoint that cannot be read gets a kind guessed from its category's name; merged by
    that kind, an object's failed X-M seed would take the place of its valid X result."""
    records = [record('bolt', 'object', 'Shift', 1, 0.9), record('bolt', 'object', 'Shift', 2, 0.7),
               record('carpet', 'texture', 'Shift-M', 1, 0.8),
               record('bolt', 'texture', 'Shift-M', 1, math.nan) | dict(error='cannot read checkpoint')]
    merged = tables.metric_table(records, 'image_auroc_mean', paper_layout=True)
    assert merged.loc[('object', 'bolt'), tables.paper_column('Shift')] == '0.800 ± 0.141'
    failed_seed = dict(records[1], image_auroc_mean=math.nan, error='cannot read checkpoint', kind='texture')
    merged = tables.metric_table(records[:1] + [failed_seed] + records[2:3], 'image_auroc_mean', paper_layout=True)
    assert merged.loc[('object', 'bolt'), tables.paper_column('Shift')] == 'NaN'  # a failed seed is not left out


def test_thresholds_are_written_on_the_maps_scale_even_in_percent():
    records = [dict(record('a', 'texture', 'Shift', seed, 0.5), image_threshold_best=value,
                    image_f1_best=0.8) for seed, value in ((1, 0.0031), (2, 0.0049))]
    for percent in (False, True):
        cell = tables.metric_table(records, 'image_threshold_best', percent=percent).iloc[0, 0]
        assert cell == '0.004 ± 0.0013'
    assert tables.metric_table(records, 'image_f1_best', percent=True).iloc[0, 0] == '80.0 ± 0.0'
    assert tables.format_cell(123.456, math.nan, fraction=False) == '123.5'


def test_paper_layout_merges_two_stage_variants_too():
    records = [record('bottle', 'object', 'Shift+GDE', 1, 0.9),
               record('bottle', 'object', 'Shift-M+GDE', 1, 0.1),
               record('carpet', 'texture', 'Shift+GDE', 1, 0.2),
               record('carpet', 'texture', 'Shift-M+GDE', 1, 0.8)]
    merged = tables.metric_table(records, 'image_auroc_mean', paper_layout=True)
    assert list(merged.columns) == ['Shift+GDE (-M textures)']
    assert merged.loc[('all', 'average'), 'Shift+GDE (-M textures)'] == '0.850'


def test_duplicate_and_malformed_results_raise():
    with pytest.raises(ValueError, match="duplicate result for category 'a'"):
        tables.results_frame([record('a', 'texture', 'Shift', 1, 0.5)] * 2)
    with pytest.raises(ValueError, match='seed'):
        tables.results_frame([dict(category='a', kind='texture', setting='Shift')])
    with pytest.raises(KeyError, match='pixel_auroc'):
        tables.summarize([record('a', 'texture', 'Shift', 1, 0.5)], 'pixel_auroc')


def test_write_tables_csv_markdown_latex(tmp_path):
    built = tables.build_tables(two_group_records(), ['image_auroc_mean'])
    paths = tables.write_tables(built, tmp_path / 'tables')
    assert sorted(p.name for p in paths) == ['image_auroc_mean.csv', 'image_auroc_mean.md',
                                             'image_auroc_mean.tex']
    csv = pd.read_csv(tmp_path / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert csv.loc[('object', 'bottle'), 'Shift'] == '0.850 ± 0.071'
    markdown = (tmp_path / 'tables' / 'image_auroc_mean.md').read_text()
    assert '| object  | bottle' in markdown and '0.850 ± 0.071' in markdown
    latex = (tmp_path / 'tables' / 'image_auroc_mean.tex').read_text()
    assert r'0.850 $\pm$ 0.071' in latex and r'\begin{tabular}' in latex
    assert not list((tmp_path / 'tables').glob('.*'))  # no temporary files left
    results = tables.write_results(two_group_records(), tmp_path / 'results.csv')
    assert len(pd.read_csv(results)) == 9
    # an evaluation without that metric removes its earlier tables; other files stay
    (tmp_path / 'tables' / 'notes.txt').write_text('mine')
    built = tables.build_tables([{**r, 'pixel_auroc': 0.5} for r in two_group_records()], ['pixel_auroc'])
    tables.write_tables(built, tmp_path / 'tables')
    assert sorted(p.name for p in (tmp_path / 'tables').iterdir()) == [
        'notes.txt', 'pixel_auroc.csv', 'pixel_auroc.md', 'pixel_auroc.tex']
    # duplicates: the results are written all the same, and the error names both checkpoints
    twice = [{**record('a', 'texture', 'Shift', 0, 0.5), 'checkpoint': name} for name in ('x.pt', 'y.pt')]
    with pytest.raises(ValueError, match=r"seed 0 \(checkpoints x.pt, y.pt\); keep one"):
        tables.write_results(twice, tmp_path / 'results.csv')
    assert list(pd.read_csv(results)['checkpoint']) == ['x.pt', 'y.pt']


def test_results_read_back_as_written(tmp_path):
    records = [record('a', 'texture', 'Shift', 0, 0.5) | dict(checkpoint='a.pt', pixel_auroc=math.nan),
               record('b', 'object', 'Shift+GDE', None, math.nan) | dict(checkpoint=None, error='E'),
               record('c', 'object', 'FPI', 3, 0.25) | dict(checkpoint='c.pt', undefined='no masks'),
               record('NA', 'texture', 'FPI', 1, 0.75) | dict(checkpoint='None')]  # names pandas reads as missing
    tables.write_results(records, tmp_path / 'results.csv')
    read = tables.read_results(tmp_path / 'results.csv')
    assert [r['seed'] for r in read] == [0, None, 3, 1]
    assert [r['checkpoint'] for r in read] == ['a.pt', None, 'c.pt', 'None']
    assert [r['category'] for r in read] == ['a', 'b', 'c', 'NA']
    assert [r.get('error') for r in read] == [None, 'E', None, None]
    assert [r.get('undefined') for r in read] == [None, None, 'no masks', None]
    assert read[0]['image_auroc_mean'] == 0.5 and 'pixel_auroc' not in read[0]  # NaN: no entry, as absent
    assert read[1]['kind'] == 'object' and 'pixel_auroc' not in read[3]
    assert tables.build_tables(read, ['image_auroc_mean'])['image_auroc_mean'].equals(
        tables.build_tables(records, ['image_auroc_mean'])['image_auroc_mean'])
    # a category with results of two kinds would be one row mixing both; two settings merged by the
    # paper layout into one cell would look like two seeds
    with pytest.raises(ValueError, match=r"category 'a' has results of the kinds \['object', 'texture'\]"):
        tables.build_tables([records[0], record('a', 'object', 'Shift-M', 0, 0.5)], ['image_auroc_mean'])
    both = [record('a', 'object', 'Shift', 0, 0.5), record('a', 'object', 'Shift-M', 0, 0.7),
            record('b', 'texture', 'Shift-M', 0, 0.6), record('b', 'texture', 'Shift', 0, 0.6)]
    assert tables.build_tables(both, ['image_auroc_mean'], paper_layout=True)  # a and b: one each
    failed = record('a', 'texture', 'FPI', 0, math.nan) | dict(error='cannot read checkpoint')  # kind by name
    table = tables.build_tables(both + [failed], ['image_auroc_mean'])['image_auroc_mean']
    assert ('object', 'a') in table.index and ('texture', 'a') not in table.index  # filed by its results
    (tmp_path / 'other.csv').write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match=f"cannot read the results {tmp_path / 'other.csv'}: .*missing"):
        tables.read_results(tmp_path / 'other.csv')


def test_earlier_results_keep_only_models_unchanged_since(tmp_path):
    import os
    models = {name: tmp_path / f'{name}.pt' for name in ('same', 'retrained', 'gone')}
    for path in models.values():
        path.write_bytes(b'a model')
    records = [record(name, 'texture', 'Shift', 0, 0.5) | dict(checkpoint=str(path)) for name, path in models.items()]
    records.append(record('redone', 'texture', 'Shift', 0, 0.5) | dict(checkpoint=str(models['same'])))
    tables.write_results(records, tmp_path / 'results.csv')
    written = (tmp_path / 'results.csv').stat().st_mtime
    os.utime(models['retrained'], (written + 10, written + 10))  # trained again after the evaluation
    models['gone'].unlink()
    kept, left_out = tables.earlier_results(tmp_path / 'results.csv', lambda r: r['category'] == 'redone')
    assert [r['category'] for r in kept] == ['same']
    assert [r['category'] for r in left_out] == ['retrained', 'gone']
    assert tables.left_out_note(left_out).startswith('2 earlier results left out of the tables')
    assert tables.left_out_note([dict(left_out[0], checkpoint=None)]) is None  # a requested pair without a model
    assert tables.earlier_results(tmp_path / 'none.csv', lambda r: False) == ([], [])


def test_earlier_results_of_a_model_moved_or_copied_over_with_its_old_time_are_left_out(tmp_path):
    """With the recorded weights checksum, a checkpoint counts as unchanged by its weights, not by its
    file's time: another model moved there (mv, cp -p keep the older time) is left out, and the same
    model touched or copied without its time is kept."""
    import os
    models = {name: tmp_path / f'{name}.pt' for name in ('moved', 'touched', 'unrecorded')}
    for path in models.values():
        path.write_bytes(b'a model')
    checksums = {models['moved']: 'new weights', models['touched']: 'weights', models['unrecorded']: None}
    records = [record(name, 'texture', 'Shift', 0, 0.5) | dict(checkpoint=str(path), weights_sha256='weights')
               for name, path in models.items()]
    records[-1].pop('weights_sha256')  # a results file written before the checksum was recorded
    tables.write_results(records, tmp_path / 'results.csv')
    written = (tmp_path / 'results.csv').stat().st_mtime
    os.utime(models['moved'], (written - 10, written - 10))
    os.utime(models['touched'], (written + 10, written + 10))
    kept, left_out = tables.earlier_results(tmp_path / 'results.csv', lambda r: False,
                                            lambda path: dict(weights_sha256=checksums[path]))
    assert [r['category'] for r in kept] == ['touched', 'unrecorded']  # the last by its time
    assert [r['category'] for r in left_out] == ['moved']
    kept, _ = tables.earlier_results(tmp_path / 'results.csv', lambda r: False)  # by the files' times
    assert [r['category'] for r in kept] == ['moved', 'unrecorded']


def test_earlier_results_of_a_model_given_other_thresholds_since_are_left_out(tmp_path):
    """Precision, recall and F1 are computed at the thresholds stored in the model: a result that holds
    them, whose model was calibrated (again) since, is left out, though its weights are the same; results
    that do not use them (two-stage variants, chest X-rays: no thresholds_sha256) are compared by their
    weights alone."""
    from conftest import save_untrained_model
    from experiments.checkpoints import NO_THRESHOLDS, model_checksums, thresholds_sha256
    from experiments.thresholds import store_thresholds
    models = {name: save_untrained_model(tmp_path / f'{name}.pt', dict(setting='Shift'), checksum=True)
              for name in ('calibrated', 'recalibrated', 'untouched', 'without_thresholds')}
    first = dict(image=0.1, pixel=0.2, fpr=0.01, flip_average=False, images=3)
    for name in ('recalibrated', 'untouched', 'without_thresholds'):
        store_thresholds(models[name], first)
    records = [record(name, 'texture', 'Shift', 0, 0.5) | dict(checkpoint=str(path), **model_checksums(path))
               for name, path in models.items()]
    assert records[0]['weights_sha256'] and records[0]['thresholds_sha256'] == NO_THRESHOLDS  # none stored yet
    assert records[1]['thresholds_sha256'] == thresholds_sha256(dict(reversed(first.items())))  # keys sorted
    records[-1].pop('thresholds_sha256')  # e.g. a Shift+GDE result
    tables.write_results(records, tmp_path / 'results.csv')
    store_thresholds(models['calibrated'], first)
    for name in ('recalibrated', 'without_thresholds'):
        store_thresholds(models[name], dict(first, image=0.3, fpr=0.05))
    kept, left_out = tables.earlier_results(tmp_path / 'results.csv', lambda r: False, model_checksums)
    assert [r['category'] for r in kept] == ['untouched', 'without_thresholds']
    assert [r['category'] for r in left_out] == ['calibrated', 'recalibrated']
    assert "given other thresholds" in tables.left_out_note(left_out)


@pytest.mark.slow
def test_training_with_evaluate_leaves_out_a_result_whose_model_was_replaced_by_an_older_file(tmp_path, capsys):
    import os
    import train_mvtec
    from experiments.checkpoints import read_meta
    from experiments.settings import trained_model_path
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=4)
    base = ['-d', str(tmp_path / 'data'), '-n', 'tiny', '--epochs', '1', '--batch-size', '3', '--res-scale',
            '0.25', '--workers', '0', '--no-figures', '--recipe', 'table']
    assert train_mvtec.main(['-s', 'Shift', '-o', str(tmp_path / 'other'), '--lr', '0.01'] + base) == 0
    assert train_mvtec.main(['-s', 'Shift', '-o', str(tmp_path / 'out'), '--evaluate'] + base) == 0
    model = trained_model_path(tmp_path / 'out', 'Shift', 'tiny')
    results = pd.read_csv(tmp_path / 'out' / 'eval' / 'results.csv')
    assert list(results['weights_sha256']) == [read_meta(model)['weights_sha256']]
    other = trained_model_path(tmp_path / 'other', 'Shift', 'tiny')
    earlier = (tmp_path / 'out' / 'eval' / 'results.csv').stat().st_mtime - 100
    os.utime(other, (earlier, earlier))
    os.replace(other, model)  # as mv does: the file keeps its older time
    capsys.readouterr()
    assert train_mvtec.main(['-s', 'CutPaste', '-o', str(tmp_path / 'out'), '--evaluate'] + base) == 0
    assert '1 earlier results left out of the tables: their models are gone, were written again' in \
        capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / 'out' / 'eval' / 'results.csv')['setting']) == ['CutPaste']


def test_duplicate_results_remove_the_earlier_tables(tmp_path):
    """results.csv is replaced even when it has duplicates; the tables of the earlier results,
    which no longer match it, must not stay."""
    tables.write_report(two_group_records(), tmp_path, ['image_auroc_mean'])
    assert (tmp_path / 'tables' / 'image_auroc_mean.md').is_file()
    (tmp_path / 'tables' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='duplicate result'):
        tables.write_report(two_group_records() * 2, tmp_path, ['image_auroc_mean'])
    assert len(pd.read_csv(tmp_path / 'results.csv')) == 18
    assert [p.name for p in (tmp_path / 'tables').iterdir()] == ['notes.txt']


def test_a_table_that_cannot_be_written_leaves_the_results_and_every_table_as_they_were(tmp_path):
    """results.csv and the tables describe one evaluation: a write that fails midway (here a folder
    where a table should be) must not leave the new results beside the earlier tables."""
    records = [dict(record, pixel_auroc=0.9) for record in two_group_records()]
    tables.write_report(records, tmp_path, ['image_auroc_mean', 'pixel_auroc'])
    before = {path: path.read_bytes() for path in tmp_path.rglob('*') if path.is_file()}
    (tmp_path / 'tables' / 'pixel_auroc.csv').unlink()
    (tmp_path / 'tables' / 'pixel_auroc.csv').mkdir()
    changed = [dict(record, image_auroc_mean=0.123) for record in records]
    with pytest.raises(OSError, match='pixel_auroc.csv: Is a directory'):
        tables.write_report(changed, tmp_path, ['image_auroc_mean', 'pixel_auroc'])
    after = {path: path.read_bytes() for path in tmp_path.rglob('*') if path.is_file()}
    del before[tmp_path / 'tables' / 'pixel_auroc.csv']
    assert after == before


def test_results_csv_is_renamed_after_its_tables(tmp_path, monkeypatch):
    """A rename that fails midway leaves the files after it as they were: results.csv, which names
    what the tables show, comes last."""
    written = []
    monkeypatch.setattr(tables, 'write_atomic_set', lambda writes: written.extend(path for path, _, _ in writes))
    tables.write_report(two_group_records(), tmp_path, ['image_auroc_mean'])
    assert written[-1] == tmp_path / 'results.csv' and len(written) == 4


def test_earlier_figures_of_failed_evaluations_are_removed(tmp_path):
    from experiments import plotting
    for name in ('a_Shift.png', 'b_Shift.png', 'c_Shift.png', 'd_Shift.png'):
        (tmp_path / name).write_bytes(b'an earlier figure')
    (tmp_path / 'e_Shift.png').write_bytes(b'an earlier figure')
    records = [dict(category='a', setting='Shift', seed=0, checkpoint='a.pt'),
               dict(category='b', setting='Shift', error='E', checkpoint='b.pt'),
               dict(category='c', setting='Shift', seed=0, error='E', checkpoint='c0.pt'),
               dict(category='c', setting='Shift', seed=1, checkpoint='c1.pt'),
               dict(category='e', setting='Shift', seed=None, checkpoint=None)]  # requested, no model
    plotting.remove_failed_figures(records, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_Shift.png', 'c_Shift.png', 'd_Shift.png']


def test_earlier_figures_of_results_the_tables_no_longer_hold_are_removed(tmp_path):
    from experiments.cli import figure_files, write_evaluation
    figures = tmp_path / 'figures'
    figures.mkdir()
    names = ['a_Shift.png', 'a_b_Shift+GDE.png', 'c_Shift.png', 'c_FPI+OCSVM.png', 'notes.png', 'my_plot.png',
             'c_Shift-M.txt', 'd_Shift.png']
    for name in names:
        (figures / name).write_bytes(b'a figure')
    os.utime(figures / 'd_Shift.png', ns=(10**18, 10**18))
    earlier = figure_files(figures)  # as the evaluation starts
    (figures / 'e_Shift.png').write_bytes(b'written meanwhile by another evaluation into the folder')
    (figures / 'd_Shift.png').write_bytes(b'written again meanwhile by another evaluation')
    records = [record('a', 'texture', 'Shift', 0, 0.5, checkpoint='a.pt'),
               record('a_b', 'texture', 'Shift+GDE', 0, 0.5, checkpoint='a.pt')]
    write_evaluation(records, tmp_path, figures,
                     lambda records: tables.write_results(records, tmp_path / 'results.csv'), earlier)
    # c's figures are an earlier evaluation's; files not named as figures of a result are not the evaluation's,
    # and those written since it started are another evaluation's, whose results are still to come
    assert sorted(p.name for p in figures.iterdir()) == sorted(set(names) - {'c_Shift.png', 'c_FPI+OCSVM.png'}
                                                              | {'e_Shift.png'})
    write_evaluation(records, tmp_path, figures,  # without a record of the figures as it started: all of them
                     lambda records: tables.write_results(records, tmp_path / 'results.csv'))
    assert not (figures / 'e_Shift.png').exists() and not (figures / 'd_Shift.png').exists()


def test_figures_of_failed_evaluations_are_not_shown(tmp_path):
    from experiments import plotting
    for name in ('a_Shift.png', 'b_Shift.png'):
        (tmp_path / name).write_bytes(b'an earlier figure')
    records = [dict(category='a', setting='Shift', checkpoint='a.pt'),
               dict(category='b', setting='Shift', error='E', checkpoint='b.pt')]
    assert plotting.figure_paths(records, tmp_path) == [tmp_path / 'a_Shift.png']
    # records read back from results.csv with pandas: an empty error cell (NaN) is no failure, and an
    # empty checkpoint cell (a requested pair without a model) no model
    (tmp_path / 'c_Shift.png').write_bytes(b'an earlier figure')
    tables.write_results([record('a', 'texture', 'Shift', 0, 0.5, checkpoint='a.pt'),
                          record('b', 'texture', 'Shift', 0, math.nan, checkpoint='b.pt') | dict(error='E'),
                          record('c', 'texture', 'Shift', None, math.nan, checkpoint=None)], tmp_path / 'results.csv')
    read = pd.read_csv(tmp_path / 'results.csv').to_dict('records')
    assert plotting.figure_paths(read, tmp_path) == [tmp_path / 'a_Shift.png']


# ------------------------------------------------------------------------------ map prediction

import torch
from torch import nn

from experiments import checkpoints, mvtec_tasks, prediction


class FirstChannel(nn.Module):
    """A stand-in network: the map is the input's first channel; sides must be multiples of 32."""

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, x.shape
        return x[:, :1] + 0.0


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, masks, kind, train_size):
        self.images, self.labels, self.masks = images, labels, masks
        self.kind, self.train_size = kind, train_size
        self.has_mask = np.ones(len(images), bool)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.masks[i]


def random_test_set(kind, size, train_size, n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(n)]
    labels = [i % 2 for i in range(n)]
    masks = [torch.zeros(1, size, size) for _ in range(n)]
    for i in range(1, n, 2):
        masks[i][0, 8:24, 8:24] = 1
    return ListDataset(images, labels, masks, kind, train_size)


def test_predict_maps_objects_crop_centre_and_pad_with_zeros():
    dataset = random_test_set('object', size=80, train_size=64)
    maps = prediction.predict_maps(FirstChannel(), dataset, batch_size=2)
    assert maps.shape == (5, 80, 80) and maps.dtype == np.float32
    images = np.stack([image[0].numpy() for image in dataset.images])
    np.testing.assert_array_equal(maps[:, 8:72, 8:72], images[:, 8:72, 8:72])
    outside = np.ones((80, 80), bool)
    outside[8:72, 8:72] = False
    assert not maps[:, outside].any()


def test_predict_maps_textures_whole_image_reflect_padded():
    dataset = random_test_set('texture', size=72, train_size=64)  # 72 is no multiple of 32
    maps = prediction.predict_maps(FirstChannel(), dataset, batch_size=3)
    np.testing.assert_array_equal(maps, np.stack([image[0].numpy() for image in dataset.images]))
    # a size that is a multiple of 32 goes through unchanged; crop_size=None forces whole images
    dataset = random_test_set('object', size=64, train_size=32)
    whole = prediction.predict_maps(FirstChannel(), dataset, crop_size=None)
    np.testing.assert_array_equal(whole, np.stack([image[0].numpy() for image in dataset.images]))


@pytest.mark.slow
def test_predict_maps_with_the_real_network_is_batch_independent():
    from models.resnet import resnet18_enc_dec
    torch.manual_seed(0)
    model = resnet18_enc_dec(in_channels=3, final_activation='sigmoid')
    dataset = random_test_set('object', size=80, train_size=64)
    one = prediction.predict_maps(model, dataset, batch_size=1)
    five = prediction.predict_maps(model, dataset, batch_size=5)
    assert one.shape == (5, 80, 80)
    np.testing.assert_allclose(one, five, atol=1e-5)
    assert not model.training
    assert one[:, 8:72, 8:72].min() > 0 and one[:, :8].max() == 0


def test_predict_maps_rejects_crop_larger_than_the_image():
    dataset = random_test_set('object', size=64, train_size=96)
    with pytest.raises(ValueError, match='crop size 96 is larger than the images'):
        prediction.predict_maps(FirstChannel(), dataset)


class RowWeighted(FirstChannel):
    """A stand-in network that is not flip-equivariant: the first channel times the row index."""

    def forward(self, x):
        rows = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
        return super().forward(x) * rows


def test_flip_average_is_the_mean_of_the_map_and_the_flipped_back_map_of_the_flip():
    # row r is weighted r in the image's map and H - 1 - r in the flipped image's map flipped back,
    # so their mean weighs every row by (H - 1) / 2; 72 pixels also checks the reflect padding
    dataset = random_test_set('texture', size=72, train_size=64)
    images = np.stack([image[0].numpy() for image in dataset.images])
    plain = prediction.predict_maps(RowWeighted(), dataset, batch_size=2)
    np.testing.assert_allclose(plain, images * np.arange(72)[:, None], rtol=1e-6)
    averaged = prediction.predict_maps(RowWeighted(), dataset, batch_size=2, flip_average=True)
    np.testing.assert_allclose(averaged, images * 71 / 2, rtol=1e-6)
    # a flip-equivariant network's map is unchanged
    np.testing.assert_array_equal(
        prediction.predict_maps(FirstChannel(), dataset, flip_average=True), images)
    results, maps = prediction.evaluate(RowWeighted(), dataset, return_maps=True, flip_average=True)
    np.testing.assert_array_equal(maps, averaged)


def test_flip_average_rejects_objects():
    dataset = random_test_set('object', size=80, train_size=64)
    with pytest.raises(ValueError, match='flip averaging is for textures'):
        prediction.predict_maps(FirstChannel(), dataset, flip_average=True)


def test_evaluate_equals_metrics_of_the_predicted_maps():
    from experiments import metrics
    dataset = random_test_set('texture', size=64, train_size=64, n=6)
    for i in range(1, 6, 2):  # make the defect visible in the first channel
        dataset.images[i][0, 8:24, 8:24] += 1
    results, maps = prediction.evaluate(FirstChannel(), dataset, return_maps=True)
    labels = np.array(dataset.labels)
    masks = np.stack([m[0].numpy() for m in dataset.masks])
    assert results == metrics.evaluate_maps(labels, maps, masks)
    assert results['image_auroc_max'] == 1.0 and results['pixel_auroc'] > 0.9
    dataset.has_mask[:] = labels == 0  # no defective image has a mask: pixel metrics are NaN
    results = prediction.evaluate(FirstChannel(), dataset)
    assert results['image_auroc_max'] == 1.0
    assert all(math.isnan(results[k]) for k in ('pixel_auroc', 'pixel_ap', 'au_pro'))


# ------------------------------------------------------------------------------ checkpoints

from pathlib import Path

from conftest import RES_SCALE, make_chest_test_set, make_mvtec_category, save_checkpoint
from experiments import training
from experiments.atomic import save_torch_atomic
from experiments.settings import parse_setting
from self_sup_data.mvtec import SelfSupMVTecDataset



@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """The tiny forward passes here run faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(model_dir, data_dir): two 64-pixel categories, 'Shift' with seeds 1 and 2, 'FPI' seed 1.

    Shared by the tests of this module: they must not change it."""
    tmp_path = tmp_path_factory.mktemp('trained')
    data_dir, model_dir = tmp_path / 'data', tmp_path / 'models'
    make_mvtec_category(data_dir, 'tiles', size=64, seed=1)
    make_mvtec_category(data_dir, 'parts', size=64, seed=2, defects={'crack': 2, 'dent': 2})
    for category, kind in (('tiles', 'texture'), ('parts', 'object')):
        save_checkpoint(model_dir, 'Shift-1', category, kind, seed=1)
        save_checkpoint(model_dir, 'Shift-2', category, kind, seed=2)
        save_checkpoint(model_dir, 'FPI-1', category, kind, seed=1)
    return model_dir, data_dir


@pytest.mark.slow
def test_evaluate_checkpoints_finds_every_setting_and_seed(trained):
    model_dir, data_dir = trained
    records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir)
    assert len(records) == 6
    assert [r['setting'] for r in records] == ['Shift'] * 4 + ['FPI'] * 2  # the paper's order
    assert {(r['category'], r['kind'], r['setting'], r['seed']) for r in records} == {
        (c, k, s, seed) for c, k in (('tiles', 'texture'), ('parts', 'object'))
        for s, seed in (('Shift', 1), ('Shift', 2), ('FPI', 1))}
    for r in records:
        assert all(0 <= r[m] <= 1 for m in mvtec_tasks.METRICS), r
    # the same numbers as evaluating the loaded model directly on the rebuilt test set
    record = next(r for r in records if r['category'] == 'parts' and r['setting'] == 'FPI')
    model, meta = training.load_model(record['checkpoint'])
    side = 64  # a model without a stored test side: the earlier rule, 73 pixels rounded to 64
    dataset = SelfSupMVTecDataset(data_dir, 'parts', is_train=False, kind='object',
                                  res_scale=RES_SCALE, low_res=side)
    assert prediction.evaluate(model, dataset) == {m: record[m] for m in mvtec_tasks.METRICS}


@pytest.mark.slow
def test_evaluate_checkpoints_filters_settings_and_categories(trained):
    model_dir, data_dir = trained
    records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, settings=['Shift-2'],
                                               categories=['tiles'])
    assert [(r['category'], r['setting'], r['seed']) for r in records] == [('tiles', 'Shift', 2)]


@pytest.mark.slow
def test_evaluate_checkpoints_with_flip_average(trained):
    model_dir, data_dir = trained
    records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, settings=['FPI'],
                                               categories=['tiles'], flip_average=True)
    assert [(r['category'], r['setting']) for r in records] == [('tiles', 'FPI')]
    model, meta = training.load_model(records[0]['checkpoint'])
    dataset = mvtec_tasks.load_test_set(data_dir, meta)
    expected = prediction.evaluate(model, dataset, flip_average=True)
    assert expected == {m: records[0][m] for m in mvtec_tasks.METRICS}
    assert expected != prediction.evaluate(model, dataset)  # a real network is not flip-equivariant
    # checked before any work: an object category, a two-stage variant
    with pytest.raises(ValueError, match="object category 'parts'"):
        mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, settings=['FPI'], flip_average=True)
    with pytest.raises(ValueError, match=r"two-stage variants \['gde'\] of .*tiles"):
        mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, categories=['tiles'],
                                         one_class_names=['gde'], flip_average=True)


@pytest.mark.slow
def test_missing_checkpoint_gives_nan_and_a_warning(trained):
    model_dir, data_dir = trained
    with pytest.warns(UserWarning, match="no checkpoint for setting 'CutPaste' on category 'tiles'"):
        records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, settings=['FPI', 'CutPaste'],
                                                   categories=['tiles'])
    missing = [r for r in records if r['setting'] == 'CutPaste']
    assert len(missing) == 1 and all(math.isnan(missing[0][m]) for m in mvtec_tasks.METRICS)
    table = tables.metric_table(records, 'image_auroc_mean')
    assert list(table.columns) == ['FPI', 'CutPaste']  # the requested order
    assert table.loc[('texture', 'tiles'), 'CutPaste'] == 'NaN'
    assert table.loc[('texture', 'tiles'), 'FPI'] != 'NaN'


@pytest.mark.slow
def test_a_failed_two_stage_fit_fails_its_rows_only(tmp_path):
    data_dir, model_dir = tmp_path / 'data', tmp_path / 'models'
    make_mvtec_category(data_dir, 'one', n_train=1)  # one normal image: no one-class model to fit
    save_checkpoint(model_dir, 'Shift', 'one', 'texture')
    own_only = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, device='cpu')
    records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, device='cpu', figure_dir=tmp_path / 'figures',
                                               one_class_names=['gde', 'kde'])
    assert [r['setting'] for r in records] == ['Shift', 'Shift+GDE', 'Shift+KDE']
    own, *two_stage = records
    assert 'error' not in own and own['image_auroc_mean'] == own_only[0]['image_auroc_mean']
    assert all('a one-class model needs at least 2 samples to fit, got 1' in r['error'] for r in two_stage)
    assert all(math.isnan(r['image_auroc_mean']) for r in two_stage)
    assert [p.name for p in (tmp_path / 'figures').iterdir()] == ['one_Shift.png']


@pytest.mark.slow
def test_a_failed_one_class_model_fails_its_own_row_only(tmp_path, monkeypatch):
    from experiments import one_class
    data_dir, model_dir = tmp_path / 'data', tmp_path / 'models'
    make_mvtec_category(data_dir, 'few', n_train=4)
    save_checkpoint(model_dir, 'Shift', 'few', 'texture')
    alone = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, device='cpu', one_class_names=['kde'])

    class Broken(one_class.KernelDensityEstimator):
        def fit(self, features):
            raise ValueError('GDE: broken on purpose')
    monkeypatch.setitem(one_class.ONE_CLASS_MODELS, 'gde', Broken)
    extract_features, calls = one_class.extract_features, []
    monkeypatch.setattr(one_class, 'extract_features', lambda *args, **kwargs: calls.append(1) or extract_features(
        *args, **kwargs))
    records = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, device='cpu', one_class_names=['gde', 'kde'])
    assert len(calls) == 2  # the normal and the test images' features, once for both one-class models
    assert [r['setting'] for r in records] == ['Shift', 'Shift+GDE', 'Shift+KDE']
    assert 'GDE: broken on purpose' in records[1]['error'] and 'error' not in records[2]
    assert records[2]['image_auroc_pooled'] == alone[1]['image_auroc_pooled']


def test_two_stage_result_names_and_order():
    setting = parse_setting('Shift-Intensity-M-3')
    assert checkpoints.result_setting(setting) == 'Shift-Intensity-M'
    assert checkpoints.result_setting(setting, 'kde') == 'Shift-Intensity-M+KDE'
    assert checkpoints.split_result_setting('Shift-Intensity-M+KDE') == (
        parse_setting('Shift-Intensity-M'), 'kde')
    with pytest.raises(ValueError, match="unknown one-class model 'svdd'"):
        checkpoints.split_result_setting('Shift+SVDD')
    assert checkpoints.result_variants(setting, ['gde']) == [None, 'gde']
    assert checkpoints.result_variants(parse_setting('CutPaste-3way')) == ['gde']
    names = ['CutPaste-3way+GDE', 'Shift+OCSVM', 'Shift', 'Shift+GDE', 'FPI']
    records = [dict(setting=name, category='a', seed=None) for name in names]
    assert [r['setting'] for r in checkpoints.sort_records(records)] == [
        'Shift', 'Shift+GDE', 'Shift+OCSVM', 'FPI', 'CutPaste-3way+GDE']
    assert [r['setting'] for r in checkpoints.sort_records(records, ['FPI', 'CutPaste-3way', 'Shift'])] == [
        'FPI', 'CutPaste-3way+GDE', 'Shift', 'Shift+GDE', 'Shift+OCSVM']


def test_find_checkpoints_keeps_the_requested_dataset(tmp_path):
    for name, meta in (('final_a.pt', dict(dataset='mvtec', setting='Shift', category='a')),
                       ('sub/final_b.pt', dict(dataset='chest_xray', setting='Shift', category='chest_xray')),
                       ('final_c.pt', dict(setting='FPI', category='c')),  # no dataset: any
                       ('last_a.pt', dict(dataset='mvtec', setting='Shift', category='a'))):  # not final
        (tmp_path / name).parent.mkdir(exist_ok=True)
        save_torch_atomic(dict(model={}, meta=meta), tmp_path / name)
    assert [p.name for p, _ in checkpoints.find_checkpoints(tmp_path)] == ['final_a.pt', 'final_c.pt']
    chest = checkpoints.find_checkpoints(tmp_path, 'chest_xray')
    assert [p.name for p, _ in chest] == ['final_c.pt', 'final_b.pt']
    save_torch_atomic(dict(model={}, meta=dict(category='d')), tmp_path / 'final_d.pt')
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'final_d.pt'} has no \\['setting'\\]"):
        checkpoints.find_checkpoints(tmp_path)
    with pytest.raises(NotADirectoryError, match=r"final_a.pt is a file; the evaluation takes the folder of models "
                                                 r"\(-m\), e.g. the training command's output folder"):
        checkpoints.find_checkpoints(tmp_path / 'final_a.pt')  # a model file where its folder is asked for


def test_a_key_with_seed_0_selects_the_model_trained_without_a_seed():
    found = [('a.pt', dict(setting='Shift-Intensity', category='a')),
             ('b.pt', dict(setting='Shift-Intensity-1', category='a')),
             ('c.pt', dict(setting='Shift-Intensity-M', category='a'))]
    select = checkpoints.select_checkpoints
    assert [p for p, _ in select(found, ['Shift-Intensity-0'])] == ['a.pt']
    assert [p for p, _ in select(found, ['Shift-Intensity-0', 'Shift-Intensity-1'])] == ['a.pt', 'b.pt']
    assert [p for p, _ in select(found, ['Shift-Intensity'])] == ['a.pt', 'b.pt']
    assert select(found, ['Shift-Intensity-2']) == []
    # a string where a list belongs (a notebook's CATEGORIES = 'a') is refused, not read letter by letter
    with pytest.raises(ValueError, match=r"categories must be a list of names, e.g. \['a'\], or None; got the string"):
        select(found, None, 'a')
    with pytest.raises(ValueError, match=r"settings must be a list of names, e.g. \['Shift-Intensity'\]"):
        select(found, 'Shift-Intensity')


def test_one_class_models_given_as_a_string_are_refused_not_read_letter_by_letter(tmp_path):
    """A notebook's ONE_CLASS = 'gde' was read as the models 'g', 'd', 'e'."""
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=1)
    save_checkpoint(tmp_path / 'models', 'Shift', 'tiny', 'texture')
    with pytest.raises(ValueError, match=r"one_class_names must be a list of names, e.g. \['gde'\], or None; "
                                         r"got the string 'gde'"):
        mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', tmp_path / 'data', one_class_names='gde')


def test_a_checkpoint_path_names_its_setting_only_as_the_training_scripts_write_it():
    assert checkpoints.setting_from_path('out/shift_m/tile/final_tile_shift_m_7.pt') == 'Shift-M-7'
    assert checkpoints.setting_from_path('out/shift/tile/final_tile_shift.pt') == 'Shift'
    assert checkpoints.setting_from_path('out/shift/tile/final_tile_shift_0.pt') == 'Shift-0'
    for other in ('out/shift/tile/final_tile_shift_007.pt', 'out/shift/tile/final_tile_shift_\u0661.pt',
                  'elsewhere/final_tile_shift.pt'):
        assert checkpoints.setting_from_path(other) is None  # a renamed file: skipped with a warning


def test_find_checkpoints_leaves_out_the_recipe_search_candidates(tmp_path):
    """--recipe search writes short candidate runs of the same setting and category under
    <run dir>/search/; the evaluation must see the final run only (not a duplicate result)."""
    meta = dict(dataset='mvtec', setting='Shift', category='a')
    for name in ('search/shift/a/final_a_shift.pt', 'shift/a/search/auto/final_a_shift.pt',
                 'shift/a/final_a_shift.pt'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(dict(model={}, meta=meta), tmp_path / name)
    found = [p.relative_to(tmp_path) for p, _ in checkpoints.find_checkpoints(tmp_path / 'shift')]
    assert found == [Path('shift/a/final_a_shift.pt')]
    found = [str(p.relative_to(tmp_path)) for p, _ in checkpoints.find_checkpoints(tmp_path / 'search')]
    assert found == ['search/shift/a/final_a_shift.pt']  # a folder named search above the models
    for name in ('sweep/search/lr0.01/shift/a/final_a_shift.pt',  # a sweep's folder named search
                 'sweep/shift/search/final_search_shift.pt'):  # a category named search
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(dict(model={}, meta=meta), tmp_path / name)
    found = [str(p.relative_to(tmp_path)) for p, _ in checkpoints.find_checkpoints(tmp_path / 'sweep')]
    assert sorted(found) == ['sweep/search/lr0.01/shift/a/final_a_shift.pt',
                             'sweep/shift/search/final_search_shift.pt']


def test_find_checkpoints_leaves_out_torchscript_exports_beside_their_models(tmp_path):
    model = tmp_path / 'shift' / 'a' / 'final_a_shift.pt'
    model.parent.mkdir(parents=True)
    save_torch_atomic(dict(model={}, meta=dict(dataset='mvtec', setting='Shift', category='a')), model)
    # the export's default name (experiments.export): a TorchScript archive, which torch.load refuses
    (model.parent / f'{model.stem}{checkpoints.TORCHSCRIPT_SUFFIX}').write_bytes(b'PK\x03\x04 archive')
    unreadable = []
    assert [path for path, _ in checkpoints.find_checkpoints(tmp_path, unreadable=unreadable)] == [model]
    assert unreadable == []


def test_an_unreadable_checkpoint_and_a_missing_pair_take_the_kind_of_their_categorys_models(tmp_path):
    from conftest import save_checkpoint
    readable = save_checkpoint(tmp_path, 'Shift-1', 'widget', 'object', seed=1)  # a custom object
    readable.with_name(readable.name.replace('_1.pt', '_2.pt')).write_bytes(b'not a checkpoint')
    found = mvtec_tasks.find_evaluable(tmp_path)
    assert sorted((meta['setting'], meta['kind'], 'error' in meta) for _, meta in found) == [
        ('Shift-1', 'object', False), ('Shift-2', 'object', True)]  # not 'texture', guessed from the name
    with pytest.warns(UserWarning, match="no checkpoint for setting 'Shift-M' on category 'widget'"):
        [missing] = mvtec_tasks.missing_records(found, ['Shift', 'Shift-M'], ['widget'])
    assert (missing['setting'], missing['kind']) == ('Shift-M', 'object')


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
@pytest.mark.slow
def test_corrupt_checkpoint_gives_a_failed_row_naming_the_file(trained, tmp_path, damage):
    model_dir, data_dir = trained
    original = next(Path(model_dir).rglob('final_tiles_fpi_1.pt'))
    path = tmp_path / 'models' / 'fpi' / 'tiles' / original.name
    path.parent.mkdir(parents=True)
    path.write_bytes(original.read_bytes()[:1000] if damage == 'truncated' else b'not a checkpoint')
    [record] = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', data_dir)
    assert (record['category'], record['setting'], record['seed']) == ('tiles', 'FPI', 1)
    assert f'cannot read checkpoint {path}' in record['error']
    assert math.isnan(record['image_auroc_mean'])
    with pytest.raises(ValueError, match=f'cannot read checkpoint {path}'):
        checkpoints.find_checkpoints(tmp_path / 'models')


@pytest.mark.slow
def test_command_line_end_to_end(trained, tmp_path):
    model_dir, data_dir = trained
    out = tmp_path / 'out'
    stale = [out / '.results.csv.abcd1234.tmp', out / 'tables' / '.au_pro.md.abcd1234.tmp',
             out / 'figures' / '.tiles_Shift.png.abcd1234.tmp']  # left by a killed evaluation
    others = [out / '.final_a.pt.abcd1234.tmp',  # a training's, if OUT_DIR is its folder too: kept
              out / 'figures' / '.parts_Shift.png.efgh5678.tmp']  # written now by another evaluation: kept
    for path in stale + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'partial')
    for path in stale + others[:1]:
        os.utime(path, (time.time() - 2 * cli.REPORT_WRITE_SECONDS,) * 2)
    mvtec_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '-s', 'Shift',
                      '--device', 'cpu', '--batch-size', '4'])
    assert not any(path.exists() for path in stale) and all(path.exists() for path in others)
    others[1].unlink()
    for metric in mvtec_tasks.METRICS:
        for fmt in ('csv', 'md', 'tex'):
            assert (out / 'tables' / f'{metric}.{fmt}').is_file()
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert list(table.columns) == ['Shift']
    assert list(table.index) == [('object', 'parts'), ('object', 'average'), ('texture', 'tiles'),
                                 ('texture', 'average'), ('all', 'average')]
    assert ' ± ' in table.loc[('object', 'parts'), 'Shift']  # two seeds merged
    results = pd.read_csv(out / 'results.csv')
    assert len(results) == 4 and set(results['seed']) == {1, 2}
    assert sorted(p.name for p in (out / 'figures').iterdir()) == ['parts_Shift.png', 'tiles_Shift.png']
    # nothing evaluated (a setting without models): the earlier files stay, status 1
    earlier = {path: path.read_bytes() for path in out.rglob('*') if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:  # after a warning line for each missing pair
        mvtec_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '-s', 'CutPaste',
                          '--device', 'cpu'])
    assert str(exit_info.value.code) == (f'error: no checkpoint of the requested settings and categories '
                                         f'under {model_dir}; the earlier files in {out} are kept')
    assert {path: path.read_bytes() for path in out.rglob('*') if path.is_file()} == earlier


@pytest.mark.slow
def test_command_line_flip_average(trained, tmp_path):
    model_dir, data_dir = trained
    out = tmp_path / 'out'
    base = ['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '-s', 'FPI', '--device', 'cpu',
            '--no-figures', '--flip-average']
    mvtec_tasks.main(base + ['-n', 'tiles'])
    results = pd.read_csv(out / 'results.csv')
    expected = mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, ['FPI'], ['tiles'], flip_average=True)
    assert results.loc[0, 'image_auroc_mean'] == pytest.approx(expected[0]['image_auroc_mean'])
    with pytest.raises(SystemExit) as exit_info:  # an object category: one line, nothing written
        mvtec_tasks.main(base + ['-o', str(tmp_path / 'objects')])
    assert str(exit_info.value.code).startswith('error: flip averaging is for textures')
    assert str(exit_info.value.code).endswith('evaluate the others with -s SETTING ... or -n CATEGORY ..., '
                                              'this one without --flip-average')
    assert not (tmp_path / 'objects').exists()


@pytest.mark.slow
def test_evaluates_a_model_trained_by_train_mvtec(tmp_path):
    import train_mvtec
    make_mvtec_category(tmp_path / 'data', 'bottle', size=64, channels=3)  # an object, RGB
    assert train_mvtec.main(['-s', 'Shift-Intensity-5', '-d', str(tmp_path / 'data'),
                             '-o', str(tmp_path / 'models'), '--epochs', '1', '--res-scale', str(RES_SCALE),
                             '--batch-size', '6', '--workers', '0', '--no-figures', '--device', 'cpu']) == 0
    records = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', tmp_path / 'data',
                                               settings=['Shift-Intensity'])
    assert [(r['category'], r['kind'], r['setting'], r['seed']) for r in records] == [
        ('bottle', 'object', 'Shift-Intensity', 5)]
    assert all(0 <= records[0][m] <= 1 for m in mvtec_tasks.METRICS)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mvtec_tasks.main(['-m', str(tmp_path / 'nowhere'), '-d', str(tmp_path),
                          '-o', str(tmp_path / 'out')])
    assert exit_info.value.code != 0
    message = str(exit_info.value.code)
    assert message.startswith('error: model folder') and str(tmp_path / 'nowhere') in message
    assert '\n' not in message
    with pytest.raises(SystemExit) as exit_info:
        mvtec_tasks.main(['-m', str(tmp_path), '-d', str(tmp_path), '-o', str(tmp_path / 'out'),
                          '-s', 'Nope'])
    assert "unknown setting key 'Nope'" in str(exit_info.value.code)
    from experiments.atomic import write_text_atomic
    from experiments.cli import run_command
    (tmp_path / 'results.csv').mkdir()  # a file that cannot be written is one line too
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: write_text_atomic(tmp_path / 'results.csv', 'a,b\n'))
    assert str(exit_info.value.code).startswith(f'error: [Errno 21] cannot write {tmp_path / "results.csv"}')


# ------------------------------------------------------------------------------ chest X-rays

import shutil
import warnings

from PIL import Image

from conftest import save_untrained_model
from experiments import chest_xray_tasks, plotting


@pytest.fixture(scope='module')
def chest(tmp_path_factory):
    return make_chest_test_set(tmp_path_factory.mktemp('chest'))


@pytest.mark.slow
def test_chest_xray_evaluation_image_and_box_metrics(chest):
    model_dir, data_dir, normal, anomalous, boxes = chest
    records = chest_xray_tasks.evaluate_checkpoints(model_dir, data_dir, normal, anomalous)
    assert [(r['category'], r['setting'], r['seed']) for r in records] == [('anomalous', 'Shift', 1),
                                                                           ('anomalous', 'Shift', 2)]
    assert all(0 <= r['image_auroc_mean'] <= 1 and math.isnan(r['pixel_auroc']) for r in records)
    with_boxes = chest_xray_tasks.evaluate_checkpoints(model_dir, data_dir, normal, anomalous,
                                                       bbox_csv=boxes, settings=['Shift-1'],
                                                       test_name='male')
    assert len(with_boxes) == 1 and with_boxes[0]['category'] == 'male'
    assert with_boxes[0]['image_auroc_mean'] == records[0]['image_auroc_mean']
    assert 0 <= with_boxes[0]['pixel_auroc'] <= 1 and 0 <= with_boxes[0]['au_pro'] <= 1
    # the same numbers as the MVTec-style evaluation of the loaded model on the central square of
    # its training crops' side (the paper's CenterCrop(224) at 256; 32 at 64), the map zero outside
    model, _ = training.load_model(with_boxes[0]['checkpoint'])
    dataset = chest_xray_tasks.load_test_set(data_dir, normal, anomalous, boxes, res=64)
    expected, maps = prediction.evaluate(model, dataset, crop_size=32, return_maps=True)
    assert {m: with_boxes[0][m] for m in expected} == expected
    assert not maps[:, :16].any() and not maps[:, :, 48:].any() and maps[:, 16:48, 16:48].all()


@pytest.mark.slow
def test_chest_xray_command_line(chest, tmp_path, capsys):
    model_dir, data_dir, normal, anomalous, boxes = chest
    out = tmp_path / 'out'
    chest_xray_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out),
                           '-l', str(normal), str(anomalous), '-s', 'Shift', 'CutPaste',
                           '--name', 'male', '--device', 'cpu'])
    assert "warning: no chest X-ray checkpoint for setting 'CutPaste'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no final_\*.pt checkpoints .* \(chest X-ray models are evaluated by "
                                         r"python -m experiments.chest_xray_tasks\)"):  # the other command's
        mvtec_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(tmp_path / 'mvtec')])
    csv_tables = sorted(p.name for p in (out / 'tables').glob('*.csv'))
    assert csv_tables == ['image_ap_mean.csv', 'image_auroc_mean.csv']  # no boxes: no pixel tables
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert list(table.index) == [('chest_xray', 'male')] and list(table.columns) == ['Shift', 'CutPaste']
    assert ' ± ' in table.loc[('chest_xray', 'male'), 'Shift']
    assert pd.isna(table.loc[('chest_xray', 'male'), 'CutPaste'])
    assert [p.name for p in (out / 'figures').iterdir()] == ['male_Shift.png']
    records = pd.read_csv(out / 'results.csv').to_dict('records')
    figures = plotting.figure_paths(records, out / 'figures')
    assert figures == [out / 'figures' / 'male_Shift.png']
    # a second test set into the same folder: a row of its own beside the first
    chest_xray_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '-l', str(normal),
                           str(anomalous), '-s', 'Shift-1', '--name', 'female', '--device', 'cpu'])
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert list(table.index) == [('chest_xray', 'female'), ('chest_xray', 'male'), ('all', 'average')]
    assert ' ± ' in table.loc[('chest_xray', 'male'), 'Shift']  # as before: both seeds
    assert sorted(p.name for p in (out / 'figures').iterdir()) == ['female_Shift.png', 'male_Shift.png']
    # another setting on the first test set: its other settings' results stay
    from conftest import save_untrained_model
    other = tmp_path / 'other_models'
    save_untrained_model(other / 'fpi' / 'chest_xray' / 'final_chest_xray_fpi_1.pt',
                         dict(dataset='chest_xray', setting='FPI-1', category='chest_xray', res=64, seed=1))
    chest_xray_tasks.main(['-m', str(other), '-d', str(data_dir), '-o', str(out), '-l', str(normal),
                           str(anomalous), '--name', 'male', '--device', 'cpu', '--no-figures'])
    results = pd.read_csv(out / 'results.csv')
    assert sorted(zip(results['category'], results['setting'], results['seed'])) == [
        ('female', 'Shift', 1), ('male', 'FPI', 1), ('male', 'Shift', 1), ('male', 'Shift', 2)]
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert list(table.columns) == ['Shift', 'FPI']  # the paper's order, whichever was evaluated first
    with pytest.raises(SystemExit, match='error: file list .*missing.txt does not exist'):
        chest_xray_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out),
                               '-l', str(normal), str(tmp_path / 'missing.txt')])


@pytest.mark.slow
def test_results_kept_beside_those_of_another_model_folder_are_named(chest, tmp_path, capsys):
    from conftest import save_untrained_model
    model_dir, data_dir, normal, anomalous, _ = chest
    out = tmp_path / 'out'

    def evaluate(models, name, *extra):
        capsys.readouterr()
        chest_xray_tasks.main(['-m', str(models), '-d', str(data_dir), '-o', str(out), '-l', str(normal),
                               str(anomalous), '--name', name, '--device', 'cpu', '--no-figures', *extra])
        return [line.removeprefix('warning: ') for line in capsys.readouterr().err.splitlines()
                if 'each model folder' in line]

    assert evaluate(model_dir, 'male') == evaluate(model_dir, 'female') == []
    other = tmp_path / 'other_models'  # another seed 1 of the same setting, other weights
    save_untrained_model(other / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt',
                         dict(dataset='chest_xray', setting='Shift-1', category='chest_xray', res=64, seed=1), seed=5)
    texts = evaluate(other, 'male')
    first, second = (model_dir / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt').resolve(), \
        (other / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt').resolve()
    seed_2 = (model_dir / 'shift' / 'chest_xray' / 'final_chest_xray_shift_2.pt').resolve()
    assert texts == [f"Shift seed 1 is scored by different models in the tables' rows: {second} (male); "
                     f"{first} (female); evaluate each model folder into an output folder of its own",
                     f"male Shift: the tables merge this evaluation's seeds with earlier results of models "
                     f"outside {other}: seed 2 ({seed_2}); "
                     f"evaluate each model folder into an output folder of its own"]
    # a copy of a model elsewhere is the same model (equal weights, as training records them)
    save_untrained_model(tmp_path / 'checked' / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt',
                         dict(dataset='chest_xray', setting='Shift-1', category='chest_xray', res=64, seed=1),
                         checksum=True)
    shutil.copytree(tmp_path / 'checked', tmp_path / 'copy')
    out = tmp_path / 'out_copy'
    assert evaluate(tmp_path / 'checked', 'male') == evaluate(tmp_path / 'copy', 'female') == []


def test_a_missing_chest_test_image_is_the_commands_error_not_each_models(chest, tmp_path):
    model_dir, data_dir, normal, anomalous, _ = chest
    missing = tmp_path / 'missing.txt'
    missing.write_text(normal.read_text() + 'gone.png\n')
    with pytest.raises(FileNotFoundError, match=r"1 of 5 images of the normal list .*missing.txt are missing from "
                                                r".*gone.png"):
        chest_xray_tasks.evaluate_checkpoints(model_dir, data_dir, missing, anomalous)


def test_mixed_models_names_nothing_for_categories_or_folders_of_their_own_models(tmp_path):
    from experiments.tables import mixed_models

    def record(category, seed, folder='m'):
        checkpoint = tmp_path / folder / 'shift' / category / f'final_{category}_shift_{seed}.pt'
        return dict(category=category, setting='Shift', seed=seed, checkpoint=str(checkpoint),
                    weights_sha256=f'{folder}{category}{seed}')

    records = [record(category, seed) for category in ('carpet', 'wood') for seed in (0, 1)]
    assert mixed_models(records + [dict(category='grid', setting='Shift', seed=0, checkpoint=None)], [],
                        tmp_path / 'm') == []
    # seeds in folders of their own under the evaluated folder, one of them kept from an earlier evaluation
    assert mixed_models([record('carpet', 0, 'm/run0')], [record('carpet', 1, 'm/run1')], tmp_path / 'm') == []
    assert mixed_models([record('carpet', 0, 'm/run0')], [record('carpet', 1, 'm/run1')], tmp_path / 'm' / 'run0') == [
        f"carpet Shift: the tables merge this evaluation's seeds with earlier results of models outside "
        f"{tmp_path / 'm' / 'run0'}: seed 1 ({record('carpet', 1, 'm/run1')['checkpoint']}); evaluate each model "
        f"folder into an output folder of its own"]
    assert mixed_models([record('carpet', 0)], [record('wood', 1, 'n')], tmp_path / 'm') == []  # another row


def test_a_chest_model_and_its_unreadable_copy_are_refused_before_any_work(chest, tmp_path):
    model_dir, data_dir, normal, anomalous, _ = chest
    models = tmp_path / 'models'
    shutil.copytree(model_dir, models)
    copy = models / 'backup' / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt'
    copy.parent.mkdir(parents=True)
    copy.write_bytes((model_dir / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt').read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"two models of category 'chest_xray', setting 'Shift', seed 1: .*"
                                         r"final_chest_xray_shift_1.pt and .*backup"):
        chest_xray_tasks.evaluate_checkpoints(models, data_dir, normal, anomalous)


@pytest.mark.slow
def test_chest_xray_copies_of_training_and_normal_images_are_warned_of(tmp_path):
    (tmp_path / 'data').mkdir()
    _, data_dir, normal, anomalous, _ = make_chest_test_set(tmp_path / 'data', seeds=())
    (data_dir / 'train').mkdir()
    rng = np.random.default_rng(1)
    for name in ('t0.png', 't1.png'):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(data_dir / 'train' / name)
    meta = dict(dataset='chest_xray', setting='Shift-1', category='chest_xray', res=64, seed=1,
                train_names=['train/t0.png', 'train/t1.png'], data_dir=str(data_dir))
    model = save_untrained_model(tmp_path / 'models' / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt', meta)
    save_untrained_model(tmp_path / 'models' / 'shift' / 'chest_xray' / 'final_chest_xray_shift_2.pt',
                         dict(meta, setting='Shift-2', seed=2), seed=2)  # another seed of the same training images
    with warnings.catch_warnings():  # the test set as made: no copies
        warnings.simplefilter('error')
        chest_xray_tasks.evaluate_checkpoints(tmp_path / 'models', data_dir, normal, anomalous)
    # a training image under another name among the normal test images, a normal one among the anomalous
    shutil.copyfile(data_dir / 'train' / 't1.png', data_dir / 'seen.png')
    shutil.copyfile(data_dir / 'n2.png', data_dir / 'twice.png')
    normal.write_text(normal.read_text() + 'seen.png\n')
    anomalous.write_text(anomalous.read_text() + 'twice.png\n')
    with pytest.warns(UserWarning) as caught:
        records = chest_xray_tasks.evaluate_checkpoints(tmp_path / 'models', data_dir, normal, anomalous)
    messages = [str(warning.message) for warning in caught]
    assert sum('copies of its training images' in message for message in messages) == 1  # once for both seeds
    assert (f"anomalous: 1 of 4 anomalous images are copies of normal test images (first: {data_dir / 'twice.png'}, "
            f"the same bytes as {data_dir / 'n2.png'}): each counts as normal and as anomalous, so the figures are "
            f"biased; keep each image in one place") in messages
    assert (f"{model}: 1 of 9 test images are copies of its training images (first: {data_dir / 'seen.png'}, the "
            f"same bytes as {data_dir / 'train' / 't1.png'}): a model trained on them scores them as seen images, "
            f"so the figures are biased; keep each image in one place") in messages
    assert len(records) == 2 and not any('error' in record for record in records)  # warned of, and evaluated


@pytest.mark.slow
def test_chest_xray_results_of_the_same_lists_in_another_data_folder_are_refused(chest, tmp_path):
    model_dir, data_dir, normal, anomalous, _ = chest
    other = tmp_path / 'converted'
    other.mkdir()
    for name in normal.read_text().split() + anomalous.read_text().split():  # the same names, re-encoded
        Image.open(data_dir / name).save(other / name, compress_level=0)
    out = tmp_path / 'out'
    arguments = ['-m', str(model_dir), '-o', str(out), '--device', 'cpu', '--no-figures', '-l', str(normal),
                 str(anomalous)]
    chest_xray_tasks.main(arguments + ['-d', str(data_dir), '-s', 'Shift-1'])
    written = (out / 'results.csv').read_bytes()
    with pytest.raises(SystemExit, match=r"another test set named 'anomalous' \(the same image lists of files of "
                                         r"other sizes: another data folder \(-d\), or images replaced\)"):
        chest_xray_tasks.main(arguments + ['-d', str(other), '-s', 'Shift-2'])
    assert (out / 'results.csv').read_bytes() == written
    chest_xray_tasks.main(arguments + ['-d', str(data_dir), '-s', 'Shift-2'])  # the same files: one row
    assert sorted(pd.read_csv(out / 'results.csv')['seed']) == [1, 2]
    # results written before the files were recorded: taken to be of these files
    pd.read_csv(out / 'results.csv').drop(columns='test_files_sha256').to_csv(out / 'results.csv', index=False)
    chest_xray_tasks.main(arguments + ['-d', str(other), '-s', 'Shift-2'])
    assert sorted(pd.read_csv(out / 'results.csv')['seed']) == [1, 2]


def test_chest_xray_results_of_other_seeds_test_sets_and_kinds(chest, tmp_path, capsys):
    model_dir, data_dir, normal, anomalous, boxes = chest
    out = tmp_path / 'out'

    def evaluate(*arguments):
        chest_xray_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out), '--device', 'cpu',
                               '--no-figures', *arguments])
        return sorted(zip(*pd.read_csv(out / 'results.csv')[['category', 'seed']].to_dict('list').values()))

    assert evaluate('-l', str(normal), str(anomalous)) == [('anomalous', 1), ('anomalous', 2)]
    # one seed evaluated again: the other seed's result stays
    assert evaluate('-l', str(normal), str(anomalous), '-s', 'Shift-2') == [('anomalous', 1), ('anomalous', 2)]
    # another test set whose anomalous list has the same file name (its default row name): refused before
    # any work, the earlier results kept; with a name of its own, a row of its own
    fewer = tmp_path / 'fewer' / 'anomalous.txt'
    fewer.parent.mkdir()
    fewer.write_text('a0.png\na1.png\n')
    written = (out / 'results.csv').read_bytes()
    with pytest.raises(SystemExit, match=r"results.csv holds the results of another test set named 'anomalous' "
                                         r"\(other image lists\); name this one apart \(--name\)"):
        evaluate('-l', str(normal), str(fewer))
    assert (out / 'results.csv').read_bytes() == written
    assert evaluate('-l', str(normal), str(fewer), '--name', 'fewer') == [
        ('anomalous', 1), ('anomalous', 2), ('fewer', 1), ('fewer', 2)]
    # the same images with a box table: other pixel labels, so another test set under that name
    written = (out / 'results.csv').read_bytes()
    with pytest.raises(SystemExit, match=r"another test set named 'anomalous' \(the same images with another "
                                         r"box table \(--bbox-csv\), or with and without one\)"):
        evaluate('-l', str(normal), str(anomalous), '-s', 'Shift-2', '--bbox-csv', str(boxes))
    assert (out / 'results.csv').read_bytes() == written
    with pytest.raises(SystemExit, match='another box table'):
        evaluate('-l', str(normal), str(fewer), '--name', 'fewer', '--bbox-csv', str(boxes))
    assert (out / 'results.csv').read_bytes() == written
    # a box table that cannot be read: the command's error, naming it, before any checkpoint is evaluated
    (tmp_path / 'empty.csv').write_text('')
    with pytest.raises(SystemExit, match=r"cannot read box table .*empty.csv"):
        evaluate('-l', str(normal), str(anomalous), '--bbox-csv', str(tmp_path / 'empty.csv'))
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert sorted(table.index) == [('all', 'average'), ('chest_xray', 'anomalous'), ('chest_xray', 'fewer')]
    # another test set whose lists name the same files in other folders: other images, so refused too
    moved = tmp_path / 'moved' / 'anomalous.txt'
    moved.parent.mkdir()
    moved.write_text(''.join(f'elsewhere/{name}\n' for name in anomalous.read_text().split()))
    (data_dir / 'elsewhere').mkdir()
    try:
        for name in anomalous.read_text().split():
            (data_dir / 'elsewhere' / name).write_bytes((data_dir / name).read_bytes())
        with pytest.raises(SystemExit, match=r"another test set named 'anomalous' \(other image lists\)"):
            evaluate('-l', str(normal), str(moved))
    finally:
        shutil.rmtree(data_dir / 'elsewhere')  # (the test set is the module's)
    # a result of another kind in the folder (an MVTec category's): refused before any work, since the
    # chest tables would replace its tables; the folder is left as it was
    results = pd.read_csv(out / 'results.csv')
    mvtec_row = dict(results.iloc[0], category='bottle', kind='object', image_auroc_mean=0.99)
    pd.concat([results, pd.DataFrame([mvtec_row])]).to_csv(out / 'results.csv', index=False)
    written = {path: path.read_bytes() for path in out.rglob('*') if path.is_file()}
    with pytest.raises(SystemExit, match=r"results.csv holds 1 results of other data than chest X-rays \(kind "
                                         r"object, e.g. .*\); evaluate chest X-rays into a folder of their own"):
        evaluate('-l', str(normal), str(anomalous))
    assert {path: path.read_bytes() for path in out.rglob('*') if path.is_file()} == written
    with pytest.raises(ValueError, match='results of other data than chest X-rays'):  # the notebook's way too
        chest_xray_tasks.write_report([], out)
    assert {path: path.read_bytes() for path in out.rglob('*') if path.is_file()} == written


def test_test_images_are_read_with_the_models_channels(tmp_path):
    from PIL import Image
    from conftest import make_mvtec_category
    make_mvtec_category(tmp_path, 'grey', n_train=2)
    crack = tmp_path / 'grey' / 'test' / 'crack' / '000.png'
    grey = np.asarray(Image.open(crack))
    Image.fromarray(np.stack([grey, grey // 2, grey], axis=2)).save(crack)  # one colour image
    meta = dict(category='grey', kind='texture', res_scale=0.25)
    assert mvtec_tasks.load_test_set(tmp_path, meta).in_channels == 3  # the set's own
    dataset = mvtec_tasks.load_test_set(tmp_path, {**meta, 'in_channels': 1})  # a grey model's
    assert dataset.in_channels == 1 and all(image.shape[2] == 1 for image in dataset.images)


@pytest.mark.slow
def test_models_of_one_category_with_other_channels_each_get_their_test_set(tmp_path):
    from conftest import make_mvtec_category
    from experiments.atomic import save_torch_atomic
    from experiments.settings import parse_setting, trained_model_path
    from models.resnet import resnet18_enc_dec
    make_mvtec_category(tmp_path / 'data', 'tiles', channels=3)
    for key, channels in (('Shift', 3), ('FPI', 1)):  # e.g. a colour image held out in one run only
        model = resnet18_enc_dec(in_channels=channels, final_activation=parse_setting(key).final_activation)
        meta = dict(dataset='mvtec', setting=key, category='tiles', kind='texture', res_scale=0.25,
                    train_size=64, seed=0, in_channels=channels, model_config=model.config)
        save_torch_atomic(dict(model=model.state_dict(), meta=meta),
                          trained_model_path(tmp_path / 'models', key, 'tiles'))
    records = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', tmp_path / 'data')
    assert sorted(r['setting'] for r in records) == ['FPI', 'Shift']
    assert not any(r.get('error') for r in records)


def test_a_duplicate_without_a_seed_is_named_too():
    with pytest.raises(ValueError, match="seed <NA>; keep one model per seed"):
        tables.results_frame([dict(category='a', kind='texture', setting='Shift', seed=None, checkpoint=None)] * 2)


@pytest.mark.slow
def test_object_models_of_earlier_and_current_versions_are_each_tested_at_their_side(tmp_path):
    from conftest import make_mvtec_category, save_untrained_model
    from experiments.settings import trained_model_path
    make_mvtec_category(tmp_path / 'data', 'parts', size=96)
    for key, stored in (('FPI-1', None), ('FPI-2', 73)):  # written before test_res was stored, and now
        meta = dict(dataset='mvtec', setting=key, category='parts', kind='object', res_scale=0.25,
                    train_size=64, seed=int(key[-1]), in_channels=1, test_res=stored)
        save_untrained_model(trained_model_path(tmp_path / 'models', key, 'parts'), meta)
    sides = []
    original = mvtec_tasks.load_test_set

    def recording(data_dir, meta, *args, **kwargs):
        dataset = original(data_dir, meta, *args, **kwargs)
        sides.append(dataset.images[0].shape[0])
        return dataset
    import unittest.mock
    with unittest.mock.patch.object(mvtec_tasks, 'load_test_set', recording):
        records = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', tmp_path / 'data')
    assert sorted(sides) == [64, 73] and not any(r.get('error') for r in records)


def test_seeds_scored_on_other_test_sets_are_warned_of_in_their_row():
    def record(seed, digest, setting='Shift', category='tex'):
        return dict(category=category, setting=setting, seed=seed, test_set_sha256=digest)
    alike = [record(0, 'a'), record(1, 'a'), record(2, math.nan), record(0, 'b', 'FPI'), record(0, 'c', 'Shift', 'x')]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        mvtec_tasks.warn_seeds_on_other_test_sets(alike)  # one test set a row (a failed seed has none)
    with pytest.warns(UserWarning) as caught:
        mvtec_tasks.warn_seeds_on_other_test_sets(alike + [record(3, 'b'), record(4, 'b')])
    assert [str(warning.message) for warning in caught] == [
        "tex Shift: the seeds merged in the tables were scored on 2 different test sets (other images or masks: seeds "
        "0, 1; seeds 3, 4), so their mean mixes them; evaluate every seed on one test set (models of the folder "
        "format: python -m experiments.mvtec_tasks with --abnormal DIR [--mask-dir DIR])"]
