"""Resume, in one process: what a checkpoint restores (optimiser, schedule, scaler, EMA, criterion, RNG streams),
when auto-resume refuses another run's checkpoint, and how ranks agree on the file to read.

The trainer-level resume tests (test_trainer, test_faults, test_distributed) run whole training jobs, often in
subprocesses; these check each piece directly, including the multi-rank and CUDA paths, imitated on the CPU.
"""
import random
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import deit.distributed as du
import deit.main as dm
from data.io import CheckpointError
from deit.config import resolve_config
from deit.recipes import parse_args
from deit.train_state import check_same_run, read_resume_checkpoint, restore_rng, resume, rng_state, set_rng_state
from tests.conftest import trained_checkpoint, training_state


def _params(module):
    return [p.detach().clone() for p in module.state_dict().values()]


def test_restore_training_state_restores_everything_the_run_needs(capsys):
    src, ckpt, _ = trained_checkpoint()
    dst = training_state(1)
    resume(dst, ckpt, 'ck.pth', seed=0)  # rank 0 of 1 by default
    out = capsys.readouterr().out
    assert out == 'resumed from ck.pth (epoch 3); starting at epoch 4\n'
    assert dst.start_epoch == 4
    sd, want = dst.optimizer.state_dict(), src.optimizer.state_dict()
    assert all(torch.equal(sd['state'][k]['momentum_buffer'], want['state'][k]['momentum_buffer'])
               for k in want['state'])
    assert dst.lr_scheduler.state_dict() == src.lr_scheduler.state_dict()
    assert [g['lr'] for g in dst.optimizer.param_groups] == [g['lr'] for g in src.optimizer.param_groups]
    assert all(torch.equal(a, b) for a, b in zip(_params(dst.model_ema.module), _params(src.model_ema.module)))
    assert not torch.equal(_params(dst.model_ema.module)[0], _params(dst.model)[0])
    assert torch.equal(dst.criterion.supervise, torch.full((3, 3), 1 / 3))
    assert dst.max_accuracy == 42.5 and dst.last_test_stats == {'acc1': 41.0}


def test_restore_training_state_continues_the_rng_streams():
    _, ckpt, after = trained_checkpoint()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    resume(training_state(1), ckpt, 'ck.pth', seed=0)
    assert torch.equal(torch.rand(3), after[0]) and random.random() == after[1] and np.random.rand() == after[2]


def test_restore_training_state_tolerates_missing_parts_and_says_what_it_did(capsys):
    _, ckpt, _ = trained_checkpoint()
    for key in ('max_accuracy', 'test_stats', 'model_ema', 'criterion', 'scaler'):
        del ckpt[key]
    dst = training_state(1, scaler=True)
    ema_before = _params(dst.model_ema.module)
    dst.criterion.supervise.fill_(0.5)
    resume(dst, ckpt, 'ck.pth', seed=0, rank=0, world=1)
    assert dst.max_accuracy == 0.0 and dst.last_test_stats == {}
    assert all(torch.equal(a, b) for a, b in zip(_params(dst.model_ema.module), ema_before))  # left as built
    assert torch.equal(dst.criterion.supervise, torch.full((3, 3), 0.5))
    assert capsys.readouterr().out.splitlines() == [
        'note: ck.pth has no loss-scaler state (saved without fp16 AMP); starting a fresh scale',
        'resumed from ck.pth (epoch 3); starting at epoch 4']
    # a run without EMA resumes a checkpoint that has one
    _, ckpt, _ = trained_checkpoint()
    resume(training_state(1, ema=False), ckpt, 'ck.pth', seed=0)
    # weights only (a released model): nothing but the weights to restore, the run starts at its own epoch
    weights_only = training_state(1)
    resume(weights_only, {'model': {}, 'epoch': 7}, 'w.pth', seed=0)
    resume(weights_only, {'model': {}}, 'w.pth', seed=0)
    assert weights_only.start_epoch == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ['resumed from w.pth (epoch 7); starting at epoch 0',
                                                         'resumed from w.pth (epoch ?); starting at epoch 0']


def test_restore_training_state_loads_the_fp16_scale():
    _, ckpt, _ = trained_checkpoint(scaler=True)
    dst = training_state(1, scaler=True)
    resume(dst, ckpt, 'ck.pth', seed=0)
    assert dst.loss_scaler.state_dict()['scale'] == 128.0


def test_resume_with_another_world_size_reseeds_each_rank(capsys):
    _, ckpt, _ = trained_checkpoint(world_size=2)
    resume(training_state(1), ckpt, 'ck.pth', seed=7, rank=1, world=3)
    assert torch.initial_seed() == 7 + 1000 * 4 + 1
    assert capsys.readouterr().out.splitlines() == [
        'note: RNG streams reseeded (checkpoint has 2 RNG state(s), this run 3 process(es))',
        'note: checkpoint written with 2 process(es), resuming with 3: the lr schedule continues from the '
        'checkpoint; data order and RNG streams differ',
        'resumed from ck.pth (epoch 3); starting at epoch 4']


def test_restore_rng_own_state_per_rank_or_reseed_beyond_numpy_range():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        states.append(rng_state())
    assert restore_rng(states, rank=1, world=2, reseed=0) == 'restored'
    assert torch.initial_seed() == 2 and random.random() == random.Random(2).random()
    assert np.random.rand() == np.random.RandomState(2).rand()
    assert restore_rng(states[0], rank=0, world=1, reseed=0) == 'restored'  # single-process checkpoints
    assert torch.initial_seed() == 1
    big = 2 ** 32 + 5  # numpy takes 32-bit seeds: reduced modulo 2**32, the others take the seed as is
    assert restore_rng(None, rank=2, world=4, reseed=big) == \
        'reseeded (checkpoint has 0 RNG state(s), this run 4 process(es))'
    assert torch.initial_seed() == big + 2 and random.random() == random.Random(big + 2).random()
    assert np.random.rand() == np.random.RandomState(7).rand()


def test_numpy_and_python_streams_round_trip_mid_gaussian_and_as_lists():
    np.random.seed(3), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian (has_gauss=1): the state's last two fields matter
    st = rng_state()
    want = (np.random.normal(), np.random.randint(1 << 30), random.random())
    np.random.seed(0), random.seed(0)
    set_rng_state(st)
    assert (np.random.normal(), np.random.randint(1 << 30), random.random()) == want

    def as_lists(x):  # how the python state looks after a trip through JSON or another pickler
        return [as_lists(v) for v in x] if isinstance(x, (list, tuple)) else x
    set_rng_state({**st, 'python': as_lists(st['python'])})
    np.random.normal(), np.random.randint(1 << 30)
    assert random.random() == want[2]


def test_cuda_rng_streams_restored_only_onto_the_same_gpu_count(monkeypatch):
    """No GPU here: torch.cuda's RNG calls are imitated; the states are CPU tensors standing in for them."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [torch.ones(2), torch.zeros(2)])
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', calls.append)
    st = rng_state()
    assert [t.tolist() for t in st['cuda']] == [[1, 1], [0, 0]]
    set_rng_state(st)
    assert calls == [st['cuda']]
    set_rng_state({**st, 'cuda': st['cuda'][:1]})  # written on another GPU count: those streams do not apply
    set_rng_state({k: v for k, v in st.items() if k != 'cuda'})  # written on a CPU
    assert calls == [st['cuda']]


# ---------------------------------------------------------------- auto-resume refuses another run
def _saved(**kw):
    base = dict(model='deit_tiny_patch16_224', loss='maxsup', alpha=0.1, epochs=300, batch_size=32, accum_iter=2)
    return Namespace(**{**base, **kw})


def test_check_same_run_compares_run_defining_args_and_total_batch():
    now = Namespace(model='deit_tiny_patch16_224', loss='maxsup', alpha=0.1, epochs=300, lr=1.0)
    ckpt = {'args': _saved(), 'world_size': 2}

    def at(config, total_batch):  # the run configuration records its images per optimizer step
        return Namespace(**vars(config), total_batch=total_batch)
    check_same_run(at(now, 32 * 2 * 2), ckpt, 'ck.pth')
    check_same_run(at(now, 32 * 2), {'args': vars(_saved())}, 'ck.pth')  # dict args, world 1
    check_same_run(at(now, 32), {'args': Namespace(batch_size=32)}, 'ck.pth')  # no accum_iter recorded: 1
    check_same_run(at(now, 7), {}, 'ck.pth')  # no args recorded: nothing to compare
    check_same_run(at(Namespace(), 64), {'args': _saved()}, 'ck.pth')  # args only the checkpoint has
    with pytest.raises(ValueError) as e:
        check_same_run(at(Namespace(**{**vars(now), 'loss': 'ls', 'alpha': 0.2}), 64), ckpt, 'ck.pth')
    assert str(e.value) == (
        "ck.pth belongs to another run; refusing to auto-resume it. Differing arguments: "
        "loss: 'maxsup' in the checkpoint, 'ls' now; alpha: 0.1 in the checkpoint, 0.2 now; "
        "total_batch: 128 in the checkpoint, 64 now. Start fresh with another --output_dir (or "
        "--no-auto-resume: that run's files are moved to ./previous_run first), or continue that checkpoint "
        "on purpose with --resume ck.pth")
    dense = {'args': _saved(loss='zipf', zipf_dense=True, focal_gamma=2.0), 'world_size': 2}  # every loss option
    with pytest.raises(ValueError, match=r"Differing arguments: zipf_dense: True in the checkpoint, False now\. "):
        check_same_run(at(Namespace(**{**vars(now), 'loss': 'zipf', 'zipf_dense': False, 'focal_gamma': 2.0}),
                          128), dense, 'ck.pth')


# ---------------------------------------------------------------- which file every rank resumes from
def test_read_resume_checkpoint_in_one_process(tmp_path, capsys):
    args = Namespace(resume='', auto_resume=True)
    assert read_resume_checkpoint(args, tmp_path) == (None, None)
    assert read_resume_checkpoint(args, None) == (None, None)
    torch.save({'epoch': 3}, tmp_path / 'checkpoint.pth')
    path, ckpt = read_resume_checkpoint(args, tmp_path)
    assert path == str(tmp_path / 'checkpoint.pth') and ckpt == {'epoch': 3}
    assert capsys.readouterr().out == f'auto-resuming from {path}\n'
    assert read_resume_checkpoint(Namespace(resume='', auto_resume=False), tmp_path) == (None, None)
    torch.save({'epoch': 9}, tmp_path / 'other.pth')
    path, ckpt = read_resume_checkpoint(Namespace(resume=str(tmp_path / 'other.pth'), auto_resume=True), tmp_path)
    assert path == str(tmp_path / 'other.pth') and ckpt == {'epoch': 9}  # --resume wins over auto-resume
    with pytest.raises(CheckpointError, match=f'^checkpoint not found: {tmp_path}/missing.pth$'):
        read_resume_checkpoint(Namespace(resume=str(tmp_path / 'missing.pth'), auto_resume=True), tmp_path)
    (tmp_path / 'bad.pth').write_text('{"not": "a checkpoint"}')
    with pytest.raises(CheckpointError, match='bad.pth: a JSON file, not a PyTorch checkpoint'):
        read_resume_checkpoint(Namespace(resume=str(tmp_path / 'bad.pth'), auto_resume=True), tmp_path)


def _as_rank(monkeypatch, rank: int, from_rank0: list, readable: list):
    """Imitate one rank of a multi-process job: broadcasts return rank 0's values in order."""
    sent = iter(from_rank0)
    monkeypatch.setattr(du, 'is_main_process', lambda: rank == 0)
    monkeypatch.setattr(du, 'broadcast_object', lambda obj=None, src=0: obj if rank == 0 else next(sent))
    monkeypatch.setattr(du, 'all_gather_object', lambda obj: [obj if r == rank else ok for r, ok in
                                                              enumerate(readable)])


def test_read_resume_checkpoint_rank_without_the_file_gets_rank0s_copy(tmp_path, monkeypatch, capsys):
    # rank 1 on a node whose output dir is not shared: it neither auto-resumes by itself nor reads the file
    _as_rank(monkeypatch, 1, ['/rank0/checkpoint.pth', ({'epoch': 5}, None)], [True, False])
    args = Namespace(resume='', auto_resume=True)
    assert read_resume_checkpoint(args, tmp_path) == ('/rank0/checkpoint.pth', {'epoch': 5})
    assert capsys.readouterr().out == '/rank0/checkpoint.pth is not readable on every rank: rank 0 sent its copy\n'
    _as_rank(monkeypatch, 1, ['/rank0/checkpoint.pth', (None, 'ck: truncated')], [True, False])
    with pytest.raises(CheckpointError, match='^ck: truncated$'):
        read_resume_checkpoint(args, tmp_path)
    # rank 0 reads its file and sends it when another rank cannot see it
    torch.save({'epoch': 2}, tmp_path / 'checkpoint.pth')
    _as_rank(monkeypatch, 0, [], [True, False])
    assert read_resume_checkpoint(args, tmp_path) == (str(tmp_path / 'checkpoint.pth'), {'epoch': 2})
    # rank 1 whose own output dir has a checkpoint still follows rank 0's decision (here: start fresh)
    _as_rank(monkeypatch, 1, [None], [False, True])
    assert read_resume_checkpoint(args, tmp_path) == (None, None)


@pytest.mark.parametrize('flags, restored', [([], True), (['--no-resume-opt'], False)])
def test_a_resumed_run_restores_the_optimizer_unless_told_not_to(flags, restored, tmp_path):
    src, ckpt, _ = trained_checkpoint()
    run = SimpleNamespace(state=training_state(1), tb_resume=None)
    cfg = resolve_config(parse_args(['--data-set', 'DEMO', '--output_dir', str(tmp_path), *flags]), 3)
    (tmp_path / 'log.txt').write_text(''.join(f'{{"epoch": {e}}}\n' for e in range(3)))  # killed before its line
    dm.resume_run(cfg, run, ckpt, 'ck.pth')
    assert (tmp_path / 'log.txt').read_text().splitlines()[-1] == '{"epoch": 3}'  # the checkpoint's record
    assert run.state.start_epoch == 4 and run.tb_resume == (3, {'epoch': 3})  # TensorBoard resumes at the record
    momentum = [s['momentum_buffer'] for s in run.state.optimizer.state_dict()['state'].values()]
    expected = [s['momentum_buffer'] for s in src.optimizer.state_dict()['state'].values()] if restored else []
    assert len(momentum) == len(expected) and all(torch.equal(a, b) for a, b in zip(momentum, expected))


def test_eval_of_a_checkpoint_only_names_it(capsys):
    run = SimpleNamespace(state=training_state(1), tb_resume=None)
    before = {k: v.clone() for k, v in run.state.model.state_dict().items()}
    dm.resume_run(resolve_config(parse_args(['--data-set', 'DEMO', '--eval']), 3), run, {'model': {}}, 'w.pth')
    assert capsys.readouterr().out == 'evaluating w.pth (epoch ?)\n'  # weights only: no epoch recorded
    assert run.state.start_epoch == 0 and run.tb_resume is None
    assert all(torch.equal(v, before[k]) for k, v in run.state.model.state_dict().items())
