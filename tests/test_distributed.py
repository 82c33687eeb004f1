"""Training in several processes (as torchrun launches them), on the CPU with the gloo backend."""
import copy
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp

from experiments import training
from experiments.training import RunError, final_model_path, last_checkpoint_path, train
from test_training import CrashAtEpoch, SquaresDataset, TinyNet, config, fresh_model

WORLD_SIZE = 2


class KeyRecorder(SquaresDataset):
    """SquaresDataset that records the (epoch, index) keys it is asked for."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.keys = []

    def __getitem__(self, index):
        self.keys.append((self.epoch, index))
        return super().__getitem__(index)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def become_rank(rank, port):
    """Set the environment that torchrun gives process ``rank`` of WORLD_SIZE (one thread each)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)


def run_rank(rank, port, run_dirs, out_dir, crash_epoch):
    """One process of a two-process run: the environment torchrun sets, then ``train`` (and a
    resume after the crash at ``crash_epoch``, if any); saves its keys and weights to out_dir."""
    become_rank(rank, port)
    dataset = KeyRecorder(n=7)
    settings = config(epochs=3, batch_size=4, device='cpu')
    model = fresh_model()
    if crash_epoch is not None:
        try:
            train(fresh_model(), CrashAtEpoch(crash_epoch, n=7), settings, run_dirs[rank], 'toy')
        except KeyboardInterrupt:
            pass
        torch.distributed.barrier()  # rank 0's checkpoint is written
    train(model, dataset, settings, run_dirs[rank], 'toy', resume=crash_epoch is not None)
    torch.save(dict(keys=dataset.keys, model=model.state_dict()), out_dir / f'rank{rank}.pt')
    torch.distributed.destroy_process_group()


def two_processes(tmp_path, crash_epoch=None, shared=False):
    """Run ``run_rank`` in two processes -> their run folders and outputs. Rank r's run folder:
    tmp_path/run when ``shared``, else tmp_path/rank<r> (to see who writes)."""
    run_dirs = [tmp_path / ('run' if shared else f'rank{r}') for r in range(WORLD_SIZE)]
    mp.spawn(run_rank, args=(free_port(), run_dirs, tmp_path, crash_epoch), nprocs=WORLD_SIZE)
    return run_dirs, [torch.load(tmp_path / f'rank{r}.pt', weights_only=True)
                      for r in range(WORLD_SIZE)]


@pytest.mark.slow
def test_ranks_share_each_epoch_end_with_the_same_weights_and_rank_0_alone_writes(tmp_path):
    run_dirs, ranks = two_processes(tmp_path)
    for epoch in range(3):
        keys = [{i for e, i in rank['keys'] if e == epoch} for rank in ranks]
        assert len(keys[0]) == len(keys[1]) == 4  # 7 items padded to 8, 4 each
        assert keys[0] | keys[1] == set(range(7))
        assert len(keys[0] & keys[1]) == 1  # the one padded item; disjoint otherwise
    for key, value in ranks[0]['model'].items():
        assert torch.equal(value, ranks[1]['model'][key]), key
    assert final_model_path(run_dirs[0], 'toy').is_file()
    assert last_checkpoint_path(run_dirs[0], 'toy').is_file()
    assert not run_dirs[1].exists()
    meta = torch.load(final_model_path(run_dirs[0], 'toy'), weights_only=True)['meta']
    assert meta['world_size'] == WORLD_SIZE and len(meta['epoch_losses']) == 3


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole_dirs, _ = two_processes(tmp_path / 'whole', shared=True)
    parts_dirs, _ = two_processes(tmp_path / 'parts', crash_epoch=1, shared=True)
    whole = torch.load(final_model_path(whole_dirs[0], 'toy'), weights_only=True)
    parts = torch.load(final_model_path(parts_dirs[0], 'toy'), weights_only=True)
    assert parts['meta']['epoch_losses'] == whole['meta']['epoch_losses']
    for key, value in whole['model'].items():
        assert torch.equal(value, parts['model'][key]), key


@pytest.mark.slow
def test_only_the_first_process_evaluates_and_reports_after_training(tmp_path, monkeypatch, capsys):
    import train_mvtec
    from conftest import make_mvtec_category
    from experiments.training import is_first_process
    from test_reliability import as_second_torchrun_process
    make_mvtec_category(tmp_path / 'data', 'tiny')
    argv = ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '--epochs', '1',
            '--batch-size', '3', '--res-scale', '0.25', '--workers', '0', '--no-figures', '--recipe',
            'table', '--evaluate', '--min-object-pct', '0.5']  # an option 'tiny' ignores: a warning
    monkeypatch.setenv('RANK', '1')  # a RANK left in the environment, without torchrun: the only process
    assert is_first_process()
    as_second_torchrun_process(monkeypatch)
    assert not is_first_process()
    capsys.readouterr()
    assert train_mvtec.main(argv) == 0
    assert not (tmp_path / 'out' / 'eval').exists()  # rank 0 writes the evaluation, once
    assert capsys.readouterr() == ('', '')  # and alone prints notes, warnings and tables
    monkeypatch.setenv('RANK', '0')
    assert is_first_process() and train_mvtec.main(argv + ['--resume']) == 0
    assert (tmp_path / 'out' / 'eval' / 'results.csv').is_file()
    out, err = capsys.readouterr()
    assert 'image AUROC' in out and "train_mvtec.py: warning: --min-object-pct applies to an object mask" in err


def run_rank_with_its_own_data(rank, port, run_dir, out_dir):
    """One process of a two-process run whose second process has one training image fewer (a data
    folder copied incompletely to another machine): saves the error it ends with."""
    become_rank(rank, port)
    try:
        train(fresh_model(), SquaresDataset(n=8 - rank), config(epochs=2, batch_size=4, device='cpu'), run_dir,
              'toy', meta=dict(data_dir=f'/machine{rank}/data'))  # where the data lies may differ
    except RunError as error:
        (out_dir / f'rank{rank}.txt').write_text(str(error))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_processes_with_other_training_data_stop_with_an_error_not_a_hang(tmp_path):
    mp.spawn(run_rank_with_its_own_data, args=(free_port(), tmp_path / 'run', tmp_path), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):  # every process stops, so none waits for the other at a collective
        assert ("run 'toy': process 1 would train another run than process 0 (training images: 8 vs 7); every "
                "process needs the same data and arguments") == (tmp_path / f'rank{rank}.txt').read_text()
    assert not final_model_path(tmp_path / 'run', 'toy').exists()


def run_rank_whose_first_process_cannot_write(rank, port, run_dir, out_dir):
    """One process of a two-process run in which process 0 cannot write its checkpoint (a full
    disk, say): saves the error each process ends with."""
    become_rank(rank, port)
    if rank == 0:
        def full_disk(*args, **kwargs):
            raise OSError(28, 'No space left on device')
        training.save_torch_atomic = full_disk
    try:
        train(fresh_model(), SquaresDataset(n=8), config(epochs=2, batch_size=4, device='cpu'), run_dir, 'toy')
    except (OSError, RunError) as error:
        (out_dir / f'rank{rank}.txt').write_text(f'{type(error).__name__}: {error}')


@pytest.mark.slow
def test_the_other_processes_stop_with_one_line_when_the_first_stops_on_an_error(tmp_path):
    mp.spawn(run_rank_whose_first_process_cannot_write, args=(free_port(), tmp_path / 'run', tmp_path),
             nprocs=WORLD_SIZE)
    assert (tmp_path / 'rank0.txt').read_text() == 'OSError: [Errno 28] No space left on device'
    assert re.fullmatch(  # not gloo's error and its traceback
        r"RunError: process 1 of 2 stopped: another process of the run exited \(Connection closed by peer \[[^\]]*\]:"
        r"\d+\); its error, if it printed one, says why; once that is fixed, --resume continues from the run's last "
        r"checkpoint", (tmp_path / 'rank1.txt').read_text())
    assert not final_model_path(tmp_path / 'run', 'toy').exists()


def test_only_gloos_report_of_a_closed_connection_is_taken_for_another_process_gone(monkeypatch):
    gloo = RuntimeError('[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:29500. This is '
                        'typically caused by a remote worker crashing.')
    assert training.peer_gone(gloo) is None  # no process group
    monkeypatch.setattr(training.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(training.dist, 'get_world_size', lambda: 2)
    assert training.peer_gone(gloo) == 'Connection closed by peer [10.0.0.2]:29500'
    for own in ('CUDA out of memory', 'NCCL error: unhandled system error', 'Timed out waiting 1800000ms for recv'):
        assert training.peer_gone(RuntimeError(own)) is None  # this process's own errors keep their traceback


class BatchNormNet(TinyNet):
    """TinyNet with batch norm between its convolutions."""

    def __init__(self, channels=8):
        super().__init__(channels)
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.BatchNorm2d(channels),
                                          torch.nn.ReLU(), torch.nn.Conv2d(channels, 1, 1))


def run_rank_with_weight_averaging(rank, port, run_dir, out_dir):
    """One process of a two-process run with stochastic weight averaging; saves its keys."""
    become_rank(rank, port)
    torch.manual_seed(0)
    dataset = KeyRecorder(n=8)
    train(BatchNormNet(), dataset, config(epochs=2, swa_epochs=1, batch_size=4, device='cpu'), run_dir, 'toy')
    torch.save(dict(keys=dataset.keys), out_dir / f'rank{rank}.pt')
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_averaged_weights_get_batch_norm_statistics_of_every_processs_share(tmp_path):
    """With SWA the batch-norm statistics are recomputed on one more epoch, which the processes share:
    the final model holds the mean of the statistics of each process's batches (computed here
    independently with ``update_bn``), not the first process's alone."""
    mp.spawn(run_rank_with_weight_averaging, args=(free_port(), tmp_path / 'run', tmp_path), nprocs=WORLD_SIZE)
    final = torch.load(final_model_path(tmp_path / 'run', 'toy'), weights_only=True)['model']
    model = BatchNormNet()
    model.load_state_dict(final)
    shares = []
    for rank in range(WORLD_SIZE):
        recorded = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)['keys']
        keys = [index for epoch, index in recorded if epoch == 2]
        assert len(keys) == 4  # 8 items, 2 per batch and process
        items = SquaresDataset(n=8)
        items.set_epoch(2)
        batches = [torch.stack([items[index][0] for index in keys[i:i + 2]]) for i in range(0, len(keys), 2)]
        share = copy.deepcopy(model)
        torch.optim.swa_utils.update_bn(batches, share)
        shares.append(share.layers[1])
    for name in ('running_mean', 'running_var'):
        expected = (getattr(shares[0], name) + getattr(shares[1], name)) / 2
        torch.testing.assert_close(final[f'layers.1.{name}'], expected)
        assert not torch.allclose(final[f'layers.1.{name}'], getattr(shares[0], name))
