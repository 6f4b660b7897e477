"""Shared fixtures: small, real image trees written with PIL (no downloads)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under ``make mutation`` each mutant's tests run in a process forked from one that has run tests: a
    cross-process lock taken there by a worker mutmut then killed stays taken (tqdm's write lock), and every
    later worker that shows a progress bar would wait for it forever. Each worker gets a lock of its own."""
    if os.environ.get('MUTANT_UNDER_TEST'):
        tqdm.set_lock(threading.RLock())


def pytest_collection_modifyitems(config, items):
    """Under ``make mutation`` (mutmut runs each mutant's tests with -x from its mutants/ copy), fastest first by
    the durations mutmut measured: the tests without module-scoped fixtures one by one, then the others file by
    file (the fastest file first; a file's module fixtures are then built once). A mutant that a unit test kills
    does not wait for the trainer-level tests that also reach it, wherever that unit test lives."""
    stats = Path('mutmut-stats.json')
    if not (os.environ.get('MUTANT_UNDER_TEST') and stats.is_file()):
        return
    durations = json.loads(stats.read_text())['duration_by_test']
    per_file = {}
    for item in items:
        per_file[item.path] = per_file.get(item.path, 0.0) + durations.get(item.nodeid, 0.0)

    def module_fixtures(item) -> bool:
        defs = getattr(item, '_fixtureinfo', None)
        return bool(defs) and any(d.scope == 'module' for ds in defs.name2fixturedefs.values() for d in ds)

    items.sort(key=lambda item: (module_fixtures(item), per_file[item.path] if module_fixtures(item) else 0.0,
                                 durations.get(item.nodeid, 0.0)))


PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 200), (40, 200, 210)]


def make_image(cls: int, idx: int, size: int = 32) -> Image.Image:
    """A learnable picture: class colour + a class-dependent bar, with per-image noise."""
    rng = np.random.default_rng(cls * 1000 + idx)
    img = np.empty((size, size, 3), np.float32)
    img[:] = PALETTE[cls % len(PALETTE)]
    bar = (cls * size) // 6
    img[bar:bar + size // 6, :, :] = 255 - img[bar:bar + size // 6, :, :]
    img += rng.normal(0, 25, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_imagefolder(root: Path, n_classes: int = 4, n_train: int = 16, n_val: int = 6, size: int = 32,
                     names=None) -> Path:
    """root/{train,val}/<class>/<n>.jpg, real JPEGs."""
    names = names or [f'class_{c}' for c in range(n_classes)]
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(names):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(c, i + (0 if split == 'train' else 10_000), size).save(d / f'{i:03d}.jpg', quality=90)
    return root


@pytest.fixture(scope='session')
def tiny_imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp('imagefolder'))


# flags shared by trainer tests: the demo ViT at 32x32, single-threaded loading, short schedule
TINY = ['--model', 'deit_demo_patch4_32', '--input-size', '32', '--batch-size', '16', '--num_workers', '0',
        '--warmup-epochs', '0', '--lr', '2e-3', '--unscale-lr', '--print-freq', '0', '--drop-path', '0',
        '--aa', 'none', '--reprob', '0', '--color-jitter', '0', '--no-pin-mem']


def without(flags: list[str], flag: str) -> list[str]:
    """``flags`` less ``flag`` and its value (e.g. TINY without its --batch-size, for --total-batch-size)."""
    i = flags.index(flag)
    return flags[:i] + flags[i + 2:]


def run_ranks(target, world: int, out_dir: Path, *args, timeout: float = 120) -> list:
    """Run ``target(rank, *args, out_dir)`` in ``world`` spawned processes; each writes ``rank<r>.json`` into
    out_dir (a file, not an mp.Queue: a queue's feeder thread may not flush before process teardown)."""
    import json
    import multiprocessing as mp
    ctx = mp.get_context('spawn')
    procs = [ctx.Process(target=target, args=(r, *args, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():  # a rank stuck in teardown must not outlive the test
            p.terminate()
            p.join()  # reaped here, not by whoever waits for any child later (mutmut's worker pool does)
    return [json.loads((Path(out_dir) / f'rank{r}.json').read_text()) for r in range(world)]


CHECKSUM = r'\[rank (\d)\] {} checksum ([-+.e0-9]+/[-+.e0-9]+)'


def ok(r: subprocess.CompletedProcess) -> str:
    """A finished subprocess's output; fails the test with the output's tail when it did not exit 0."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def checksums(text: str, what: str = 'parameter') -> dict:
    """rank -> the trainer's printed ``[rank r] parameter|ema checksum`` in ``text``."""
    return dict(re.findall(CHECKSUM.format(what), text))


def corrupt_first_member(zip_path: Path) -> str:
    """Truncate the first image of a built cache zip (keeps the zip readable, the JPEG not)."""
    import zipfile
    with zipfile.ZipFile(zip_path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    victim = sorted(members)[0]
    members[victim] = members[victim][:100]
    with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_STORED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return victim


def run_module(args, env_extra=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def training_state(seed: int, ema: bool = True, scaler: bool = False):
    """A small run's TrainingState: a linear model, SGD with momentum, timm's cosine schedule with warm-up,
    OLS (a criterion with state) and an EMA."""
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from deit.engine import LossScaler
    from deit.baselines import OnlineLabelSmoothing
    from deit.train_state import TrainingState
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=10, warmup_epochs=2, warmup_lr=1e-3)
    state = TrainingState(model, optimizer, scheduler, LossScaler('cpu', enabled=scaler), OnlineLabelSmoothing(3),
                          model_ema=ModelEmaV3(model, decay=0.5) if ema else None)
    state.max_accuracy = 0.0
    return state


def trained_checkpoint(world_size: int = 1, scaler: bool = False):
    """A run after 3 epochs, its checkpoint, and the numbers its RNG streams give next."""
    from deit.train_state import checkpoint_dict, rng_state
    state = training_state(0, scaler=scaler)
    if scaler:
        state.loss_scaler._scaler = torch.amp.GradScaler('cpu', init_scale=128.0)
    state.model(torch.randn(2, 4)).sum().backward()
    state.optimizer.step()  # momentum buffers
    state.model_ema.update(state.model)
    state.criterion.supervise.fill_(1 / 3)
    for epoch in range(4):
        state.lr_scheduler.step(epoch)
    state.max_accuracy = 42.5
    state.epoch, state.last_log, state.last_test_stats = 3, {'epoch': 3}, {'acc1': 41.0}
    rng = [rng_state() for _ in range(world_size)]
    ckpt = checkpoint_dict(state, Namespace(seed=0), world_size, rng)
    after = (torch.rand(3), random.random(), np.random.rand())
    return state, ckpt, after


SRUN_ECHO = '#!/bin/sh\necho "srun $*"\necho "RDZV=$RDZV_ENDPOINT"\n'
SRUN_EXEC = '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'  # runs its command


def fake_slurm_bin(tmp_path: Path, srun: str = SRUN_ECHO) -> Path:
    """scontrol / srun stand-ins: scontrol expands one fixed list; srun prints (or runs) its command."""
    bin_ = tmp_path / 'bin'
    bin_.mkdir()
    (bin_ / 'scontrol').write_text('#!/bin/sh\necho node-a\necho node-b\n')
    (bin_ / 'srun').write_text(srun)
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_
