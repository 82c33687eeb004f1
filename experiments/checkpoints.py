"""Trained models on disk: finding and reading checkpoints, and naming and ordering their results.

A checkpoint is a ``final_*.pt`` file of the training scripts (``experiments.training``) whose
meta names at least its setting. Its results are named after the setting without its seed
(``Setting.seedless_key``), followed for a two-stage variant by the one-class model, e.g.
``Shift-Intensity-M+GDE`` (``result_setting``); a classifier setting (``CutPaste-3way``) has no
map of its own and is scored by one-class models only (default: GDE, ``result_variants``).
"""
import hashlib
import json
import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from experiments import one_class
from experiments.settings import BASE_SETTINGS, POISSON_BASES, parse_setting
from experiments.training import (TORCHSCRIPT_SUFFIX, dict_differences, last_checkpoint_path, load_model,
                                  replaced_final_model, resolve_device, run_differences)
from self_sup_data.recipe import CALIBRATED_PARAMS

CHECKPOINT_PATTERN = 'final_*.pt'
NO_THRESHOLDS = 'none'  # the thresholds_sha256 of a model without thresholds
SEARCH_DIR = 'search'  # <run dir>/search/<candidate>/: the short runs of --recipe search
REQUIRED_META = ('setting',)
CLASSIFIER_ONE_CLASS = ('gde',)  # how a classifier (CutPaste-3way) is scored without one-class models


# what torch.load raises for a file that is not a checkpoint (weights_only's unpickler included)
READ_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError,
               IndexError, AttributeError, struct.error, UnicodeDecodeError)
# the entries of a checkpoint and its meta that ``load_model`` reads
CHECKPOINT_ENTRIES = ('meta', 'model', 'model_config')
# how a file torch.save wrote starts: a zip archive (its format since PyTorch 1.6) or a pickle
CHECKPOINT_MAGIC = (b'PK\x03\x04', b'\x80')
GIT_LFS_POINTER = b'version https://git-lfs'


def _file_start(path, size=64):
    """The first ``size`` bytes of the file at ``path`` (b'' if it cannot be read)."""
    try:
        with open(path, 'rb') as file:
            return file.read(size)
    except OSError:
        return b''


def _read_error(path, error):
    if Path(path).is_dir():
        return ValueError(f'{path} is a folder; give a checkpoint file (final_*.pt)')
    if isinstance(error, FileNotFoundError):
        return ValueError(f'no checkpoint at {path}: the file does not exist')
    if Path(path).suffix.lower() == '.onnx':
        return ValueError(f'cannot read checkpoint {path}: it is an ONNX export (for predict.py '
                          f'--onnx or ONNX Runtime); give the checkpoint it was exported from '
                          f'(final_*.pt)')
    start = _file_start(path)
    if start.startswith(GIT_LFS_POINTER):
        return ValueError(f'cannot read checkpoint {path}: it is a Git LFS pointer, not the file it '
                          f'points to; fetch the file (git lfs pull)')
    if start and not start.startswith(CHECKPOINT_MAGIC):
        return ValueError(f'cannot read checkpoint {path}: it is not a PyTorch checkpoint (it starts '
                          f'with {start[:24]!r})')
    if isinstance(error, pickle.UnpicklingError):  # weights_only refused an object
        return ValueError(f'cannot read checkpoint {path}: it holds objects other than tensors and '
                          f'plain values, and loading it could run code; refused')
    if 'TorchScript' in str(error):  # torch.load's refusal of a TorchScript archive
        return ValueError(f'cannot read checkpoint {path}: it is a TorchScript export (for '
                          f'torch.jit.load); give the checkpoint it was exported from (final_*.pt)')
    if isinstance(error, KeyError) and error.args and error.args[0] in CHECKPOINT_ENTRIES:
        return ValueError(f'cannot read checkpoint {path}: it has no {error} entry; give a model that '
                          f'the training scripts wrote (final_*.pt; a bare state_dict has no meta to '
                          f'rebuild the network from)')
    if isinstance(error, RuntimeError) and 'loading state_dict' in str(error):
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), '')
        return ValueError(f'cannot read checkpoint {path}: its weights do not fit the network that '
                          f'its meta describes ({detail[:300]})')
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return ValueError(f'cannot read checkpoint {path}: {type(error).__name__}: {first_line[:200]}'
                      f' (truncated or not a checkpoint?)')


def read_meta(path):
    """The meta of a checkpoint without loading its weights; ValueError naming an unreadable file."""
    try:
        meta = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['meta']
    except READ_ERRORS as error:
        raise _read_error(path, error) from error
    if not isinstance(meta, dict):
        raise ValueError(f'checkpoint {path} has no meta dict; is it a model of the training scripts?')
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f'checkpoint {path} has no {missing} in its meta; '
                         'is it a model of the training scripts?')
    return meta


def thresholds_sha256(thresholds):
    """SHA-256 (hex) of a model's calibrated ``thresholds`` (its meta's, ``experiments.thresholds``) as
    JSON with sorted keys, NO_THRESHOLDS for none: what the precision, recall and F1 of an evaluation
    of its own maps were computed at, recorded beside them."""
    if not thresholds:
        return NO_THRESHOLDS
    return hashlib.sha256(json.dumps(thresholds, sort_keys=True).encode()).hexdigest()


def model_checksums(path):
    """{'weights_sha256', 'thresholds_sha256'} of the checkpoint at ``path`` (``thresholds_sha256`` of
    the thresholds it stores), read once; None values where it cannot be read: what
    ``tables.earlier_results`` compares with the values a result recorded."""
    try:
        meta = read_meta(path)
    except ValueError:
        return dict(weights_sha256=None, thresholds_sha256=None)
    return dict(weights_sha256=meta.get('weights_sha256'), thresholds_sha256=thresholds_sha256(meta.get('thresholds')))


def read_model(path, device):
    """``training.load_model`` with a ValueError naming an unreadable file, or an unknown or
    unavailable ``device`` (``training.resolve_device``; checked first, so that a missing GPU is
    not reported as a broken file)."""
    device = resolve_device(device)
    try:
        return load_model(path, device)
    except READ_ERRORS as error:
        raise _read_error(path, error) from error

def result_setting(setting, one_class_name=None):
    """The name of a checkpoint's results (a table column): ``setting.seedless_key``, followed for
    a two-stage variant by its one-class model, e.g. 'Shift-Intensity-M+GDE'."""
    suffix = '' if one_class_name is None else one_class.column_suffix(one_class_name)
    return setting.seedless_key + suffix


def split_result_setting(name):
    """Inverse of ``result_setting``: 'Shift-M+GDE' -> (Setting of 'Shift-M', 'gde'); 'Shift-M' ->
    (Setting, None). ValueError for an unknown key or one-class model."""
    key, plus, model = name.partition('+')
    if plus:
        one_class.make_one_class(model.lower())  # validates
    return parse_setting(key), model.lower() if plus else None


def result_variants(setting, one_class_names=None):
    """How a checkpoint of ``setting`` is scored: None (its own maps) for the encoder-decoder,
    followed by the one-class models ``one_class_names``; a classifier has no maps and is scored
    by ``one_class_names`` or else ``CLASSIFIER_ONE_CLASS``."""
    names = list(dict.fromkeys(one_class_names or ()))
    if setting.model == 'classifier':
        return names or list(CLASSIFIER_ONE_CLASS)
    return [None] + names


def matches(requested, setting):
    """Whether a checkpoint of ``setting`` belongs to the requested key: same task and seed (a key
    without a seed trains ``DEFAULT_SEED``: ``Shift-0`` finds the model trained as ``Shift``), or
    any seed of a requested key without a seed."""
    same_task = (requested.base, requested.mixed) == (setting.base, setting.mixed)
    return same_task and (requested.seed is None or requested.seed == setting.run_seed)


def is_search_candidate(path, folder):
    """Whether ``path`` is a --recipe search candidate below ``folder`` (not a result): a file in a
    folder of its own in a SEARCH_DIR folder (``<run dir>/search/<candidate>/``). Folders named
    SEARCH_DIR elsewhere (a category, a sweep's folder) hold results."""
    parts = Path(path).relative_to(folder).parts
    return len(parts) >= 3 and parts[-3] == SEARCH_DIR


def is_torchscript_export(path):
    """Whether ``path`` is named as a TorchScript export (``experiments.export``'s default name,
    ``<model stem>.torchscript.pt``, matches ``final_*.pt`` too)."""
    return Path(path).name.endswith(TORCHSCRIPT_SUFFIX)


def find_checkpoints(model_dir, dataset='mvtec', unreadable=None):
    """The trained models of ``dataset`` (meta 'dataset': 'mvtec' or 'chest_xray') under
    ``model_dir`` (any depth, ``final_*.pt``; not the --recipe search candidates in a
    ``SEARCH_DIR`` folder, which are not results, nor TorchScript exports) -> list of (path, meta).

    An unreadable checkpoint raises ValueError naming it, or, when ``unreadable`` is a list, is
    appended to it as (path, reason) and skipped."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise NotADirectoryError(f'{model_dir} is a file; the evaluation takes the folder of models (-m), e.g. '
                                 f'the training command\'s output folder, and evaluates every {CHECKPOINT_PATTERN} '
                                 f'under it (-s selects among them)')
    if not model_dir.is_dir():
        raise FileNotFoundError(f'model folder {model_dir} does not exist; it should hold the '
                                f'{CHECKPOINT_PATTERN} files written by the training scripts')
    found = []
    for path in sorted(model_dir.rglob(CHECKPOINT_PATTERN)):
        if is_search_candidate(path, model_dir) or is_torchscript_export(path):
            continue
        try:
            found.append((path, read_meta(path)))
        except ValueError as error:
            if unreadable is None:
                raise
            unreadable.append((path, str(error)))
    return [(path, meta) for path, meta in found if meta.get('dataset', dataset) == dataset]


def setting_from_path(path):
    """The setting key of a checkpoint at the training scripts' path
    ``<setting dir>/<category>/final_<category>_<setting fname>.pt`` (``Setting.run_dir``,
    ``Setting.run_name``), e.g. 'Shift-M-3'; None for another path."""
    path = Path(path)
    for key in list(BASE_SETTINGS) + [base + '-M' for base in POISSON_BASES]:
        setting = parse_setting(key)
        match = re.fullmatch(rf'final_{re.escape(path.parent.name)}_{setting.fname}(?:_(0|[1-9][0-9]*))?',
                             path.stem)
        if match and path.parent.parent.name == setting.dir_name:
            return key + (f'-{match[1]}' if match[1] else '')
    return None


def failure_reason(error):
    """One line saying why an evaluation failed: the exception's type and first line."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0] if lines else "(no message)"}'


def select_checkpoints(found, settings=None, categories=None):
    """The (path, meta) of ``found`` whose setting matches one of the keys ``settings`` (see
    ``matches``; None: any) and whose category is in ``categories`` (None: any). ValueError for a
    single string in place of either list (it would be read letter by letter)."""
    for name, value in (('settings', settings), ('categories', categories)):
        if isinstance(value, str):
            raise ValueError(f'{name} must be a list of names, e.g. [{value!r}], or None; got the string {value!r}')
    requested = None if settings is None else [parse_setting(key) for key in settings]

    def wanted(meta):
        setting = parse_setting(meta['setting'])
        return ((categories is None or meta['category'] in categories)
                and (requested is None or any(matches(r, setting) for r in requested)))
    return [(path, meta) for path, meta in found if wanted(meta)]


def sort_records(records, settings=None):
    """Records ordered by setting (the order of ``settings`` when given, else the paper's order of
    the base tasks, plain before -M), each setting's own results before its two-stage variants
    (in the order of ``one_class.ONE_CLASS_MODELS``), then category and seed: the tables keep
    this column order."""
    requested = settings and list(dict.fromkeys(parse_setting(k).seedless_key for k in settings))
    variant_order = [None] + list(one_class.ONE_CLASS_MODELS)

    def order(record):
        setting, variant = split_result_setting(record['setting'])
        if requested:
            rank = (requested.index(setting.seedless_key),)
        else:
            rank = (list(BASE_SETTINGS).index(setting.base), setting.mixed)
        return (rank + (variant_order.index(variant),), record['category'],
                -1 if record['seed'] is None else record['seed'])
    return sorted(records, key=order)


# a model's own (one per seed), or where its data lay (a dataset or a chest training list moved for another seed;
# the list's names are compared by their digest)
SEED_FIELDS = ('seed', 'setting', 'thresholds', 'recipe_search', 'search_calibration', 'data_dir', 'normal_list')
CALIBRATED_FIELDS = ('calibration', 'category_params', 'self_sup_args')  # by seed, unless 'table'


def seed_differences(a, b):
    """The differences (``training.run_differences``) between the metas ``a`` and ``b`` of two
    seeds of one setting and category that make them differently trained models. Left out: the
    fields that differ by seed (SEED_FIELDS; CALIBRATED_FIELDS and the epochs that go with the
    chosen category parameters where a recipe is calibrated per seed, but not the generator
    arguments that no calibration sets), fields that one meta lacks (written by an earlier
    version) and the paths of a layout of the same format; with a calibrated recipe, the
    calibrated parameters that one seed's command line set (``param_overrides``) count, and so does
    the number of training processes (``world_size``, a result field elsewhere: torchrun's processes
    train a few images fewer per epoch, and on a CPU each one's batch norm sees its share alone)."""
    calibrated = any(meta.get('recipe', 'table') != 'table' for meta in (a, b))
    ignored = set(SEED_FIELDS) | (set(CALIBRATED_FIELDS) if calibrated else set())
    if calibrated and (a.get('category_params') or {}).get('epochs') != (
            b.get('category_params') or {}).get('epochs'):
        ignored.add('epochs')  # --recipe search: each seed trains its chosen recipe's epochs
    if (a.get('layout') or {}).get('format') == (b.get('layout') or {}).get('format'):
        ignored.add('layout')

    def recorded(meta, name):
        return name in meta or name in meta.get('train_config', {})

    def set_by_hand(meta):  # the generator arguments that no calibration sets
        return {k: v for k, v in (meta.get('self_sup_args') or {}).items()
                if k not in CALIBRATED_PARAMS}

    def fixed(meta):  # the calibrated parameters that the command line set instead
        return {k: v for k, v in meta['param_overrides'].items() if k in CALIBRATED_PARAMS}
    differences = [difference for difference in run_differences(a, b)
                   if (name := difference.split(':')[0].split('.')[0]) not in ignored
                   and recorded(a, name) and recorded(b, name)]
    if 'world_size' in a and 'world_size' in b and a['world_size'] != b['world_size']:
        differences.append(f"world_size: {a['world_size']} vs {b['world_size']}")
    if calibrated:
        differences += dict_differences(set_by_hand(a), set_by_hand(b), 'self_sup_args.')
        if 'param_overrides' in a and 'param_overrides' in b:
            differences += dict_differences(fixed(a), fixed(b), 'param_overrides.')
    return differences


def model_seed(meta):
    """The seed of a checkpoint's model: its meta's, else (an unreadable checkpoint, whose meta is
    that of its path) the run seed of its setting key (``Setting.run_seed``)."""
    return meta.get('seed', parse_setting(meta['setting']).run_seed)


def check_one_model_per_seed(selected, advice='keep one model per seed (or evaluate them apart, with -m '
                                               'naming one folder)'):
    """ValueError naming both checkpoints and ending in ``advice``, before any work, when two of
    ``selected`` ((path, meta) pairs; a path is only named, so it may be a described one) are models
    of one category, setting and seed (e.g. a copy of a model folder under the model folder): their
    results would be one cell of the tables."""
    seen = {}
    for path, meta in selected:
        key = (meta.get('category'), parse_setting(meta['setting']).seedless_key, model_seed(meta))
        if key in seen:
            category = '' if key[0] is None else f'category {key[0]!r}, '
            raise ValueError(f'two models of {category}setting {key[1]!r}, seed {key[2]}: '
                             f'{seen[key]} and {path}; {advice}')
        seen[key] = path


def warn_replaced_models(selected):
    """Warn of each readable model of ``selected`` ((path, meta) pairs of final models) that an
    interrupted ``--force`` run is replacing (``replaced_final_model``): its results are the earlier
    run's."""
    for path, meta in selected:
        name = path.stem[len('final_'):]
        try:
            replaced = 'error' not in meta and replaced_final_model(path.parent, name)
        except READ_ERRORS:  # an unreadable checkpoint beside it, which training refuses to resume
            replaced = False
        if replaced:
            warnings.warn(f"{path} is the model of an earlier run that an interrupted --force run "
                          f"({last_checkpoint_path(path.parent, name).name}) is replacing: its results are "
                          f"that earlier run's until the new run is resumed (--resume) and finishes")


def warn_unlike_seeds(selected):
    """Warn for each category and setting whose models (``selected``: (path, meta)), merged over
    seeds in the tables as ``mean ± std``, were trained differently (another budget, resolution,
    recipe ...: ``seed_differences`` from the first of them), naming each model that differs."""
    groups = {}
    for path, meta in selected:
        if 'error' not in meta:
            key = (meta['category'], parse_setting(meta['setting']).seedless_key)
            groups.setdefault(key, []).append((path, meta))
    for (category, key), ((first, first_meta), *others) in groups.items():
        unlike = [f"{path}: {'; '.join(differing)}" for path, meta in others
                  if (differing := seed_differences(first_meta, meta))]
        if unlike:
            warnings.warn(f"{category} {key}: the seeds merged in the tables were trained "
                          f"differently (against {first}: {', '.join(unlike)})")
