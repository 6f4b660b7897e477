"""Distributed training on CPU with gloo: torchrun runs, samplers, SLURM env, launch scripts."""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from deit.distributed import dist_env, expand_nodelist
from deit.samplers import DistributedEvalSampler, RASampler
from tests.conftest import ROOT, TINY, make_imagefolder, ok, run_module, without

TORCHRUN = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'deit.main']


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory):
    # 3 classes x 5 val images = 15: an odd count, so padded sharding would double-count a sample
    return make_imagefolder(tmp_path_factory.mktemp('dd'), n_classes=3, n_train=16, n_val=5)


def _acc(text):
    return [float(x) for x in re.findall(r'\* Acc@1 ([\d.]+)', text)]


@pytest.mark.slow
def test_torchrun_two_ranks_identical_weights_rank0_files_exact_dist_eval(odd_folder, tmp_path):
    out = tmp_path / 'ddp'
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(odd_folder), '--batch-size', '8']
    text = ok(run_module(TORCHRUN + common + ['--epochs', '2', '--loss', 'maxsup', '--mixup', '0.8',
                                                '--cutmix', '1.0', '--dist-eval', '--output_dir', str(out)]))
    sums = dict(re.findall(r'\[rank (\d)\] parameter checksum ([-+.e0-9]+/[-+.e0-9]+)', text))
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    assert 'effective batch size 8 x 2 = 16' in text
    # rank 0 alone wrote: one log line per epoch, no stray files
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'args.yaml', 'best_checkpoint.pth', 'checkpoint.pth',
                                                     'log.txt', 'stdout.log', 'summary.csv', 'tb']
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0, 1]
    # dist-eval over 2 ranks == single-process eval of the same checkpoint, on 15 (odd) images
    ck = ['--eval', '--resume', str(out / 'checkpoint.pth')]
    single = _acc(ok(run_module(['-m', 'deit.main'] + common + ck)))
    dist = _acc(ok(run_module(TORCHRUN + common + ck + ['--dist-eval'])))
    assert single and dist and single[-1] == dist[-1]
    n = re.findall(r'\(n=(\d+)\)', ok(run_module(TORCHRUN + common + ck + ['--dist-eval'])))
    assert n[-1] == '15'


@pytest.mark.slow
def test_resume_across_world_sizes(odd_folder, tmp_path):
    """The same run (16 images per step in total) requeued on another number of processes."""
    common = without(TINY, '--batch-size') + ['--data-set', 'FOLDER', '--data-path', str(odd_folder),
                                              '--total-batch-size', '16',
                     '--epochs', '2']
    harness = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node={}', '-m', 'tests.dist_harness']
    one, two = ([a.format(n) for a in harness] for n in (1, 2))
    for first, second, name in ((one, two, 'one_to_two'), (two, one, 'two_to_one')):
        out = tmp_path / name
        ok(run_module(first + ['--stop-at-epoch', '1', '--'] + common + ['--output_dir', str(out)]))
        text = ok(run_module(second + ['--'] + common + ['--output_dir', str(out)]))
        assert 'auto-resuming' in text and 'starting at epoch 1' in text
        log = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
        assert [r['epoch'] for r in log] == [0, 1]
        assert log[1]['alpha'] == pytest.approx(0.2)


def test_rasampler_shards_repeats_and_reshuffles():
    ds = list(range(512))
    world = 4
    samplers = [RASampler(ds, world, r, num_repeats=3, seed=7) for r in range(world)]
    for s in samplers:
        s.set_epoch(0)
    shards = [list(s) for s in samplers]
    assert all(len(x) == len(s) == 512 // world for x, s in zip(shards, samplers))  # as many steps as no RA
    # ranks take disjoint positions of one repeated list: rebuild it and check the copies
    full = RASampler(ds, 1, 0, num_repeats=3, seed=7, selected_round=0)
    full.num_selected = 10 ** 9
    rep = list(full)
    assert Counter(rep) == {i: 3 for i in ds}
    for r, shard in enumerate(shards):
        assert shard == rep[r::world][:len(shard)]
    # the 3 copies of a sample go to 3 different ranks
    first_copies = {}
    for r, shard in enumerate(shards):
        for i in shard:
            first_copies.setdefault(i, set()).add(r)
    assert max(len(v) for v in first_copies.values()) == 3
    c = Counter(i for shard in shards for i in shard)
    assert set(c.values()) <= {1, 2, 3}
    # reshuffle: deterministic by seed and epoch
    a = RASampler(ds, world, 1, seed=7)
    b = RASampler(ds, world, 1, seed=7)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(RASampler(ds, world, 1, seed=8)) != list(RASampler(ds, world, 1, seed=7))


def test_distributed_eval_sampler_covers_each_sample_once():
    ds = list(range(15))
    parts = [list(DistributedEvalSampler(ds, 4, r)) for r in range(4)]
    assert sorted(i for p in parts for i in p) == ds
    assert [len(p) for p in parts] == [4, 4, 4, 3]


def test_slurm_env_initialises_rank_world_master():
    env = {'SLURM_PROCID': '11', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '3', 'SLURM_STEP_ID': '0',
           'SLURM_JOB_NODELIST': 'gpu-node[07-08]'}
    info = dist_env(env)
    assert info == {'rank': 11, 'world_size': 16, 'local_rank': 3, 'source': 'slurm',
                    'master_addr': 'gpu-node07', 'master_port': '29500'}
    assert dist_env({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) is None  # a 1-task allocation is not DDP
    torchrun = dist_env({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1',
                         'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'})
    assert torchrun['source'] == 'torchrun' and torchrun['rank'] == 1
    assert expand_nodelist('a[01-03,07],b5,c[9]') == ['a01', 'a02', 'a03', 'a07', 'b5', 'c9']
    with pytest.raises(ValueError, match='cannot parse'):
        expand_nodelist('')


def test_slurm_init_in_process(monkeypatch, capsys):
    """deit.distributed.init_distributed from SLURM variables, world of 1 real process (gloo)."""
    from deit import distributed as du
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):  # init writes these: restored after
        monkeypatch.setenv(k, 'placeholder')
        monkeypatch.delenv(k)
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_STEP_ID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_JOB_NODELIST', 'localhost')
    monkeypatch.setenv('SLURM_JOB_ID', '123456')  # no MASTER_PORT: the port comes from the job id
    info = dist_env()
    assert info['world_size'] == 2 and info['master_addr'] == 'localhost' and info['master_port'] == '18456'
    # a world of 2 needs a second process: check the env translation torch's env:// init relies on
    monkeypatch.setattr(du.dist, 'init_process_group', lambda **kw: captured.update(kw))
    monkeypatch.setattr(du.dist, 'barrier', lambda: None)
    # a GPU host: --device cpu still keeps the run on gloo and off the GPUs
    monkeypatch.setattr(du.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(du.torch.cuda, 'set_device', lambda i: pytest.fail('--device cpu touched a GPU'))
    captured = {}
    place = du.init_distributed('cpu')
    assert place == du.DistInfo(distributed=True, rank=0, world_size=2, gpu=1, backend='gloo')
    assert captured == {'backend': 'gloo', 'init_method': 'env://', 'world_size': 2, 'rank': 0,
                        'timeout': datetime.timedelta(minutes=30)}
    assert {k: os.environ[k] for k in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')} == \
        {'MASTER_ADDR': 'localhost', 'MASTER_PORT': '18456', 'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}
    assert '| distributed init (rank 0/2, local 1, slurm, backend gloo)\n' in capsys.readouterr().out


def test_print_all_flushes_each_line(monkeypatch):
    """A rank's print_all line is on its way as it is printed (its last words, should the rank be killed next)."""
    from deit import distributed as du
    raw = io.BytesIO()
    monkeypatch.setattr(sys, 'stdout', io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding='utf-8'))  # a pipe
    du.print_all('rank line', 3)
    assert raw.getvalue() == b'rank line 3\n'


def test_launch_scripts_syntax_and_dry_run():
    for s in ('train_with_MaxSup.sh', 'distributed_train.sh', 'slurm_train.sbatch', 'dist_train_seg.sh', '_env.sh'):
        assert subprocess.run(['bash', '-n', str(ROOT / 'scripts' / s)]).returncode == 0, s
    env = {'NNODES': '2', 'NGPUS': '8', 'NODE_RANK': '1', 'MASTER_ADDR': 'node0', 'MASTER_PORT': '12345',
           'PYTHON': 'python3', 'PATH': '/usr/bin:/bin'}
    r = subprocess.run(['bash', 'scripts/distributed_train.sh', '--model', 'deit_small_patch16_224', '--dry-run'],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ('python3 -m torch.distributed.run --nnodes=2 --nproc_per_node=8 --node_rank=1 '
                                '--master_addr=node0 --master_port=12345 -m deit.main --model deit_small_patch16_224')
    r = subprocess.run(['bash', 'scripts/distributed_train.sh', '--dry-run'], cwd=ROOT, capture_output=True,
                       text=True, env={**env, 'RDZV_ENDPOINT': 'node0:29400'})
    assert '--rdzv-backend=c10d --rdzv-endpoint=node0:29400' in r.stdout
    r = subprocess.run(['bash', 'scripts/distributed_train.sh', '--dry-run'], cwd=ROOT, capture_output=True,
                       text=True, env={k: v for k, v in env.items() if k != 'MASTER_ADDR'})
    assert r.returncode != 0 and 'MASTER_ADDR' in r.stderr
    # the main command hands multi-GPU runs to torchrun with the paper recipe, batch 1024 / 16 per process
    r = subprocess.run(['bash', 'scripts/train_with_MaxSup.sh'], cwd=ROOT, capture_output=True, text=True,
                       env={**env, 'DRY_RUN': '1', 'DATA_PATH': '/data/imagenet'})
    assert r.returncode == 0, r.stderr
    assert '--nproc_per_node=8' in r.stdout and '-c recipes/deit_s_paper.yaml' in r.stdout
    assert '--loss maxsup' in r.stdout


def test_submitit_debug_executor_runs_the_trainer(tmp_path):
    pytest.importorskip('submitit')
    from tools.run_with_submitit import main
    out = tmp_path / 'run'
    job = main(['--cluster', 'debug', '--ngpus', '1', '--job-dir', str(tmp_path / 'jobs'), '--'] + TINY +
               ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1', '--output_dir', str(out)])
    result = job.result()
    assert result['test']['n'] == 450 and (out / 'checkpoint.pth').is_file()
    assert torch.load(out / 'checkpoint.pth', weights_only=False)['epoch'] == 0


def test_collective_helpers_in_a_one_process_group(tmp_path):
    """The helpers take the process-group path as soon as a group exists, also with one rank (what two ranks do
    is tested through torchrun above)."""
    import torch.distributed as dist
    from deit import distributed as du
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    try:
        assert du.is_dist() and du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
        t = torch.tensor([1.5, 2.0])
        assert du.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
        assert du.any_rank(True) is True and du.any_rank(False) is False
        assert du.broadcast_object({'a': 1}) == {'a': 1} and du.all_gather_object('x') == ['x']
    finally:
        du.cleanup()
    assert not du.is_dist() and du.any_rank(True) is True and du.all_gather_object(3) == [3]


STEP = {'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'}


@pytest.mark.parametrize('env, expected', [
    ({'RANK': '0', 'WORLD_SIZE': '1'},  # torchrun without LOCAL_RANK or a master: as given
     {'rank': 0, 'world_size': 1, 'local_rank': 0, 'source': 'torchrun', 'master_addr': None, 'master_port': None}),
    ({**STEP, 'SLURM_NODELIST': 'n[3-4]'},  # the oldest node-list name; no SLURM_LOCALID: 0
     {'rank': 1, 'world_size': 2, 'local_rank': 0, 'source': 'slurm', 'master_addr': 'n3', 'master_port': '29500'}),
    ({**STEP, 'SLURM_STEP_NODELIST': 's[1-2]', 'SLURM_JOB_NODELIST': 'j[1-2]', 'SLURM_JOBID': '7'},  # the step's
     {'rank': 1, 'world_size': 2, 'local_rank': 0, 'source': 'slurm', 'master_addr': 's1', 'master_port': '15007'}),
    ({**STEP, 'SLURM_JOB_NODELIST': 'j[1-2]', 'SLURM_NODELIST': 'x[1-2]', 'MASTER_ADDR': 'head'},
     {'rank': 1, 'world_size': 2, 'local_rank': 0, 'source': 'slurm', 'master_addr': 'head', 'master_port': '29500'}),
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '2', 'SLURM_STEPID': '3', 'MASTER_ADDR': 'h'},  # STEPID: older name
     {'rank': 0, 'world_size': 2, 'local_rank': 0, 'source': 'slurm', 'master_addr': 'h', 'master_port': '29500'}),
    ({'SLURM_PROCID': '0', 'SLURM_STEP_NUM_TASKS': '', 'SLURM_NTASKS': '3', 'SLURM_STEP_ID': '0', 'MASTER_ADDR': 'h'},
     {'rank': 0, 'world_size': 3, 'local_rank': 0, 'source': 'slurm', 'master_addr': 'h', 'master_port': '29500'}),
])
def test_dist_env_reads_each_launchers_variables(env, expected, monkeypatch):
    monkeypatch.setattr('deit.distributed.shutil.which', lambda name: None)  # no scontrol: the node-list parser
    assert dist_env(env) == expected


@pytest.mark.parametrize('env', [
    {'SLURM_PROCID': '0'},  # no task count: one task
    {**STEP, 'SLURM_PROCID': '-1'},
    {**STEP, 'SLURM_PROCID': '2'},
    {**STEP, 'SLURM_STEP_ID': 'extern'},
])
def test_slurm_variables_of_no_job_step_task_run_single_process(env, capsys):
    assert dist_env(env) is None
    printed = capsys.readouterr().out
    if 'SLURM_NTASKS' in env:
        assert printed == (f'note: SLURM variables found (SLURM_PROCID={env["SLURM_PROCID"]}, 2 tasks) but this '
                           f'process is not a task of a job step (SLURM_STEP_ID={env["SLURM_STEP_ID"]}): running as '
                           f'a single process. Start multi-process runs with srun or torchrun.\n')
    else:  # a one-task allocation: nothing to say
        assert printed == ''


def test_a_slurm_step_without_a_master_host_is_one_line():
    with pytest.raises(ValueError) as e:
        dist_env(STEP)
    assert str(e.value) == 'SLURM run without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master host'
