"""What only a GPU cluster exercises, imitated on CPU: NCCL-style process groups, SLURM, unequal ranks.

The multi-rank runs go through tests/dist_harness.py: the process group is made from the backend
specification of a CUDA run with NCCL swapped for gloo, so a collective on a CPU tensor fails here as it
would under NCCL, and every collective is recorded with the project function that made it.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import threading
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from data.build_zip_cache import main as build_zip
from deit import distributed as du
from data.io import save_atomic, temp_path
from deit.train_state import restore_rng, rng_state
from tests.conftest import (ROOT, TINY, checksums, corrupt_first_member, fake_slurm_bin, make_imagefolder, ok,
                            run_module, run_ranks)
from tests.dist_harness import COLLECTIVES, HELPERS, simulated_spec

HARNESS = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'tests.dist_harness']


@pytest.fixture(scope='module')
def bad_cache(tmp_path_factory):
    """A ZIP cache (3 classes, 8 train / 5 val images each) with one unreadable train and val image."""
    root = tmp_path_factory.mktemp('cluster')
    src = make_imagefolder(root / 'src', n_classes=3, n_train=8, n_val=5)
    assert build_zip(['--src', str(src), '--dst', str(root / 'cache')]) == 0
    for split in ('train', 'val'):
        corrupt_first_member(root / 'cache' / f'{split}.zip')
    return root / 'cache'


def collective_call_sites() -> set[str]:
    """Every project function in deit/ and data/ that calls a collective (directly or through du.*)."""
    names = set(COLLECTIVES) | HELPERS
    sites = set()
    for path in sorted((ROOT / 'deit').glob('*.py')) + sorted((ROOT / 'data').glob('*.py')):
        rel = path.relative_to(ROOT).as_posix()

        def visit(node, fn=None):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, child.name)
                    continue
                if isinstance(child, ast.Call):
                    f = child.func
                    name = (f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                            and f.value.id in ('dist', 'du') else f.id if isinstance(f, ast.Name) else None)
                    if name in names and not (rel == 'deit/distributed.py' and fn in HELPERS):
                        sites.add(f'{rel}:{fn}')
                visit(child, fn)

        visit(ast.parse(path.read_text()))
    return sites


def test_simulated_spec_swaps_only_the_cuda_backend():
    assert simulated_spec('cpu:gloo,cuda:nccl') == 'cpu:gloo,cuda:gloo'
    assert simulated_spec('nccl') == 'cuda:gloo'  # an NCCL-only group: nothing serves CPU tensors
    assert du.process_group_backend(True) == 'cpu:gloo,cuda:nccl'
    assert du.process_group_backend(False) == 'gloo'


@pytest.mark.slow
def test_gpu_style_process_group_runs_every_collective(bad_cache, tmp_path):
    """one epoch with --dist-eval, OLS, EMA and --skip-bad-images under a GPU-style group."""
    args = TINY + ['--data-set', 'IMNET', '--data-path', str(bad_cache), '--cache', '--skip-bad-images',
                   '--batch-size', '4', '--epochs', '1', '--loss', 'ols', '--dist-eval', '--model-ema', '--no-repeated-aug',
                   '--model-ema-decay', '0.9', '--output_dir', str(tmp_path / 'run')]
    # an NCCL-only group fails at the first CPU collective, as on a cluster
    legacy = run_module(HARNESS + ['--legacy-spec', 'nccl', '--'] + args[:-1] + [str(tmp_path / 'legacy')])
    assert legacy.returncode != 0
    assert 'No backend type associated with device type cpu' in legacy.stdout + legacy.stderr
    logs = tmp_path / 'collectives'
    (logs / 'stop').mkdir(parents=True)
    text = ok(run_module(HARNESS + ['--'] + args, env_extra={'COLLECTIVE_LOG': str(logs)}))
    sums = checksums(text)
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    ema = checksums(text, 'ema')
    assert set(ema) == {'0', '1'} and ema['0'] == ema['1']
    log = json.loads((tmp_path / 'run' / 'log.txt').read_text().splitlines()[0])
    assert log['train_skipped_images'] == 1 and log['test_skipped_images'] == 1
    assert log['test_n'] == 14  # 15 val images, one unreadable: exact over both ranks, reported
    # a stop signal that only rank 0 receives: both ranks stop at the same step and save together
    stopped = run_module(HARNESS + ['--signal-at', '0:2', '--'] + args[:-1] + [str(tmp_path / 'stopped')],
                         env_extra={'COLLECTIVE_LOG': str(logs / 'stop')})
    assert stopped.returncode != 0 and 'stopped by a signal: saved' in stopped.stdout
    ckpt = torch.load(tmp_path / 'stopped' / 'checkpoint.pth', weights_only=False)
    assert (ckpt['epoch'], ckpt['step']) == (-1, 3) and len(ckpt['rng']) == 2
    seen = set()
    for log_dir in (logs, logs / 'stop'):
        for rank in (0, 1):
            seen |= set(json.loads((log_dir / f'rank{rank}.json').read_text()))
    expected = collective_call_sites()
    assert expected - seen == set(), f'collectives never exercised: {sorted(expected - seen)}'
    for site in ('deit/logger.py:synchronize_between_processes', 'deit/engine.py:evaluate',
                 'deit/baselines.py:next_epoch', 'deit/engine.py:train_one_epoch', 'deit/loop.py:save_epoch'):
        assert site in seen


@pytest.mark.slow
def test_requeue_on_unshared_output_dir_resumes_every_rank_bit_identically(tiny_imagefolder, tmp_path):
    """rank 0 decides the resume, rank 1 (which cannot see the checkpoint) gets it
    by broadcast, and each rank gets its OWN RNG streams back: the resumed run equals the uninterrupted one."""
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--batch-size', '4',
                     '--epochs', '2', '--model-ema', '--model-ema-decay', '0.9', '--mixup', '0.8',
                     '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25']
    full = ok(run_module(HARNESS + ['--'] + common + ['--output_dir', str(tmp_path / 'full')]))
    out = tmp_path / 'requeued'
    first = run_module(HARNESS + ['--stop-at-epoch', '1', '--'] + common + ['--output_dir', str(out)])
    assert first.returncode == 0 and json.loads((out / 'log.txt').read_text())['epoch'] == 0
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert isinstance(ckpt['rng'], list) and len(ckpt['rng']) == 2
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])
    resumed = ok(run_module(HARNESS + ['--rank-local-output', '--'] + common + ['--output_dir', str(out)]))
    assert 'not readable on every rank: rank 0 sent its copy' in resumed
    assert 'starting at epoch 1' in resumed
    for what in ('parameter', 'ema'):
        a, b = checksums(full, what), checksums(resumed, what)
        assert set(a) == set(b) == {'0', '1'}
        assert a['0'] == a['1'] == b['0'] == b['1'], what


def _slurm(**kw):
    env = {'SLURM_PROCID': '3', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '3', 'SLURM_STEP_ID': '0',
           'SLURM_JOB_ID': '123456', 'SLURM_JOB_NODELIST': 'gpu[07-08]'}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_port_is_derived_from_the_job_id(monkeypatch):
    monkeypatch.setattr(du.shutil, 'which', lambda name: None)  # no scontrol here: the parser answers
    a, b = du.dist_env(_slurm()), du.dist_env(_slurm(SLURM_JOB_ID='123457'))
    assert a['master_port'] == str(15000 + 123456 % 20000) and a['master_port'] != b['master_port']
    assert du.dist_env(_slurm(MASTER_PORT='4000'))['master_port'] == '4000'
    assert a['master_addr'] == 'gpu07' and (a['rank'], a['world_size'], a['local_rank']) == (3, 8, 3)


@pytest.mark.parametrize('nodelist, hosts', [
    ('node[1-2]-ib', ['node1-ib', 'node2-ib']),
    ('x1000c0s[0-1]b0n[0-1]', ['x1000c0s0b0n0', 'x1000c0s0b0n1', 'x1000c0s1b0n0', 'x1000c0s1b0n1']),
    ('a[1-2]-b[3-4]', ['a1-b3', 'a1-b4', 'a2-b3', 'a2-b4']),
    ('gpu[01-03,07],cpu5', ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']),
    ('n[008-010]', ['n008', 'n009', 'n010']),
    ('single', ['single']),
])
def test_expand_nodelist_forms(nodelist, hosts):
    assert du.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize('bad', ['', 'a[1-2', 'a]1[', 'a[x-2]'])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match='cannot parse'):
        du.expand_nodelist(bad)


def test_expand_nodelist_skips_empty_items_and_names_the_whole_list_when_it_fails():
    assert du.expand_nodelist('a1,,b[2-3]') == ['a1', 'b2', 'b3']
    with pytest.raises(ValueError, match=r"node list 'c1,a\[x-2\]': bad range 'x-2'"):
        du.expand_nodelist('c1,a[x-2]')
    with pytest.raises(ValueError, match='unbalanced brackets'):  # nested groups are not SLURM's syntax
        du.expand_nodelist('a[[1-2]]')


def _fake_scontrol(tmp_path, monkeypatch, script: str) -> None:
    fake = tmp_path / 'scontrol'
    fake.write_text('#!/bin/sh\n' + script)
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')


def test_first_host_prefers_scontrol(tmp_path, monkeypatch):
    # answers only `scontrol show hostnames LIST`, as the real one does
    _fake_scontrol(tmp_path, monkeypatch, '[ "$1 $2" = "show hostnames" ] || exit 3\necho "from-scontrol-$3"\n'
                                          'echo other\n')
    assert du.first_host('weird[1-2]') == 'from-scontrol-weird[1-2]'


def test_first_host_does_not_trust_a_failed_scontrol(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, 'echo "error-text"\nexit 1\n')
    assert du.first_host('node[3-4]') == 'node3'  # our parser's answer, not the failed command's output


def test_first_host_bounds_a_hanging_scontrol(monkeypatch):
    calls = []

    def hanging(cmd, **kw):
        calls.append(kw.get('timeout'))
        raise subprocess.TimeoutExpired(cmd, kw.get('timeout'))
    monkeypatch.setattr(du.shutil, 'which', lambda name: '/usr/bin/scontrol')
    monkeypatch.setattr(du.subprocess, 'run', hanging)
    assert du.first_host('node[5-6]') == 'node5'
    assert calls and calls[0] is not None and 0 < calls[0] <= 30


def test_slurm_variables_outside_a_job_step_run_single_process(capsys):
    # python started directly in a batch script: SLURM_PROCID=0, 8 tasks, but no step -> single process
    assert du.dist_env(_slurm(SLURM_PROCID='0', SLURM_STEP_ID=None)) is None
    assert 'not a task of a job step' in capsys.readouterr().out
    assert du.dist_env(_slurm(SLURM_PROCID='0', SLURM_STEP_ID='4294967291')) is None  # the batch step
    assert du.dist_env(_slurm(SLURM_PROCID='9')) is None  # rank outside the task count
    assert du.dist_env(_slurm(SLURM_NTASKS='1')) is None
    # the step's own task count wins over the job's
    assert du.dist_env(_slurm(SLURM_STEP_NUM_TASKS='4'))['world_size'] == 4


def test_cuda_run_binds_local_rank_modulo_visible_gpus_and_uses_both_backends(monkeypatch):
    """each SLURM task sees only its own GPU; set_device comes before the first collective."""
    calls = []
    monkeypatch.setattr(du.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(du.torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(du.torch.cuda, 'set_device', lambda i: calls.append(('set_device', i)))
    monkeypatch.setattr(du.dist, 'init_process_group', lambda **kw: calls.append(('init', kw['backend'])))
    monkeypatch.setattr(du.dist, 'barrier', lambda: calls.append(('barrier',)))
    for k, v in {'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '5', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1'}.items():
        monkeypatch.setenv(k, v)
    place = du.init_distributed(None)
    assert place.gpu == 0 and place.backend == 'cpu:gloo,cuda:nccl' and (place.rank, place.world_size) == (5, 8)
    assert calls == [('set_device', 0), ('init', 'cpu:gloo,cuda:nccl'), ('barrier',)]


def test_part_cache_shards_give_every_rank_the_same_step_count():
    """N=1017 over 8 ranks, batch 64, drop_last: every rank takes the same number of steps."""
    from data.zip_cache import ShardSampler
    n, world, batch = 1017, 8, 64
    ds = Namespace(shard=None)
    samplers = []
    for rank in range(world):
        ds.shard = torch.arange(rank, n, world).numpy()
        samplers.append(ShardSampler.for_dataset(type('D', (), {'shard': ds.shard, '__len__': lambda s: n})(),
                                                 world, seed=0))
    steps = {len(s) // batch for s in samplers}
    assert steps == {2} and {len(s) for s in samplers} == {128}
    seen = set()
    for rank, s in enumerate(samplers):
        idx = list(s)
        assert len(idx) == 128 and all(i % world == rank for i in idx)  # a rank reads only its own shard
        seen |= set(idx)
    assert seen == set(range(n))  # padding repeats, nothing is dropped


def _empty_batch_rank(rank, world, init_file, results):
    """One rank of a DDP epoch where rank 1's second batch came out empty (every image unreadable)."""
    import datetime

    import torch.distributed as dist

    from deit.engine import LossScaler, train_one_epoch
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
        if rank == 1:
            batches[1] = (torch.empty(0), torch.empty(0, dtype=torch.long))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        criterion = lambda x, out, y: torch.nn.functional.cross_entropy(out, y)  # noqa: E731
        stats = train_one_epoch(model, criterion, batches, opt, torch.device('cpu'), 0, LossScaler('cpu', False),
                                print_freq=0, batches_may_be_empty=True)
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        out = {'skipped': stats['skipped_steps'], 'weights': w.tolist()}
    except Exception as e:  # a hang shows up as gloo's 20 s timeout
        out = {'error': repr(e)}
    # a file, not an mp.Queue: a queue's feeder thread may not have flushed when the process ends
    Path(results, f'rank{rank}.json').write_text(json.dumps(out))
    dist.destroy_process_group()


def test_an_empty_batch_on_one_rank_is_skipped_on_all_ranks(tmp_path):
    """A batch skipped on one rank alone would leave the other waiting in DDP's all-reduce."""
    out = run_ranks(_empty_batch_rank, 2, tmp_path, 2, tmp_path / 'init')
    assert out[0].get('skipped') == out[1].get('skipped') == 1, out
    assert out[0]['weights'] == out[1]['weights']


def test_rng_streams_are_restored_per_rank():
    torch.manual_seed(1)
    s0 = rng_state()
    torch.manual_seed(2)
    s1 = rng_state()
    assert restore_rng([s0, s1], rank=1, world=2, reseed=0) == 'restored'
    torch.manual_seed(2)
    expected = torch.rand(3)
    restore_rng([s0, s1], rank=1, world=2, reseed=0)
    assert torch.equal(torch.rand(3), expected)  # rank 1 continues its own stream, not rank 0's
    assert restore_rng([s0, s1], rank=1, world=4, reseed=7).startswith('reseeded')
    after = torch.rand(3)
    restore_rng([s0, s1], rank=2, world=4, reseed=7)
    assert not torch.equal(torch.rand(3), after)  # another rank, another stream
    assert restore_rng(s0, rank=0, world=1, reseed=0) == 'restored'  # single-process checkpoints of old


def test_atomic_saves_with_equal_pids_do_not_collide(tmp_path, monkeypatch):
    """ranks on different nodes (or PID namespaces) may share a PID."""
    monkeypatch.setattr(os, 'getpid', lambda: 4242)
    assert temp_path(tmp_path / 'x.pth') != temp_path(tmp_path / 'x.pth')
    big = {'w': torch.randn(512, 512)}
    errors = []

    def save():
        try:
            for _ in range(5):
                save_atomic(big, tmp_path / 'backbone.pth')
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(torch.load(tmp_path / 'backbone.pth')['w'], big['w'])
    assert not list(tmp_path.glob('.*tmp*'))


def test_criterion_follows_the_model_device():
    """OLS keeps its soft labels in buffers; they must live where the logits are."""
    from deit.args import check_args, get_args_parser
    from deit.build import setup_criterion
    from deit.config import resolve_config
    args = get_args_parser().parse_args(['--loss', 'ols', '--mixup', '0', '--cutmix', '0'])
    check_args(args)
    criterion, base, _ = setup_criterion(resolve_config(args, 5), 5, None, torch.device('meta'))
    assert {b.device.type for b in base.buffers()} == {'meta'}


def test_amp_resume_from_a_checkpoint_saved_without_amp(capsys):
    """a CPU (--no-amp) checkpoint has scaler == {}; an fp16 GradScaler refused it."""
    from deit.engine import LossScaler
    from deit.train_state import TrainingState, resume
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    saved = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'lr_scheduler': sched.state_dict(),
             'scaler': LossScaler('cpu', enabled=False).state_dict(), 'epoch': 3, 'rng': [rng_state()]}
    assert saved['scaler'] == {}
    scaler = LossScaler('cpu', enabled=True)
    state = TrainingState(model, opt, sched, scaler, torch.nn.Module())
    resume(state, saved, 'ckpt.pth', seed=0)
    assert state.start_epoch == 4 and 'no loss-scaler state' in capsys.readouterr().out
    enabled_state = {'scale': 1024.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                     '_growth_tracker': 0}
    resume(state, {**saved, 'scaler': enabled_state}, 'ckpt.pth', seed=0)
    assert scaler.state_dict()['scale'] == 1024.0


def test_fused_maxsup_soft_target_term_stays_fp32_under_autocast():
    """bmm under autocast ran in bf16 (1e-3 off the reference)."""
    from deit.losses import MaxSupLoss, MaxSupLossReference
    torch.manual_seed(0)
    z = torch.randn(64, 1000) * 3
    t = torch.softmax(torch.randn(64, 1000) * 4, 1)
    ref = MaxSupLossReference(0.15)(z, t)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fused = MaxSupLoss(0.15)(z, t)
    assert fused.dtype == torch.float32
    assert abs(float(fused) - float(ref)) < 2e-6


def test_value_checks_do_not_sync_every_step():
    """Performance: on an accelerator the label-range check (a host sync) runs once per VALUE_CHECK_EVERY."""
    from deit import losses
    crit = losses.MaxSupLoss(0.1)
    logits = torch.empty(4, 10, device='meta')  # a device whose values cannot be read: any sync would fail
    due = [losses.value_check_due(crit, logits) for _ in range(2 * losses.VALUE_CHECK_EVERY)]
    assert due.count(True) == 2 and due[0] and due[losses.VALUE_CHECK_EVERY]
    losses.check_inputs(logits, torch.empty(4, dtype=torch.long, device='meta'), values=False)
    with pytest.raises(ValueError, match='4 labels for a batch'):  # shape checks still run every time
        losses.check_inputs(torch.empty(3, 10, device='meta'), torch.empty(4, dtype=torch.long, device='meta'),
                            values=False)
    assert all(losses.value_check_due(crit, torch.zeros(2, 2)) for _ in range(3))  # CPU: always


def test_sbatch_script_passes_cpus_and_a_job_port_to_srun(tmp_path):
    bin_ = fake_slurm_bin(tmp_path)
    env = {'PATH': f'{bin_}:/usr/bin:/bin', 'DATA_PATH': '/data/imagenet', 'SLURM_JOB_NODELIST': 'node-[a-b]',
           'SLURM_JOB_ID': '777', 'SLURM_CPUS_PER_TASK': '80', 'SLURM_SUBMIT_DIR': str(ROOT)}
    r = subprocess.run(['bash', 'scripts/slurm_train.sbatch'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '--cpus-per-task=80' in r.stdout and '--kill-on-bad-exit=1' in r.stdout
    assert f'RDZV=node-a:{15000 + 777}' in r.stdout


def test_segmentation_launcher_port_is_per_job():
    env = {'PATH': '/usr/bin:/bin', 'PYTHON': 'python3', 'DRY_RUN': '1'}
    run = lambda **kw: subprocess.run(['bash', 'scripts/dist_train_seg.sh', 'cfg.py', '8'], cwd=ROOT,  # noqa
                                      env={**env, **kw}, capture_output=True, text=True).stdout
    assert '--standalone' in run()  # one machine, no job: torchrun picks a free port
    assert f'--master_port={15000 + 4321}' in run(SLURM_JOB_ID='4321')
    assert '--master_port=1234' in run(MASTER_PORT='1234', NNODES='2', MASTER_ADDR='h', NODE_RANK='0')


def test_submitit_srun_gets_cpus_and_kill_on_bad_exit(tmp_path, monkeypatch):
    pytest.importorskip('submitit')
    from tools.run_with_submitit import build_executor
    monkeypatch.setenv('PATH', f'{fake_slurm_bin(tmp_path)}:{os.environ["PATH"]}')
    args = Namespace(job_dir=str(tmp_path), cluster='slurm', partition=None, comment=None, ngpus=8, nodes=1,
                     cpus_per_task=10, timeout=60, job_name='t')
    ex = build_executor(args)
    text = ex._executor._make_submission_file_text('python -c pass', 'uid')
    assert re.search(r'^srun .*--cpus-per-task=10', text, re.M), text
    assert '--cpus-per-task=10' in text and '--kill-on-bad-exit=1' in text


def test_cuda_device_setup_turns_on_cudnn_benchmark_and_amp(monkeypatch):
    from deit.build import setup_device
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    device, amp = setup_device(Namespace(device='cuda', distributed=True, gpu=3, amp=None, seed=0))
    assert device == torch.device('cuda', 3) and amp is True and torch.backends.cudnn.benchmark is True
    device, amp = setup_device(Namespace(device='cpu', distributed=False, gpu=0, amp=None, seed=0))
    assert device.type == 'cpu' and amp is False


def test_amp_bf16_and_an_ema_kept_on_another_device(tmp_path):
    """CPU autocast (bf16) training with --model-ema-force-cpu; the EMA is evaluated on its
    own device (evaluate() follows the model's parameters, not the training device)."""
    from deit.engine import evaluate
    from deit.main import cli
    out = tmp_path / 'amp'
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '2', '--amp',
                       '--model-ema', '--model-ema-force-cpu', '--output_dir', str(out)]) == 0
    log = json.loads((out / 'log.txt').read_text())
    assert log['test_n'] == log['test_ema_n'] == 450 and 0 <= log['test_ema_acc1'] <= 100

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 6)

        def forward(self, x):
            assert x.device == self.lin.weight.device
            return self.lin(x)

    stats = evaluate([(torch.randn(5, 4), torch.arange(5))], Probe(), print_freq=0)
    assert stats['n'] == 5
