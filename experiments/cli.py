"""Command-line helpers shared by the training scripts and the evaluation commands: the options
of the model and the training loop, the arguments every evaluation takes, and the wrappers that
turn input errors into one-line messages."""
import argparse
import io
import math
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

from experiments.arguments import INTERRUPTED_STATUS, image_reading, path_argument, reading_option
from experiments.atomic import remove_stale_temporaries, signals_held
from experiments.checkpoints import read_meta, split_result_setting
from experiments.plotting import figure_path, remove_failed_figures
from experiments.run_lock import RunInProgressError, refuse_run_in_progress, results_lock, run_lock
from experiments.settings import DEFAULT_SEED, parse_setting
from experiments.tables import failed, read_results
from experiments.training import (LOGIT_LOSSES, RunError, TrainConfig, cpu_has_bf16, final_model_path,
                                  is_first_process, is_run_file, last_checkpoint_path, launched_processes,
                                  replaced_final_model,
                                  resolve_device, run_differences, run_meta, seed_everything, train)
from models.resnet import resnet18_classifier, resnet18_enc_dec
from self_sup_data.images import is_high_depth_file
from self_sup_data.layouts import FORMATS, DefectFolders, make_layout
from self_sup_data.mvtec import suggested_intensity_window
from self_sup_data.recipe import low_contrast_message

# ------------------------------------------------------------------------------------------------
# Training scripts
# ------------------------------------------------------------------------------------------------


def default_workers():
    """Usable CPUs less one (the main process runs the steps), at least one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, (cpus or 2) - 1)


def add_training_arguments(parser):
    """Add the model and loop options: --epochs ... --no-pool, --preact, --paper-network,
    --standardize-input (see train_config and model_from_args)."""
    group = parser.add_argument_group('model and training loop')
    group.add_argument('--epochs', type=int, help="number of epochs (default: the paper's for the data)")
    group.add_argument('--batch-size', type=int, help=f'default: {TrainConfig.batch_size}')
    group.add_argument('--lr', type=float, default=1e-3,
                       help='initial learning rate, decayed with a cosine to 1e-6 (constant if lower; default: 1e-3)')
    group.add_argument('--workers', type=int, default=default_workers(),
                       help='DataLoader worker processes generating the samples '
                            '(default: the usable CPUs less one; 0: in the main process)')
    group.add_argument('--device', help="'cpu', 'cuda', 'cuda:1' ... (default: CUDA if available)")
    group.add_argument('--bf16', action=argparse.BooleanOptionalAction,
                       help='forward pass in bfloat16 autocast (default: on CUDA only; --bf16 also '
                            'on the CPU, fast on CPUs with AVX512-BF16 or AMX, slow elsewhere)')
    again = group.add_mutually_exclusive_group()
    again.add_argument('--resume', action='store_true',
                       help='continue interrupted runs from their last checkpoint and skip finished '
                            'ones; refused when they were run with other arguments')
    again.add_argument('--force', action='store_true',
                       help='train runs again from the start even when a finished model or an '
                            'interrupted run is there (a finished model is replaced when the new '
                            "run ends, an interrupted run's checkpoint by the new run's first one)")
    group.add_argument('--checkpoint-minutes', type=float, default=TrainConfig.checkpoint_minutes,
                       metavar='M', help='write the resume checkpoint whenever M minutes have '
                                         'passed since the last one, and after the last epoch '
                                         f'(default: {TrainConfig.checkpoint_minutes:g}; 0: every '
                                         'epoch)')
    group.add_argument('--checkpoint-every', type=int, metavar='E',
                       help='write the resume checkpoint every E epochs too (default: on the '
                            'minutes only)')
    group.add_argument('--progress', action=argparse.BooleanOptionalAction,
                       help='progress bars (default: when the error output is a terminal)')
    group.add_argument('--compile', action='store_true',
                       help='compile the training step with torch.compile')
    group.add_argument('--figure-every', type=int, metavar='E',
                       help='example figure every E epochs (default: a quarter of the epochs)')
    group.add_argument('--no-figures', action='store_true', help='write no figures')
    group.add_argument('--swa-epochs', type=int, default=0, metavar='S',
                       help='stochastic weight averaging: the cosine decays to --swa-lr in the '
                            'first epochs less S, and the model is the average of the weights '
                            'after each of the last S epochs at that constant rate (default: 0, '
                            'no averaging)')
    group.add_argument('--swa-lr', type=float, default=TrainConfig.swa_lr,
                       help='learning rate of the averaged epochs '
                            f'(default: {TrainConfig.swa_lr:g})')
    group.add_argument('--loss', choices=LOGIT_LOSSES,
                       help="for settings trained with BCE: 'bce', the BCE of the logits in "
                            "float32 (the default), or 'bce-bf16', the BCE of the sigmoid map "
                            "computed in bfloat16, this project's earlier loss (no gradient above "
                            "a logit of about 6), to reproduce models trained with it, or 'focal', "
                            "the BCE of each pixel weighted by |label - prediction|^2 (focal loss "
                            "for soft labels)")
    group.add_argument('--no-pool', '--no_pool', dest='no_pool', action='store_true',
                       help='no max pool in the stem')
    group.add_argument('--preact', action='store_true',
                       help="pre-activation residual blocks in the encoder (not the paper's --preact network, "
                            "which also differs in the stem, shortcuts, bottleneck and decoder)")
    group.add_argument('--paper-network', action='store_true',
                       help="the paper's code's network exactly (no BN in the bottleneck, transposed "
                            "1x1 shortcuts in the decoder, ...; see models/resnet.py) instead of this "
                            "project's")
    group.add_argument('--standardize-input', action=argparse.BooleanOptionalAction,
                       help="the network first standardises each image by its own mean and standard "
                            "deviation, so that normal images of other brightness or contrast are scored "
                            "alike (not the paper's; default: on with a recipe calibrated from the "
                            "training images, train_mvtec.py's --recipe auto or search, unless "
                            "--paper-network; off otherwise)")


def training_loss(args, loss):
    """The setting's ``loss``, or --loss in its place for a setting trained with BCE (ValueError
    naming the flag for another setting)."""
    if args.loss is None or args.loss == loss:
        return loss
    if loss not in LOGIT_LOSSES:
        raise ValueError(f"--loss {args.loss}: the setting trains with loss {loss!r}; --loss "
                         f"chooses between {', '.join(LOGIT_LOSSES)} for settings trained with BCE")
    return args.loss


def train_config(args, epochs, seed, loss):
    """TrainConfig from parsed ``add_training_arguments`` options (``epochs`` when not given;
    ``loss`` the setting's, replaced by --loss: ``training_loss``)."""
    return TrainConfig(epochs=epochs if args.epochs is None else args.epochs,
                       batch_size=TrainConfig.batch_size if args.batch_size is None else args.batch_size,
                       lr=args.lr,
                       loss=training_loss(args, loss), seed=seed, workers=args.workers,
                       device=args.device,
                       bf16=args.bf16, checkpoint_every=args.checkpoint_every,
                       checkpoint_minutes=args.checkpoint_minutes,
                       progress=sys.stderr.isatty() if args.progress is None else args.progress,
                       compile=args.compile, figure_every=args.figure_every,
                       figures=not args.no_figures,
                       swa_epochs=args.swa_epochs, swa_lr=args.swa_lr)


def check_training_options(args, loss, default_batch_size=TrainConfig.batch_size):
    """Validate the loop's options of parsed ``add_training_arguments`` before any run is prepared
    (ValueError). Without --epochs, ``check_swa_epochs`` checks --swa-epochs against each category's
    default epochs: here any epochs count that --swa-epochs leaves valid stands in. The batch
    size (``default_batch_size`` without --batch-size) must divide by the processes of a torchrun
    launch. The messages name the flag: '--batch-size must be a positive integer, got 0'."""
    for name in ('epochs', 'batch_size', 'checkpoint_every', 'figure_every'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be a positive integer, got {value}")
    for name in ('lr', 'swa_lr'):
        if not 0 < getattr(args, name) < math.inf:
            raise ValueError(f"{flag(name)} must be a positive number, got {getattr(args, name)}")
    processes = launched_processes()
    if args.batch_size is not None and args.batch_size % processes:
        raise ValueError(f"--batch-size must divide by the {processes} processes of this torchrun run (each "
                         f"takes an equal share of a step's images), got {args.batch_size}")
    if args.batch_size is None and default_batch_size % processes:
        raise ValueError(f"the default batch size {default_batch_size} does not divide by the {processes} "
                         f"processes of this torchrun run (each takes an equal share of a step's images): "
                         f"pass a --batch-size that does")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.no_figures and args.figure_every is not None:
        raise ValueError(f"--figure-every {args.figure_every} with --no-figures: pass one of them")
    if args.swa_epochs < 0:
        raise ValueError(f"--swa-epochs must be 0 or more, got {args.swa_epochs}")
    if args.epochs is not None and args.swa_epochs >= args.epochs:
        raise ValueError(f"--swa-epochs must be less than --epochs ({args.epochs}), got {args.swa_epochs}")
    if not args.checkpoint_minutes >= 0:
        raise ValueError(f"--checkpoint-minutes must be 0 or more, got {args.checkpoint_minutes}")
    if args.paper_network and args.preact:
        raise ValueError("--paper-network builds the paper's post-activation network; it does not "
                         "combine with --preact")
    resolve_device(args.device)
    train_config(args, epochs=max(1, args.swa_epochs + 1), seed=0, loss=loss)


def check_swa_epochs(args, default_epochs, category):
    """Without --epochs (``check_training_options`` checks --swa-epochs against it): ValueError naming
    --swa-epochs where it is not less than ``default_epochs``, the epochs that ``category`` trains for
    without --epochs; called before anything is loaded or written."""
    if args.epochs is None and args.swa_epochs >= default_epochs:
        raise ValueError(f"--swa-epochs must be less than the {default_epochs} epochs that category {category!r} "
                         f"trains for without --epochs, got {args.swa_epochs}; pass --epochs")


def print_warnings(prog, notes):
    """Print each of ``notes`` once as a line ``prog: warning: note`` (stderr); under torchrun, the
    first process alone prints them (the others would repeat them)."""
    if is_first_process():
        for note in dict.fromkeys(notes):
            print(f"{prog}: warning: {note}", file=sys.stderr)


@contextmanager
def reports_from_first_process_only():
    """Inside: under torchrun, a process other than the first prints nothing to stdout and shows
    no warnings, which would repeat the first process's notes, recipe and tables; its errors
    (stderr) still print. Usable as a decorator of a training command's main."""
    if is_first_process():
        yield
        return
    with open(os.devnull, 'w') as devnull, redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def print_slow_bf16_note(prog, args):
    """Print a note when --bf16 asks for bfloat16 autocast on a CPU that lists no bfloat16
    instructions (``cpu_has_bf16``), where it is emulated, many times slower than float32;
    nothing where the CPU's instructions are unknown."""
    if args.bf16 and resolve_device(args.device).type == 'cpu' and cpu_has_bf16() is False:
        print(f"{prog}: note: --bf16 on a CPU without bfloat16 instructions (AVX512-BF16, AMX): "
              f"emulated there, many times slower than float32 (14x at 128 px on a 2-core AVX2 "
              f"CPU); without --bf16 training runs in float32")


def flag(name):
    """The command-line flag of an argparse destination: 'batch_size' -> '--batch-size'."""
    return '--' + name.replace('_', '-')


def standardizes_input(args, calibrated):
    """--standardize-input, or without it whether the recipe was ``calibrated`` from the training
    images (per-image standardisation is part of the calibrated recipes, see models/resnet.py) and
    the network is not the paper's (--paper-network, which asks for the paper's network exactly)."""
    if args.standardize_input is not None:
        return args.standardize_input
    return calibrated and not getattr(args, 'paper_network', False)


def model_from_args(args, in_channels, final_activation, seed, num_classes=None, calibrated=False):
    """NSA's encoder-decoder with the --no-pool/--preact/--paper-network/--standardize-input options
    (``standardizes_input``), initialised from ``seed``; with ``num_classes``, the encoder with
    CutPaste's heads and a num_classes-way classifier instead (ValueError with --paper-network: it
    has no decoder)."""
    seed_everything(seed)
    standardize_input = standardizes_input(args, calibrated)
    if num_classes is not None:
        if args.paper_network:
            raise ValueError("--paper-network builds the paper's encoder-decoder; this setting trains a "
                             "classifier (CutPaste's)")
        return resnet18_classifier(num_classes=num_classes, in_channels=in_channels,
                                   pool=not args.no_pool, preact=args.preact, standardize_input=standardize_input)
    return resnet18_enc_dec(num_classes=1, in_channels=in_channels, pool=not args.no_pool,
                            preact=args.preact, final_activation=final_activation,
                            paper_network=args.paper_network, standardize_input=standardize_input)


def prepare_output_dir(path):
    """Create folder ``path`` if needed and check that files can be written there -> Path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"cannot write to output folder {path}: {error.strerror or error}") from error
    return path


def check_output_dir(path):
    """OSError naming ``path`` when it cannot become an output folder: a file, or under a file or
    a folder that cannot be written; nothing is created (see ``prepare_output_dir``)."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write to output folder {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to output folder {path}: {existing} is not writable")


def check_evaluation_dir(path, figures=True):
    """``check_output_dir`` of an evaluation's output folder ``path`` and of the folders it writes
    in: ``tables`` and, with ``figures``, ``figures`` (a file in the way would fail the evaluation only
    once its models are scored, or trained)."""
    path = Path(path)
    for folder in (path, path / 'tables', *([path / 'figures'] if figures else [])):
        check_output_dir(folder)


INPUT_ERRORS = (ValueError, KeyError, OSError)


RESUME_NOTE = ('the same command with --resume continues from the last checkpoint (written every '
               '--checkpoint-minutes; a run without one starts again)')


@contextmanager
def exit_on_interrupt(prog, note=RESUME_NOTE):
    """Ctrl-C (KeyboardInterrupt) as one line ``PROG: interrupted; NOTE`` (what was kept, how to go
    on; by default a training script's: its checkpoints are written atomically, so the last one is
    whole) and exit status 130, instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {note}", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)


@contextmanager
def exit_on_input_error(prog, errors=INPUT_ERRORS):
    """Turn an exception of ``errors`` (by default a ValueError, KeyError or OSError) into a
    one-line message and exit status 1."""
    try:
        yield
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) else error
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


def found_run(run_dir, name):
    """(path, 'finished' or 'interrupted') of the run ``name`` in ``run_dir``, or (None, None)
    without its final model and checkpoint: the checkpoint when there is no final model, the final
    model cannot be read (a warning names it: a resume writes it again from the checkpoint), or the
    checkpoint belongs to another run (``run_differences``), stopped before its last epoch or
    started after the final model was written (``replaced_final_model``; the last two: a --force
    run that was interrupted, and the final model is the replaced run's), else the final model.
    ValueError naming an unreadable checkpoint and --force."""
    final, last = final_model_path(run_dir, name), last_checkpoint_path(run_dir, name)
    try:
        if last.is_file():
            checkpoint = read_meta(last)
            unfinished = len(checkpoint.get('epoch_losses', [])) < checkpoint.get('train_config', {}).get('epochs', 0)
            if not final.is_file() or unfinished or replaced_final_model(run_dir, name):
                return last, 'interrupted'
            try:
                final_meta = read_meta(final)
            except ValueError as error:  # damaged after the run: its checkpoint holds it all
                warnings.warn(f"{error}; the run's checkpoint {last} is readable: --resume writes the final "
                              f"model again from it")
                return last, 'interrupted'
            if run_differences(final_meta, checkpoint):
                return last, 'interrupted'
        if final.is_file():
            read_meta(final)  # readable
    except ValueError as error:  # an unreadable checkpoint
        raise ValueError(f"{error}; --force trains the run again from the start") from None
    return (final, 'finished') if final.is_file() else (None, None)


def refuse_existing_run(found, state):
    """FileExistsError naming the ``found_run`` ``found`` (in ``state``), if there is one: what a
    command without --resume or --force must not replace. Commands that train several runs call
    it for each before training any."""
    if found:
        keep, article = ('keep it', 'a') if state == 'finished' else ('continue it', 'an')
        raise FileExistsError(f"{found} holds {article} {state} run; pass --resume to {keep} or "
                              f"--force to train again and replace it")


def refuse_twin_run(setting, out_dir, category):
    """FileExistsError when ``out_dir`` holds a run on ``category`` of the twin of ``setting``'s key,
    which trains the same seed under another name (``Shift-0`` and ``Shift``: a key without a seed
    trains DEFAULT_SEED): the evaluation could not tell the two models apart; RunInProgressError
    when another process is training the twin (``refuse_run_in_progress``), before it has written
    a file."""
    seedless = setting.seedless_key
    twin_key = (seedless if setting.seed == DEFAULT_SEED
                else f'{seedless}-{DEFAULT_SEED}' if setting.seed is None else None)
    if twin_key is None:
        return
    twin = parse_setting(twin_key)
    run_dir, name = twin.run_dir(out_dir, category), twin.run_name(category)
    refuse_run_in_progress(run_dir, name)
    found = next((path for path in (final_model_path(run_dir, name), last_checkpoint_path(run_dir, name))
                  if path.is_file()), None)  # not read: a damaged one is the twin's all the same
    if found:
        raise FileExistsError(f"{found} is a run of {twin_key}, which trains seed {DEFAULT_SEED} as "
                              f"{setting.key} does; use -s {twin_key} or another output folder")


def warn_unused_reading(args, category, dataset):
    """Warn where --bit-depth or --intensity-range is given and no training image of ``dataset`` is a
    file of more than 8 bits a channel (``is_high_depth_file``, by its header), the only files they
    apply to."""
    if image_reading(args) is not None and not any(is_high_depth_file(path) for path in dataset.paths):
        warnings.warn(f"category {category!r}: {reading_option(image_reading(args))} applies to 16-bit image "
                      f"files, and none of its training images is one: they are read as they are (the model keeps "
                      f"it for 16-bit test and new images)")


def warn_low_contrast(args, category, dataset):
    """Warn where the training images of ``dataset`` span few grey levels (``low_contrast_message``;
    for 16-bit images it suggests an intensity window, ``suggested_intensity_window``, read from
    their files only then)."""
    depth_given = image_reading(args) is not None
    message = low_contrast_message(dataset.images, category, dataset.bit_depth, depth_given)
    if message and dataset.bit_depth is not None:
        message = low_contrast_message(dataset.images, category, dataset.bit_depth, depth_given,
                                       suggested_intensity_window(dataset.paths))
    if message:
        warnings.warn(message)


def other_run_message(found, state, differing, previous):
    """Why --resume refuses the ``state`` run ``found`` (of meta ``previous``): its
    ``run_differences`` ``differing`` (with the option that keeps a run's 16-bit images read as it
    read them, where their bit depth or intensity window differs: the rule that finds a depth has
    changed; and the one that keeps its network's input standardisation, where that differs: a run
    of a calibrated recipe from before it was the default; a note where nothing but the
    calibration's measurements differs, as after a change of its code: an option that the
    calibration keeps as given changes its measurements too, and then differs as well)."""
    depth = previous.get('bit_depth') if any(line.startswith('bit_depth: ') for line in differing) else None
    keep = '' if depth is None else f"; {reading_option(depth)} reads its images as it did"
    if any(line.startswith('model_config.standardize_input: ') for line in differing):
        standardized = previous.get('model_config', {}).get('standardize_input')
        keep += f"; --{'' if standardized else 'no-'}standardize-input trains its network as it did"
    if differing and all(line.startswith('calibration.') for line in differing):
        keep += ("; only the recipe calibration's measurements differ (its training images or the "
                 "calibration's code changed since), which no option restores")
    return (f"cannot resume the {state} run {found}: it was run with other arguments (then vs now: "
            f"{'; '.join(differing)}){keep}; pass --force to train again and replace it, or use another "
            f"output folder")


def train_unless_finished(prog, run_dir, name, prepare, resume=False, force=False, replace_other=False):
    """Train the run ``name`` in ``run_dir`` unless ``resume`` finds its final model there.

    Temporary files of a save that was killed are removed first (``remove_stale_temporaries``; by
    the first process of a torchrun launch alone, which writes the run's files).
    The run in ``run_dir`` is interrupted when its checkpoint belongs to another run than its
    final model (a --force run with other arguments that was interrupted), or there is no final
    model; else finished (``found_run``). A finished or interrupted run in ``run_dir`` is never
    replaced unless ``force``: without ``resume`` it is refused; with ``resume`` its checkpoint
    must belong to the same run (``run_differences``: epochs, learning rate, data folder, generator
    arguments ...), then a finished run is skipped and an interrupted one continued. ``prepare()``
    returns (dataset, model, TrainConfig, meta, validator or None); what it prints (a calibrated
    recipe) is shown when the run trains, or when ``prepare`` fails, not before a refusal or a skip;
    a trained run ends with a line naming its final model (and with --select best its epoch), except
    with ``replace_other``.
    Refusals and the errors of ``prepare`` are input errors of the command line ``prog`` (see
    ``exit_on_input_error``). ``replace_other``: with ``resume``, a run of other arguments is
    trained again and replaced instead of refused (for --recipe search candidates, which are not
    results). Returns the run's meta (a skipped run's as its final model holds it).

    All of it runs under the run's lock (``run_lock``, held by the first process of a torchrun
    launch for all of them): a second command on the same run stops with an error naming the
    process that trains it.
    """
    first = is_first_process()  # the process that writes the run's files (another's may lag behind it)
    with exit_on_input_error(prog, (RunInProgressError,)), run_lock(run_dir, name) if first else nullcontext():
        if first:
            for stale in remove_stale_temporaries(run_dir, lambda filename: is_run_file(filename, name)):
                print(f"{prog}: removed {stale}, left by an interrupted save")
        with exit_on_input_error(prog):
            found, state = (None, None) if force else found_run(run_dir, name)  # force: none kept
            if not (resume or force):
                refuse_existing_run(found, state)
            printed = io.StringIO()  # what prepare() prints (a calibrated recipe ...): shown once it trains
            try:
                with redirect_stdout(printed):
                    dataset, model, config, meta, validator = prepare()
            except BaseException:
                print(printed.getvalue(), end='')
                raise
            if found and resume:
                previous = read_meta(found)
                differing = run_differences(previous, run_meta(model, config, meta, validator))
                if differing and replace_other:
                    print(f"{prog}: {found} was run with other arguments: training it again")
                    resume, state = False, None
                elif differing:
                    raise ValueError(other_run_message(found, state, differing, previous))
        if resume and state == 'finished':
            print(f"{prog}: {found} exists, skipping it")
            return previous
        print(printed.getvalue(), end='')
        with exit_on_input_error(prog, (RunError, OSError)):  # OSError: a file that cannot be written
            meta = train(model, dataset, config, run_dir, name, meta=meta, resume=resume, validator=validator)
        if first and not replace_other:  # (not for --recipe search's candidates, which are not results)
            held = f" ({meta['held_out']} held out for validation)" if meta.get('held_out') else ''
            best = (f" (the weights of epoch {meta['best_epoch']}, the best validation score)"
                    if config.select == 'best' and meta.get('best_epoch') else '')
            print(f"{prog}: {name}: trained on {len(dataset)} images{held}; model in "
                  f"{final_model_path(run_dir, name)}{best}")
        return meta


# ------------------------------------------------------------------------------------------------
# Data layouts (training and MVTec-layout evaluation)
# ------------------------------------------------------------------------------------------------

def add_layout_arguments(parser):
    """The data-layout argument group (``self_sup_data.layouts``): --format, --normal,
    --abnormal, --mask-dir, --allow-missing-masks."""
    group = parser.add_argument_group('data layout')
    group.add_argument('--format', choices=FORMATS, default=None,
                       help='folder layout of the data (default: detected; folder needs --normal)')
    group.add_argument('--normal', type=path_argument, metavar='DIR', help='--format folder: the normal images')
    group.add_argument('--abnormal', type=path_argument, metavar='DIR',
                       help='--format folder: the anomalous test images (python -m experiments.mvtec_tasks also '
                            'takes it alone, for models of the folder format with their own normal folder; '
                            'without --mask-dir, at image level only)')
    group.add_argument('--mask-dir', type=path_argument, metavar='DIR',
                       help='--format folder: masks of the anomalous images, matched by file stem')
    group.add_argument('--allow-missing-masks', action='store_true',
                       help='evaluate defect images without a mask at image level only (counted '
                            'in a warning; default: a missing mask is an error)')


def layout_from_args(args, test_folders=False):
    """The layout that the parsed ``add_layout_arguments`` select (None: detect it); with
    ``test_folders`` (an evaluation), --abnormal and --mask-dir alone are ``DefectFolders`` of models
    of the folder format, whose normal folder the models record."""
    if test_folders and args.format is None and args.normal is None and (args.abnormal or args.mask_dir):
        return DefectFolders(args.abnormal, args.mask_dir)
    return make_layout(args.format, args.normal, args.abnormal, args.mask_dir)


# ------------------------------------------------------------------------------------------------
# Evaluation commands
# ------------------------------------------------------------------------------------------------

def evaluation_parser(prog, description, data_help, data_required=True):
    """ArgumentParser of an evaluation command with the arguments every evaluation takes:
    -m/--model-dir, -d/--data-dir (``data_help``; optional unless ``data_required``), -o/--out-dir
    and -s/--settings; the parsed arguments carry ``prog``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.set_defaults(prog=prog)
    parser.add_argument('-m', '--model-dir', type=path_argument, required=True,
                        help='folder of the trained models (searched recursively)')
    parser.add_argument('-d', '--data-dir', type=path_argument, required=data_required, help=data_help)
    parser.add_argument('-o', '--out-dir', type=path_argument, required=True,
                        help='folder for results, tables and figures')
    parser.add_argument('-s', '--settings', nargs='+', default=None,
                        help='setting keys (a key without seed takes every seed; default: all found)')
    return parser


def add_evaluation_options(parser):
    """Add the options every evaluation has: --device, --batch-size, --percent, --no-figures."""
    parser.add_argument('--device', default=None, help="e.g. cpu, cuda (default: cuda when available)")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--percent', action='store_true', help='tables in percent with one decimal')
    parser.add_argument('--no-figures', action='store_true', help='skip the example figures')


def run_command(work):
    """Run ``work()`` for a command line: each warning becomes a ``warning: ...`` line and an input
    error (ValueError, OSError: a missing file or one that cannot be written, KeyError) one
    ``error: ...`` line and exit status 1."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', UserWarning)
        try:
            return work()
        except (ValueError, OSError, KeyError) as error:
            sys.exit(f'error: {error.args[0] if isinstance(error, KeyError) and error.args else error}')
        finally:
            for warning in caught:
                print(f'warning: {warning.message}', file=sys.stderr)


REPORT_WRITE_SECONDS = 60  # longer than any write of a results file, table or figure lasts


def remove_report_temporaries(out_dir):
    """Delete the temporary files that a killed evaluation left: of results.csv in ``out_dir``
    (only those: it may be a training folder too), and any in ``out_dir/tables`` and
    ``out_dir/figures`` (``remove_stale_temporaries``), those older than REPORT_WRITE_SECONDS (a
    younger one may be another evaluation's, writing into the same folder)."""
    if Path(out_dir).is_dir():
        remove_stale_temporaries(out_dir, lambda name: name == 'results.csv', older_than=REPORT_WRITE_SECONDS)
    for folder in (Path(out_dir) / 'tables', Path(out_dir) / 'figures'):
        if folder.is_dir():
            remove_stale_temporaries(folder, older_than=REPORT_WRITE_SECONDS)


SUMMARY_COLUMNS = {'image_auroc_mean': 'image AUROC (mean)', 'image_auroc_max': 'image AUROC (max)',
                   'pixel_auroc': 'pixel AUROC', 'au_pro': 'AU-PRO'}
# shown where a result has it: a two-stage (CutPaste-3way) model's own image score
POOLED_SUMMARY_COLUMN = {'image_auroc_pooled': 'image AUROC (pooled features)'}


def print_summary(records):
    """Print one line per result of ``records`` (category, setting, seed) with the figures of
    SUMMARY_COLUMNS (and POOLED_SUMMARY_COLUMN where a result has it), under a header."""
    columns = {**SUMMARY_COLUMNS, **{m: name for m, name in POOLED_SUMMARY_COLUMN.items()
                                     if any(m in r for r in records)}}
    header = ['category', 'setting', 'seed'] + list(columns.values())
    rows = [[str(r['category']), str(r['setting']), str(r['seed'])]
            + [f"{r.get(m, float('nan')):.3f}" for m in columns] for r in records]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))


def run_evaluation(args, evaluate, write_report, nothing_found):
    """The body of an evaluation command (parsed ``evaluation_parser`` arguments ``args``):
    ``records = evaluate(figure_dir)`` (None with --no-figures, else OUT_DIR/figures), a
    FileNotFoundError ``nothing_found`` when there are none (or naming MODEL_DIR when every one
    is a requested pair without a checkpoint), ``write_evaluation``; errors and
    warnings as in ``run_command``, Ctrl-C as in ``exit_on_interrupt``. Prints each result's figures
    (``print_summary``) and where the tables are, and returns the records; when some records failed
    (an ``error`` entry), the last lines name each with its reason and the command exits with
    status 1 once everything else is written."""
    def work():
        if args.batch_size < 1:
            raise ValueError(f'--batch-size must be a positive integer, got {args.batch_size}')
        resolve_device(args.device)
        check_evaluation_dir(args.out_dir, figures=not args.no_figures)
        remove_report_temporaries(args.out_dir)
        figure_dir = None if args.no_figures else Path(args.out_dir) / 'figures'
        earlier_figures = figure_files(figure_dir)
        records = evaluate(figure_dir)
        if not records:
            raise FileNotFoundError(nothing_found)
        written = write_evaluation(records, args.out_dir, figure_dir, write_report, earlier_figures) is not None
        print_summary(records)
        if written:
            print(f"{len(records)} results evaluated; tables in {Path(args.out_dir) / 'tables'}")
        elif not any(failed(record) for record in records):
            raise FileNotFoundError(f"no checkpoint of the requested settings and categories under "
                                    f"{args.model_dir}; the earlier files in {args.out_dir} are kept")
        return records, written
    with exit_on_interrupt(args.prog, f'{Path(args.out_dir) / "results.csv"} and its tables are written as a '
                                      f'whole when an evaluation ends (an interrupt while they are written '
                                      f'waits for them; its figures as each model is evaluated)'):
        records, written = run_command(work)
    if report_problems(records, written):
        sys.exit(1)
    return records


def write_evaluation(records, out_dir, figure_dir, write_report, earlier_figures=None):
    """Unless none of ``records`` was evaluated (each one failed, with an ``error`` entry, or has
    no checkpoint; then an earlier evaluation's results, tables and figures stay as they are):
    remove the earlier figures in ``figure_dir`` (None: no figures) of results that all failed,
    ``write_report(records)`` (which writes ``out_dir/results.csv``), and then the figures of
    results that it does not hold (``remove_figures_of_other_results``, of ``earlier_figures``),
    all while holding the folder's ``results_lock`` (an evaluation that merges its results with the
    earlier ones there reads them in ``write_report``) and Ctrl-C (``signals_held``: an interrupt
    comes once they are all written). Returns what ``write_report`` returns (the
    tables), or None when nothing was written."""
    if all(failed(record) or record.get('checkpoint') is None for record in records):
        return None
    with results_lock(out_dir), signals_held():  # results.csv and the tables as a whole, or not at all
        if figure_dir is not None:
            remove_failed_figures(records, figure_dir)
        written = write_report(records)
        if figure_dir is not None and Path(figure_dir).is_dir():
            remove_figures_of_other_results(figure_dir, Path(out_dir) / 'results.csv', earlier_figures)
    return written


def figure_files(figure_dir):
    """{path: modification time (ns)} of the example figures in ``figure_dir`` (None or a missing
    folder: none), taken as an evaluation starts: ``write_evaluation``'s ``earlier_figures``."""
    if figure_dir is None or not Path(figure_dir).is_dir():
        return {}
    return {path: path.stat().st_mtime_ns for path in Path(figure_dir).glob('*_*.png')}


def remove_figures_of_other_results(figure_dir, results_path, earlier=None):
    """Remove the example figures in ``figure_dir`` (``<category>_<setting>.png``, ``figure_path``)
    of a category and setting that no result in ``results_path`` has: an earlier evaluation's into
    the same folder, of results that the tables no longer hold, which would look current. Only those
    in ``earlier`` (``figure_files`` as the evaluation started; None: all), unchanged since: a figure
    written meanwhile is another evaluation's into the same folder, whose result is still to come.
    Files not named so are kept."""
    shown = {figure_path(figure_dir, record['category'], record['setting']) for record in read_results(results_path)}
    for path in Path(figure_dir).glob('*_*.png'):
        if (path not in shown and _names_a_result_setting(path.stem.rpartition('_')[2])
                and (earlier is None or earlier.get(path) == _modified_ns(path))):
            path.unlink(missing_ok=True)


def _modified_ns(path):
    """The modification time (ns) of ``path``; None where it is gone (removed by another evaluation)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _names_a_result_setting(name):
    try:
        split_result_setting(name)
    except ValueError:
        return False
    return True


def report_problems(records, written=True):
    """Print (to stderr) a note for each category whose pixel metrics are undefined and, when
    some records failed (an ``error`` entry), a line naming each with its reason, last; return
    the failed records. ``written``: whether the records were written (``write_evaluation``; where
    every one failed, nothing is, and the output folder keeps its earlier files)."""
    undefined = {(record['category'], record['undefined']) for record in records
                 if isinstance(record.get('undefined'), str)}
    for category, reason in sorted(undefined):
        print(f'note: {category}: {reason} (NaN in the tables)', file=sys.stderr)
    failures = [record for record in records if failed(record)]
    if failures:
        where = ('NaN in the tables; each below, with its reason, also in the error column of results.csv'
                 if written else 'nothing was written, and the output folder keeps the files of its earlier '
                                 'evaluation; each below, with its reason')
        print(f'error: {len(failures)} of {len(records)} results failed ({where}):', file=sys.stderr)
        for record in failures:
            print(f"failed: {record['category']} {record['setting']} seed {record['seed']} "
                  f"({record['checkpoint']}): {record['error']}", file=sys.stderr)
    return failures
