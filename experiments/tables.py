"""Result tables: one table per metric, categories as rows, settings as columns.

The input is the long format that the evaluation functions return: a list of dicts, one per
evaluated checkpoint, each with

    category  the category name (row)
    kind      'object' | 'texture' | any other group name (rows are grouped by it)
    setting   the setting key *without* its seed suffix (column), for a two-stage result followed
              by its one-class model (``Shift-Intensity-M+GDE``)
    seed      the seed (int) or None
    <metric>  one float per metric (NaN where it is undefined or the checkpoint is missing)

A table cell merges the seeds of one setting as ``mean ± std`` (sample standard deviation,
ddof=1); a cell with a single seed shows only the value. Values are fractions written with
three decimals (``0.972 ± 0.004``), or percent with one decimal (``97.2 ± 0.4``) when
``percent=True``; thresholds, which are values on the map's scale, with four significant digits
(``is_fraction``). An undefined cell reads ``NaN``.

Rows are the categories sorted by name inside their group (objects, then textures, then any
other group); when there is more than one group each group ends with an ``average`` row, and
when there is more than one category the table ends with the total ``average`` (group ``all``).
An average is the mean of the cells' seed means; it is NaN unless every category it covers has
a value, so a missing checkpoint never silently drops out of an average. Its ``± std`` is the
standard deviation over seeds of the per-seed averages, shown when all covered categories were
evaluated with the same two or more seeds. Where a category itself is named ``average``, the
average rows read ``average of categories`` instead, so that the two cannot be confused.
"""
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.atomic import write_atomic_set, write_text_atomic

GROUP_ORDER = ('object', 'texture')
AVERAGE = 'average'
TOTAL_GROUP = 'all'
MIXED_SUFFIX = '-M'
KEY_COLUMNS = ('category', 'kind', 'setting', 'seed')


def results_frame(records):
    """The long-format records as a DataFrame; checks the key columns and ``_check_unique``."""
    frame = _keyed_frame(records)
    _check_unique(frame)
    return frame


def _keyed_frame(records):
    """The records as a DataFrame with integer (or missing) seeds; ValueError without rows or
    without the KEY_COLUMNS."""
    records = list(records)
    frame = pd.DataFrame(records)
    missing = [c for c in KEY_COLUMNS if c not in frame.columns]
    if frame.empty or missing:
        raise ValueError(f'results need the columns {list(KEY_COLUMNS)}; '
                         f'missing {missing or "all rows"}')
    # from the records themselves: a column of integers and None is float64 in pandas, which
    # changes seeds above 2**53
    frame['seed'] = pd.array([None if pd.isna(record['seed']) else int(record['seed']) for record in records],
                             dtype='Int64')
    return frame


def failed(record):
    """Whether a result (a record, or a row of its DataFrame) is a failed evaluation: an ``error``
    text (an empty cell read back from a CSV, NaN, is none)."""
    return isinstance(record.get('error'), str)


def _failed(frame):
    """Boolean Series: the rows of failed evaluations (``failed``)."""
    return frame.apply(failed, axis=1).astype(bool)


def _check_unique(frame):
    """ValueError naming the first (category, setting, seed) with two results, and their
    checkpoints, or the first category with results of two kinds (its group: a category evaluated
    as an object and as a texture would be one row, its cells mixing both; failed results, whose
    kind may be guessed from the name alone, are not counted)."""
    evaluated = frame[~_failed(frame)]
    kinds = evaluated.groupby('category')['kind'].agg(lambda kind: sorted(set(kind.fillna('other'))))
    mixed = kinds[kinds.map(len) > 1]
    if len(mixed):
        raise ValueError(f'category {mixed.index[0]!r} has results of the kinds {mixed.iloc[0]}; '
                         f'evaluate the models of each kind into a folder of its own')
    keys = pd.Series([f'{category}|{setting}|{seed}' for category, setting, seed
                      in zip(frame['category'], frame['setting'], frame['seed'])], index=frame.index)
    duplicated = keys.duplicated(keep=False)
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        checkpoints = (frame.loc[keys == keys[duplicated].iloc[0], 'checkpoint'].dropna()
                       if 'checkpoint' in frame.columns else [])
        sources = f" (checkpoints {', '.join(map(str, checkpoints))})" if len(checkpoints) else ''
        raise ValueError(f'duplicate result for category {row.category!r}, setting {row.setting!r}, '
                         f'seed {row.seed}{sources}; keep one model per seed')


def mixed_variant(setting):
    """The ``-M`` counterpart of a column: ``X`` -> ``X-M``, ``X+GDE`` -> ``X-M+GDE``."""
    key, plus, one_class = setting.partition('+')
    return key + MIXED_SUFFIX + plus + one_class


def paper_column(setting):
    """Name of the merged column for ``setting`` (objects) and ``setting-M`` (textures)."""
    return f'{setting} (-M textures)'


def merge_paper_layout(frame):
    """The paper's layout: objects use ``X`` and textures ``X-M`` in one column ``X (-M textures)``
    (and ``X+GDE`` with ``X-M+GDE`` in ``X+GDE (-M textures)``).

    Only pairs where both ``X`` and ``X-M`` occur are merged; the objects' ``X-M`` and the
    textures' ``X`` results of such a pair are left out, every other setting stays as it is, and
    so do the results of categories of other kinds (neither object nor texture).
    """
    settings = list(dict.fromkeys(frame['setting']))
    renamed = {}
    for setting in settings:
        if mixed_variant(setting) in settings:
            renamed[(setting, 'object')] = paper_column(setting)
            renamed[(mixed_variant(setting), 'texture')] = paper_column(setting)
    merged_settings = {s for s, _ in renamed}
    pairs = list(zip(frame['setting'], frame['kind']))
    frame = frame[[pair in renamed or pair[0] not in merged_settings
                   or pair[1] not in ('object', 'texture') for pair in pairs]].copy()
    frame['setting'] = [renamed.get(pair, pair[0]) for pair in zip(frame['setting'], frame['kind'])]
    return frame


def _group_order(kinds):
    others = sorted(set(kinds) - set(GROUP_ORDER))
    return [g for g in GROUP_ORDER if g in set(kinds)] + others


def _mean_std(values):
    """Mean and sample std (ddof=1) of seed values (NaN propagates); std NaN for one seed,
    both NaN for none."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else math.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return mean, std


def _average(frame, metric, categories):
    """Mean over ``categories`` of their seed means, and std over seeds of per-seed averages."""
    if not set(categories) <= set(frame['category']):
        return math.nan, math.nan
    rows = frame[frame['category'].isin(categories)]
    per_category = rows.groupby('category', sort=False)[metric]
    mean = float(np.mean([_mean_std(v)[0] for _, v in per_category]))
    seed_sets = {tuple(sorted(map(str, s))) for _, s in rows.groupby('category', sort=False)['seed']}
    if len(seed_sets) != 1 or len(next(iter(seed_sets))) < 2 or math.isnan(mean):
        return mean, math.nan
    per_seed = rows.assign(seed=rows['seed'].map(str)).groupby('seed')[metric].mean()
    return mean, _mean_std(per_seed.to_numpy())[1]


def summarize(records, metric, paper_layout=False):
    """Seed means and stds of ``metric``: two DataFrames with the table's rows and columns.

    Rows: MultiIndex (group, category) as described in the module docstring; columns: the
    settings in order of first appearance.
    """
    frame = results_frame(records)
    if metric not in frame.columns:
        columns = [c for c in frame.columns if c not in KEY_COLUMNS]
        raise KeyError(f'no metric {metric!r} in the results; they have {columns}')
    frame['kind'] = frame['kind'].fillna('other')
    # before merging: every category is a row; an evaluated result's kind over a failed one's, which
    # may be guessed from the name alone
    failed = _failed(frame)
    kind_of = dict(zip(frame['category'][failed], frame['kind'][failed]))
    kind_of.update(zip(frame['category'][~failed], frame['kind'][~failed]))
    if paper_layout:  # by the category's kind: a failed result's guessed one would pick the other column
        frame = merge_paper_layout(frame.assign(kind=frame['category'].map(kind_of)))
    settings = list(dict.fromkeys(frame['setting']))
    groups = _group_order(kind_of.values())
    categories = {g: sorted(c for c, k in kind_of.items() if k == g) for g in groups}

    average = AVERAGE if AVERAGE not in kind_of else f'{AVERAGE} of categories'
    index, means, stds = [], [], []

    def add_row(group, name, cells):
        index.append((group, name))
        means.append([c[0] for c in cells])
        stds.append([c[1] for c in cells])

    by_setting = {s: frame[frame['setting'] == s] for s in settings}
    for group in groups:
        for category in categories[group]:
            add_row(group, category, [_mean_std(rows.loc[rows['category'] == category, metric])
                                      for rows in by_setting.values()])  # no result: NaN
        if len(groups) > 1:
            add_row(group, average, [_average(rows, metric, categories[group])
                                     for rows in by_setting.values()])
    if len(kind_of) > 1:
        everything = [c for g in groups for c in categories[g]]
        add_row(TOTAL_GROUP, average, [_average(rows, metric, everything)
                                       for rows in by_setting.values()])

    index = pd.MultiIndex.from_tuples(index, names=['group', 'category'])
    columns = pd.Index(settings, name='setting')
    return (pd.DataFrame(means, index=index, columns=columns),
            pd.DataFrame(stds, index=index, columns=columns))


def is_fraction(metric):
    """Whether ``metric`` is a fraction (AUROC, AP, F1, ...) and not a value on the map's scale
    (a threshold, ``*_threshold*``)."""
    return 'threshold' not in metric


def format_cell(mean, std, percent=False, fraction=True):
    """``'0.972 ± 0.004'`` (or ``'97.2 ± 0.4'`` in percent; each rounded half up from its shortest
    decimal form, so that percent and fraction agree); the value alone without std; ``'NaN'``.
    A value that is not a fraction (``fraction=False``) is written with four significant digits
    (its std with two) and never in percent."""
    if math.isnan(mean):
        return 'NaN'
    if not fraction:
        return f'{mean:.4g}' if math.isnan(std) else f'{mean:.4g} ± {std:.2g}'
    def written(value):  # rounded from its decimal form, half up: 0.8255 is 0.826 and 82.6 percent
        exact = Decimal(repr(float(value))).scaleb(2 if percent else 0)
        return str(exact.quantize(Decimal('0.1') if percent else Decimal('0.001'), rounding=ROUND_HALF_UP))
    return written(mean) if math.isnan(std) else f'{written(mean)} ± {written(std)}'


def metric_table(records, metric, paper_layout=False, percent=False):
    """The table of one metric as strings (see the module docstring for layout and format)."""
    means, stds = summarize(records, metric, paper_layout=paper_layout)
    fraction = is_fraction(metric)
    cells = [[format_cell(m, s, percent, fraction) for m, s in zip(mrow, srow)]
             for mrow, srow in zip(means.to_numpy(), stds.to_numpy())]
    return pd.DataFrame(cells, index=means.index, columns=means.columns)


def build_tables(records, metrics, paper_layout=False, percent=False):
    """One table per metric: ``{metric: DataFrame of strings}``."""
    return {m: metric_table(records, m, paper_layout=paper_layout, percent=percent) for m in metrics}


def to_markdown(table):
    """Markdown (pipe table) with the cells as written (no re-parsing of numbers)."""
    return table.reset_index().to_markdown(index=False, disable_numparse=True) + '\n'


def to_latex(table):
    """LaTeX tabular (booktabs) with escaped names and ``$\\pm$`` for ±."""
    return table.to_latex(escape=True, multirow=True).replace('±', r'$\pm$')


EXPORTERS = {'csv': lambda t: t.to_csv(), 'md': to_markdown, 'tex': to_latex}


def write_tables(tables, out_dir, formats=('csv', 'md', 'tex'), then=None):
    """Write each table as ``out_dir/<metric>.<format>`` and then the files of ``then`` ({path:
    text}, e.g. the results they were built from), as one set (``atomic.write_atomic_set``: a failed
    write leaves every file as it was), then remove the other tables in ``out_dir``
    (``remove_other_tables``); returns the paths of the tables written."""
    files = table_files(tables, out_dir, formats)
    write_atomic_set(text_writes({**files, **(then or {})}))
    remove_other_tables(out_dir, files)
    return list(files)


def table_files(tables, out_dir, formats=('csv', 'md', 'tex')):
    """``{out_dir/<metric>.<format>: text}`` of each table in each of ``formats`` (EXPORTERS)."""
    unknown = set(formats) - set(EXPORTERS)
    if unknown:
        raise ValueError(f'unknown table formats {sorted(unknown)}; use some of {sorted(EXPORTERS)}')
    return {Path(out_dir) / f'{metric}.{fmt}': EXPORTERS[fmt](table)
            for metric, table in tables.items() for fmt in formats}


def text_writes(files):
    """The ``(path, write, binary)`` of each ``{path: text}`` for ``atomic.write_atomic_set``."""
    return [(path, lambda f, text=text: f.write(text), False) for path, text in files.items()]


def remove_other_tables(out_dir, kept):
    """Remove the tables in ``out_dir`` (files of the EXPORTERS' formats) that are not in ``kept``: an
    earlier evaluation's, of metrics this one does not report, which would look current."""
    for path in Path(out_dir).glob('*.*'):
        if path.suffix[1:] in EXPORTERS and path not in kept:
            path.unlink()


def write_results(records, path, tables_dir=None):
    """The long-format results (one row per checkpoint and variant: its keys, metrics, checkpoint
    and, for a failed evaluation, its ``error``) as CSV, written atomically, then checked: a
    ValueError for duplicates, after the results are kept and the tables in ``tables_dir`` (which
    no longer match them) removed."""
    frame = _keyed_frame(records)
    write_text_atomic(path, frame.to_csv(index=False))
    try:
        _check_unique(frame)
    except ValueError:
        if tables_dir is not None:
            write_tables({}, tables_dir)
        raise
    return Path(path)


def read_results(path):
    """The long-format records of a ``results.csv`` that ``write_results`` wrote (the inverse:
    integer or None seeds, checkpoints and kinds; an empty cell of any other column is no entry,
    as where the record had none or NaN); ValueError naming ``path`` when it cannot be read or
    lacks the KEY_COLUMNS."""
    try:
        columns = {'category': str, 'kind': str, 'setting': str, 'seed': 'Int64'}  # seeds exact beside empty ones
        frame = _keyed_frame(pd.read_csv(path, keep_default_na=False, na_values=[''],  # a category 'NA'
                                         dtype=columns).to_dict('records'))
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(f'cannot read the results {path}: {error}') from None
    records = []
    for row in frame.to_dict('records'):
        record = {name: value for name, value in row.items() if name in KEY_COLUMNS or not pd.isna(value)}
        record['seed'] = None if pd.isna(row['seed']) else int(row['seed'])
        for name in ('kind', 'checkpoint'):
            if pd.isna(row.get(name)):
                record[name] = None
        records.append(record)
    return records


def earlier_results(path, redone, checksums=None):
    """(kept, left_out) of an earlier results file ``path`` (``read_results``; none where there is
    no file), of the records that ``redone(record)`` does not claim: those whose checkpoint is
    still there as it was when ``path`` was written, which an evaluation into the same folder keeps
    beside its own, and those whose checkpoint is gone or was written again since (retrained, given
    other thresholds, or another model moved or copied there), or that had none (a requested pair
    without a model), which it leaves out. As it was: each value of ``checksums(checkpoint path)``
    (``checkpoints.model_checksums``: of the weights and of the stored thresholds) equals the record's
    value of that name, where the record holds one (a result recorded the checksums of what it was
    computed from: the thresholds' only where it has precision, recall and F1 at them); for records
    without a ``weights_sha256`` (or without ``checksums``), the file is not newer than ``path``."""
    if not Path(path).is_file():
        return [], []
    written = Path(path).stat().st_mtime
    kept, left_out = [], []
    for record in read_results(path):
        if not redone(record):
            (kept if _unchanged_checkpoint(record, written, checksums) else left_out).append(record)
    return kept, left_out


def _unchanged_checkpoint(record, written, checksums):
    """Whether the checkpoint of ``record`` is still there as it was when its results file was
    ``written`` (a modification time), by ``earlier_results``'s rule."""
    checkpoint = record.get('checkpoint') and Path(record['checkpoint'])
    if not checkpoint or not checkpoint.is_file():
        return False
    if record.get('weights_sha256') and checksums is not None:
        return all(record[name] == value for name, value in checksums(checkpoint).items() if name in record)
    return checkpoint.stat().st_mtime <= written


def left_out_note(left_out):
    """What ``earlier_results`` left out of the tables, for a note: the results with a model (None
    where none had one)."""
    with_model = [record for record in left_out if record.get('checkpoint')]
    if not with_model:
        return None
    return (f"{len(with_model)} earlier results left out of the tables: their models are gone, were written "
            f"again or given other thresholds since they were evaluated, e.g. {with_model[0]['checkpoint']}; "
            f"evaluate them again (python -m experiments.mvtec_tasks or chest_xray_tasks)")


def of_models_under(record, model_dir):
    """Whether the checkpoint of ``record`` lies under the folder ``model_dir`` (links resolved);
    False for a record without one."""
    checkpoint = record.get('checkpoint')
    return bool(checkpoint) and Path(model_dir).resolve() in Path(checkpoint).resolve().parents


def mixed_models(records, kept, model_dir):
    """Warning texts for the results ``kept`` from an earlier evaluation into the same folder that the
    tables would combine with this evaluation's ``records`` of the models under ``model_dir``: a kept
    result of a model outside ``model_dir`` in a row (category and setting) with this evaluation's
    results, and a setting's seed of one category's models (the checkpoint's folder ``<category>``)
    scored by different models in different rows (chest X-ray test sets; one model: one checkpoint
    file, or files of equal ``weights_sha256``)."""
    texts, models = [], {}
    for record in records + kept:
        if not record.get('checkpoint'):
            continue
        path, checksum = Path(record['checkpoint']).resolve(), record.get('weights_sha256')
        found = models.setdefault((path.parent.name, record['setting'], record['seed']), [])
        model = next((m for m in found if path in m['paths'] or (checksum and checksum in m['checksums'])), None)
        if model is None:
            found.append(model := dict(paths=set(), checksums=set(), rows=[]))
        model['paths'].add(path)
        model['checksums'].add(checksum)
        model['rows'].append(record['category'])
    for (_, setting, seed), found in models.items():
        if len(found) > 1:
            texts.append(f"{setting} seed {seed} is scored by different models in the tables' rows: " + '; '.join(
                f"{min(model['paths'])} ({', '.join(map(str, model['rows']))})" for model in found))
    rows = {(record['category'], record['setting']) for record in records}
    outside = {}
    for record in kept:
        key = (record['category'], record['setting'])
        if key in rows and record.get('checkpoint') and not of_models_under(record, model_dir):
            outside.setdefault(key, []).append(record)
    for (category, setting), found in outside.items():
        texts.append(f"{category} {setting}: the tables merge this evaluation's seeds with earlier results of models "
                     f"outside {model_dir}: " + ', '.join(f"seed {r['seed']} ({r['checkpoint']})" for r in found))
    return [text + '; evaluate each model folder into an output folder of its own' for text in texts]


def write_report(records, out_dir, metrics, paper_layout=False, percent=False):
    """Write ``out_dir/results.csv`` (as ``write_results`` does) and the tables of ``metrics`` as
    ``out_dir/tables/<metric>.{csv,md,tex}``, all as one set (``write_tables``: a failed write leaves
    every file as it was; results.csv is renamed last); returns the tables ``{metric: DataFrame}``.
    Results of one seed twice: ``write_results``'s ValueError naming them, after the results are
    kept and the tables removed."""
    out_dir = Path(out_dir)
    results, tables_dir = out_dir / 'results.csv', out_dir / 'tables'
    frame = _keyed_frame(records)
    try:
        _check_unique(frame)
    except ValueError:
        write_results(records, results, tables_dir)  # raises it again, once they are written
        raise
    built = build_tables(records, metrics, paper_layout=paper_layout, percent=percent)
    write_tables(built, tables_dir, then={results: frame.to_csv(index=False)})
    return built
