"""Faults in the files a run reads and writes, injected as they happen: flipped bytes, a diverged epoch, torn
or foreign resume files, a disk that fills up during a save, bad recipes, read-only outputs."""
from __future__ import annotations

import errno
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch._utils import ExceptionWrapper

import data.io as io_module
import deit.loop
import deit.main as dm
from deit import distributed as du
from data.decode import CorruptImageError
from data.io import CheckpointError, SaveError, torch_load
from deit.datasets import CheckedImageFolder
from deit.preemption import REQUEUE_EXIT, Preempted, WorkerSignals
from deit.rundir import (StdoutCopy, open_tensorboard, remove_stale_temp_files, repair_summary, set_aside_run,
                         tb_scalars)
from tests.conftest import TINY, make_image

DEMO = TINY + ['--data-set', 'DEMO', '--max-steps-per-epoch', '2']


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / 'log.txt').read_text().splitlines()]


class _Killed(BaseException):
    pass


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A 2-epoch demo run killed as epoch 1 starts: its folder (checkpoint.pth of epoch 0, log.txt)."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    real = deit.loop.train_one_epoch

    def killed_at_epoch_1(*a, **kw):
        if a[5] == 1:
            raise _Killed
        return real(*a, **kw)

    deit.loop.train_one_epoch = killed_at_epoch_1
    try:
        with pytest.raises(_Killed):
            dm.cli(DEMO + ['--epochs', '2', '--output_dir', str(out)])
    finally:
        deit.loop.train_one_epoch = real
    assert torch_load(out / 'checkpoint.pth')['epoch'] == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ('checkpoint.pth', 'log.txt', 'args.yaml'):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ------------------------------------------------------------------------------------------------------------
# a flipped byte inside a saved checkpoint
# ------------------------------------------------------------------------------------------------------------
def _flip_a_weight_byte(path: Path) -> str:
    """Flip one byte inside the largest tensor record of a torch.save zip, in place (the zip stays readable)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    local_extra = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
    start = info.header_offset + 30 + len(info.filename.encode()) + local_extra  # local header, name, extra
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return info.filename


def test_a_flipped_byte_in_a_checkpoint_is_refused_on_every_load(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path / 'run')
    member = _flip_a_weight_byte(run / 'checkpoint.pth')
    with zipfile.ZipFile(run / 'checkpoint.pth') as zf:  # the container is still a valid zip
        assert zf.testzip() == member
    with pytest.raises(CheckpointError, match=rf'member {member} fails its CRC-32 check: the file is corrupted'):
        torch_load(run / 'checkpoint.pth')
    assert dm.cli(DEMO + ['--eval', '--resume', str(run / 'checkpoint.pth')]) == 2
    assert 'fails its CRC-32 check' in _err(capsys)
    from tools.load_checkpoint import main as load_main
    assert load_main([str(run / 'checkpoint.pth')]) == 2
    assert 'fails its CRC-32 check' in _err(capsys)


def test_checkpoints_saved_without_crcs_still_load(tmp_path):
    from torch.utils.serialization import config
    path = tmp_path / 'nocrc.pth'
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save({'model': {'w': torch.arange(4.0)}}, path)
    finally:
        config.save.compute_crc32 = old
    assert torch.equal(torch_load(path)['model']['w'], torch.arange(4.0))


# ------------------------------------------------------------------------------------------------------------
# a diverged epoch is not saved
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('blow_up, what', [(1e30, 'evaluation loss'), (float('nan'), 'weights')])
def test_a_diverged_epoch_is_not_saved_and_the_last_good_checkpoint_stays(blow_up, what, finished, tmp_path,
                                                                         monkeypatch, capsys):
    run = _copy_run(finished, tmp_path / 'run')
    real = deit.loop.train_one_epoch

    def diverging(*a, **kw):  # the epoch's steps ran with a finite loss; its weights ended huge / NaN
        stats = real(*a, **kw)
        with torch.no_grad():
            next(a[0].parameters()).mul_(blow_up)
        return stats

    monkeypatch.setattr(deit.loop, 'train_one_epoch', diverging)
    before = (run / 'checkpoint.pth').read_bytes()
    assert dm.cli(DEMO + ['--epochs', '2', '--output_dir', str(run)]) == 3
    err = _err(capsys)
    assert f'epoch 1 diverged (not finite: {what}' in err
    assert f'{run / "checkpoint.pth"} (epoch 0) stays the resume point' in err
    assert (run / 'checkpoint.pth').read_bytes() == before
    assert [r['epoch'] for r in _log(run)] == [0]
    assert 'NaN' not in (run / 'log.txt').read_text()


# ------------------------------------------------------------------------------------------------------------
# resume files: torn, foreign, weights only
# ------------------------------------------------------------------------------------------------------------
def test_a_torn_last_log_line_is_dropped_on_resume(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path / 'run')
    with open(run / 'log.txt', 'a') as f:
        f.write('{"epoch": 1, "alpha": 0.15, "lr": 0.0')  # a partial append: killed or disk full
    assert dm.cli(DEMO + ['--epochs', '2', '--output_dir', str(run)]) == 0
    assert 'log.txt:2: dropping a torn last line' in capsys.readouterr().out
    assert [r['epoch'] for r in _log(run)] == [0, 1]


def test_a_bad_log_line_before_the_last_is_named(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path / 'run')
    (run / 'log.txt').write_text('not json\n' + (run / 'log.txt').read_text())
    assert dm.cli(DEMO + ['--epochs', '2', '--output_dir', str(run)]) == 2
    assert f'{run / "log.txt"}:1: not a log record' in _err(capsys)


def test_resume_of_a_weights_only_checkpoint_trains_from_those_weights(finished, tmp_path, capsys):
    weights = tmp_path / 'hub_layout.pth'  # DeiT's hub release: {'model': state_dict}
    torch.save({'model': torch_load(finished / 'checkpoint.pth')['model']}, weights)
    out = tmp_path / 'run'
    assert dm.cli(DEMO + ['--epochs', '2', '--resume', str(weights), '--output_dir', str(out)]) == 0
    assert f'resumed from {weights} (epoch ?); starting at epoch 0' in capsys.readouterr().out
    assert [r['epoch'] for r in _log(out)] == [0, 1]  # from epoch 0


@pytest.mark.parametrize('content, what', [([1, 2], 'a list, not a checkpoint (a dict with "model": ...)'),
                                           ({'state_dict': {}}, 'no "model" entry; not a training checkpoint')])
def test_a_checkpoint_pth_that_is_no_training_checkpoint_is_one_line(content, what, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    torch.save(content, out / 'checkpoint.pth')
    assert dm.cli(DEMO + ['--epochs', '1', '--output_dir', str(out)]) == 2
    assert f'checkpoint.pth: {what}' in _err(capsys)


# ------------------------------------------------------------------------------------------------------------
# the disk fills up during a save
# ------------------------------------------------------------------------------------------------------------
class _FillingFile(io.FileIO):
    """A real file whose writes fail with ENOSPC once ``budget`` bytes are written (a disk filling up)."""
    budget = 4096

    def write(self, b):
        if self.tell() + len(b) > self.budget:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return super().write(b)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(finished, tmp_path, monkeypatch,
                                                                                capsys):
    run = _copy_run(finished, tmp_path / 'run')
    before = (run / 'checkpoint.pth').read_bytes()
    real_open = open

    def filling_open(path, mode='r', *a, **kw):
        if 'b' in mode and 'w' in mode and Path(path).name.startswith('.checkpoint.pth.tmp-'):
            return _FillingFile(path, 'w')
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(io_module, 'open', filling_open, raising=False)  # atomic_open's open
    assert dm.cli(DEMO + ['--epochs', '2', '--output_dir', str(run)]) == 2
    err = _err(capsys)
    assert err.startswith(f'error: {run / "checkpoint.pth"}: could not write the checkpoint (No space left on '
                          f'device); it needs about ')
    assert 'MiB free there' in err and 'is unchanged' in err
    assert (run / 'checkpoint.pth').read_bytes() == before
    assert not list(run.glob('.*tmp*'))
    with pytest.raises(SaveError):  # the library call says the same
        with monkeypatch.context() as m:
            m.setattr(_FillingFile, 'budget', 0)
            io_module.save_atomic({'model': {'w': torch.zeros(10)}}, run / 'checkpoint.pth')


# ------------------------------------------------------------------------------------------------------------
# recipes and outputs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('text, msg', [
    ('epochs: 2.5\n', 'epochs: 2.5 is not an int'),
    ('epochs: three\n', "epochs: 'three' is not an int"),
    ('model: deit_demo_patch4_32\nepochs: [\n', ':3: not valid YAML'),
    ('model_ema: 1\n', 'model_ema: 1 is not true or false'),
    ('loss: maxsupp\n', "loss: 'maxsupp' is not one of ['ce', "),
    ('- epochs\n', 'a recipe is a mapping of flag names to values, not a list'),
])
def test_recipe_values_are_checked_when_the_recipe_is_read(text, msg, tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(text)
    with pytest.raises(SystemExit, match='^error: ' + str(recipe).replace('.', r'\.') + '.*'):
        dm.parse_args(['-c', str(recipe)])
    with pytest.raises(SystemExit) as e:
        dm.parse_args(['-c', str(recipe)])
    assert msg in str(e.value) and e.value.code == 2  # a usage error, as argparse's own
    assert not list(tmp_path.glob('**/args.yaml'))


def test_recipe_numbers_read_as_the_command_line_reads_them(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('lr: 1e-3\ninput_size: 224.0\nopt_betas: [0.9, 0.95]\n')  # YAML reads 1e-3 as a string
    args = dm.parse_args(['-c', str(recipe)])
    assert args.lr == 0.001 and args.input_size == 224 and isinstance(args.input_size, int)
    assert args.opt_betas == [0.9, 0.95]


def _read_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder this process cannot write into (root ignores permission bits: then an EROFS is imitated)."""
    folder = _read_only(tmp_path / 'ro')
    probe = folder / 'probe'
    try:
        probe.touch()
    except OSError:
        return folder
    probe.unlink()
    real_mkdir, real_touch = Path.mkdir, Path.touch

    def refuse(real):
        def call(self, *a, **kw):
            if folder == self or folder in self.parents:
                raise OSError(errno.EROFS, 'Read-only file system', str(self))
            return real(self, *a, **kw)
        return call

    monkeypatch.setattr(Path, 'mkdir', refuse(real_mkdir))
    monkeypatch.setattr(Path, 'touch', refuse(real_touch))
    return folder


def test_tools_check_their_output_before_the_work(finished, read_only, capsys, monkeypatch):
    from tools import analyze, evaluate, load_checkpoint
    from segmentation.tools import convert_deit_to_mmseg
    work = []
    monkeypatch.setattr(evaluate, 'load_model', lambda *a, **kw: work.append('evaluate') or 1 / 0)
    assert evaluate.main([str(finished / 'checkpoint.pth'), '--out', str(read_only / 'eval')]) == 2
    assert 'eval: cannot write there (' in _err(capsys)
    assert load_checkpoint.main([str(finished / 'checkpoint.pth'), '--export', str(read_only / 'm.safetensors')]) == 2
    assert 'm.safetensors: cannot write there (' in _err(capsys)
    monkeypatch.setattr(analyze, 'load_model', lambda *a, **kw: work.append('analyze') or 1 / 0)
    assert analyze.main(['logits', '--ckpt', f'a={finished / "checkpoint.pth"}', '--data-set', 'DEMO',
                         '--out', str(read_only / 'viz')]) == 2
    assert 'viz/logits: cannot write there (' in _err(capsys)
    assert convert_deit_to_mmseg.main([str(finished / 'checkpoint.pth'), str(read_only / 'bb.pth'),
                                       '--width', '128', '--depth', '4', '--img-size', '32']) == 2
    assert 'bb.pth: cannot write there (' in _err(capsys)
    assert work == []  # nothing was loaded or computed first


# ------------------------------------------------------------------------------------------------------------
# images that used to escape --skip-bad-images
# ------------------------------------------------------------------------------------------------------------
def _bomb_jpeg(side: int = 20000) -> bytes:
    """A real JPEG whose frame header (SOF0) claims side x side pixels: what a decoder allocates for."""
    buf = io.BytesIO()
    make_image(0, 0, 16).save(buf, format='JPEG')
    raw = bytearray(buf.getvalue())
    sof = raw.index(b'\xff\xc0')
    raw[sof + 5:sof + 9] = side.to_bytes(2, 'big') * 2  # height, width
    return bytes(raw)


def _bomb_png(side: int = 20000) -> bytes:
    import struct
    import zlib
    buf = io.BytesIO()
    make_image(0, 0, 16).save(buf, format='PNG')
    raw = bytearray(buf.getvalue())
    ihdr = raw.index(b'IHDR')
    raw[ihdr + 4:ihdr + 12] = struct.pack('>II', side, side)
    raw[ihdr + 17:ihdr + 21] = struct.pack('>I', zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


@pytest.fixture
def bad_image_tree(tmp_path):
    from tests.conftest import make_imagefolder
    root = make_imagefolder(tmp_path / 'tree', n_classes=2, n_train=8, n_val=2)
    d = root / 'train' / 'class_0'
    (d / 'bomb.jpg').write_bytes(_bomb_jpeg())
    (d / 'bomb.png').write_bytes(_bomb_png())
    (d / 'broken.jpg').symlink_to(tmp_path / 'gone.jpg')
    (d / 'locked.jpg').write_bytes((d / '000.jpg').read_bytes())
    from PIL import Image
    Image.new('RGB', (1, 1), (200, 30, 30)).save(d / 'tiny.png')
    return root


def _deny(monkeypatch, name: str):
    """Reading ``name`` fails with EACCES (as for a file without read permission; root ignores mode bits)."""
    import data.decode
    real = open

    def guarded(path, *a, **kw):
        if Path(path).name == name:
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(data.decode, 'open', guarded, raising=False)


def test_bad_images_are_named_or_skipped_and_counted(bad_image_tree, tmp_path, monkeypatch, capsys):
    _deny(monkeypatch, 'locked.jpg')
    args = TINY + ['--data-set', 'FOLDER', '--data-path', str(bad_image_tree), '--epochs', '1',
                   '--batch-size', '4']
    out = tmp_path / 'skip'
    assert dm.cli(args + ['--skip-bad-images', '--output_dir', str(out)]) == 0
    log = _log(out)[0]
    assert log['train_skipped_images'] == 4  # two bombs, the broken link, the unreadable file (not the 1x1)
    for name, msg in (('bomb.jpg', "over PIL's decompression-bomb limit"), ('bomb.png', 'decompression bomb'),
                      ('broken.jpg', 'cannot read the file (No such file or directory)'),
                      ('locked.jpg', 'cannot read the file (Permission denied)')):
        ds = CheckedImageFolder(bad_image_tree / 'train', skip_bad=False)
        i = next(k for k, (p, _) in enumerate(ds.samples) if p.endswith(name))
        with pytest.raises(CorruptImageError, match=re.escape(name) + '.*' + re.escape(msg)):
            ds[i]


def test_a_bomb_jpeg_is_refused_from_its_header_before_any_allocation(tmp_path):
    from tests.conftest import run_module
    (tmp_path / 'bomb.jpg').write_bytes(_bomb_jpeg())
    # the child may map 600 MiB more than it has after its imports; decoding the pixels would need 1.2 GB
    code = ('import resource; from data.decode import decode_image, CorruptImageError\n'
            'size = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:"))\n'
            'resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + 600 * 2 ** 20, resource.RLIM_INFINITY))\n'
            f'data = open({str(tmp_path / "bomb.jpg")!r}, "rb").read()\n'
            'try:\n    decode_image(data, "bomb.jpg")\nexcept Exception as e:\n    print(type(e).__name__, e)\n')
    r = run_module(['-c', code])
    assert r.stdout.startswith('CorruptImageError bomb.jpg: 20000 x 20000 pixels is over'), r.stdout + r.stderr


def test_an_image_smaller_than_a_small_crop_is_padded_not_an_error():
    from PIL import Image

    from deit.datasets import build_transform
    args = dm.parse_args(TINY + ['--data-set', 'FOLDER'])
    tf = build_transform(True, args)
    assert tuple(tf(Image.new('RGB', (1, 1), (9, 9, 9))).shape) == (3, 32, 32)
    assert tuple(build_transform(False, args)(Image.new('RGB', (1, 1))).shape) == (3, 32, 32)


class _FailingInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from data.zip_index import CacheError
        raise CacheError('/data/train.zip: the file shrank to 12 bytes while in use')


def test_an_error_in_a_loader_worker_is_reported_as_its_own_line():
    loader = torch.utils.data.DataLoader(_FailingInWorker(), num_workers=1)
    with pytest.raises(ValueError) as e:
        next(iter(loader))
    assert 'Original Traceback' in str(e.value)  # what torch hands back: the worker's whole traceback
    assert dm.error_line(e.value) == '/data/train.zip: the file shrank to 12 bytes while in use'


def test_the_error_line_of_a_loader_worker_error_is_the_workers_own_message():
    """torch re-raises a worker's error as "Caught X in DataLoader worker process N. Original Traceback ..."
    followed by the whole traceback; the one line printed is the worker's message, ': ' inside it kept."""
    try:
        raise CorruptImageError('/d/a.jpg: cannot decode image (Truncated File Read)')
    except CorruptImageError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(CorruptImageError) as e:
        wrapped.reraise()
    assert 'Original Traceback' in str(e.value)
    assert dm.error_line(e.value) == '/d/a.jpg: cannot decode image (Truncated File Read)'
    assert dm.error_line(ValueError('  --epochs 0: train for at least 1 epoch \n')) == \
        '--epochs 0: train for at least 1 epoch'
    try:
        raise CorruptImageError()
    except CorruptImageError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 1')
    with pytest.raises(CorruptImageError) as e:
        wrapped.reraise()
    assert dm.error_line(e.value) == 'data.decode.CorruptImageError'  # no message: its type


@pytest.mark.parametrize('written', [False, True])
def test_ctrl_c_names_the_resume_point_or_says_there_is_none(written, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    if written:
        (out / 'checkpoint.pth').write_bytes(b'')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(dm, 'execute', interrupted)
    assert dm.cli(TINY + ['--data-set', 'DEMO', '--output_dir', str(out)]) == 130
    where = f'the same command resumes from {out / "checkpoint.pth"} (its last completed epoch)' if written else \
        'no checkpoint was written yet'
    assert capsys.readouterr().err == f'\ninterrupted: {where}\n'


class _Scalars:
    """What TensorBoard's SummaryWriter is given."""

    def __init__(self):
        self.added, self.flushes = [], 0

    def add_scalar(self, tag, value, step):
        self.added.append((tag, value, step))

    def flush(self):
        self.flushes += 1


def test_tensorboard_gets_the_train_and_test_numbers_and_alpha():
    tb = _Scalars()
    tb_scalars(tb, {'epoch': 3, 'alpha': 0.15, 'lr': 1e-3, 'train_lr': 1e-3, 'train_loss': 2.5, 'test_acc1': 40.0,
                    'test_n': 24, 'train_skipped_images': 2, 'test_note': 'x', 'n_parameters': 10}, 3)
    assert tb.added == [('train/lr', 1e-3, 3), ('train/loss', 2.5, 3), ('test/acc1', 40.0, 3), ('train/alpha', 0.15, 3)]
    assert tb.flushes == 1
    tb = _Scalars()
    tb_scalars(tb, {'train_loss': 1, 'alpha': None}, 0)  # ce: no alpha
    assert tb.added == [('train/loss', 1, 0)] and tb.flushes == 1


def test_stdout_log_holds_what_was_printed_before_the_run_folder_was_known(tmp_path, capsys):
    with StdoutCopy() as copy:
        assert sys.stdout is copy
        print('input pipeline: before the folder')
        copy.attach(tmp_path / 'stdout.log')
        print('epoch 0')  # line-buffered: in the file before the run ends (a tail -f, a killed run)
        assert (tmp_path / 'stdout.log').read_text() == 'input pipeline: before the folder\nepoch 0\n'
    assert sys.stdout is copy.real and copy.file.closed
    assert capsys.readouterr().out == 'input pipeline: before the folder\nepoch 0\n'
    (tmp_path / 'stdout.log').write_text('the previous attempt\n')
    with StdoutCopy() as copy:  # a resumed run appends
        print('resumed')
        copy.attach(tmp_path / 'stdout.log')
    assert (tmp_path / 'stdout.log').read_text() == 'the previous attempt\nresumed\n'


def test_a_summary_csv_of_another_tool_is_refused_on_resume(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('step,loss\n1,2.5\n')  # another trainer's file in the run folder
    with pytest.raises(ValueError) as e:
        repair_summary(tmp_path, 0, None)
    assert str(e.value) == f'{path}: not a summary.csv of this trainer (no "epoch" column in its header); move it ' \
                           f'away, then resume'
    assert path.read_text() == 'step,loss\n1,2.5\n'


def test_a_fresh_start_moves_the_previous_runs_files_aside_together(tmp_path, capsys):
    assert set_aside_run(tmp_path) is None and capsys.readouterr().out == ''  # an empty folder: nothing to move
    for attempt in (1, 2):
        (tmp_path / 'checkpoint.pth').write_text(f'run {attempt}')
        (tmp_path / 'log.txt').write_text('{}\n')
        (tmp_path / 'tb').mkdir()
        (tmp_path / 'notes.md').write_text('mine')  # not a run file: stays
        dest = set_aside_run(tmp_path)
        assert dest == tmp_path / ('previous_run' if attempt == 1 else 'previous_run2')
        assert sorted(p.name for p in dest.iterdir()) == ['checkpoint.pth', 'log.txt', 'tb']
        assert (dest / 'checkpoint.pth').read_text() == f'run {attempt}'
        assert capsys.readouterr().out == (f'starting fresh: the files of the run already in {tmp_path} '
                                           f'(checkpoint.pth, log.txt, tb) were moved to {dest}\n')
    assert (tmp_path / 'notes.md').read_text() == 'mine' and not (tmp_path / 'checkpoint.pth').exists()


def test_without_tensorboard_training_goes_on_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    assert open_tensorboard(tmp_path) is None
    assert capsys.readouterr().out == 'tensorboard not installed: no TensorBoard scalars\n'
    assert not (tmp_path / 'tb').exists()


def test_stale_temp_files_of_killed_saves_are_removed_even_if_one_vanishes_meanwhile(tmp_path, monkeypatch, capsys):
    (tmp_path / '.checkpoint.pth.tmp-node1-42-ab12').write_bytes(b'half')
    (tmp_path / 'checkpoint.pth').write_bytes(b'whole')
    assert remove_stale_temp_files(tmp_path) == ['.checkpoint.pth.tmp-node1-42-ab12']
    assert capsys.readouterr().out == (f"removed 1 temp file(s) of interrupted saves in {tmp_path}: "
                                       f"['.checkpoint.pth.tmp-node1-42-ab12']\n")
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth']
    # a file listed and then removed by someone else before its turn (a shared file system's late listing)
    monkeypatch.setattr(Path, 'glob', lambda self, pattern: iter([self / '.log.txt.tmp-node2-7-cd34']))
    assert remove_stale_temp_files(tmp_path) == ['.log.txt.tmp-node2-7-cd34']


def test_a_finished_run_started_again_reports_where_it_ended(tmp_path, capsys):
    argv = DEMO + ['--epochs', '1', '--output_dir', str(tmp_path / 'run')]
    first = dm.main(dm.parse_args(argv))
    capsys.readouterr()
    again = dm.main(dm.parse_args(argv))
    out = capsys.readouterr().out
    assert f'{tmp_path / "run" / "checkpoint.pth"}: training already finished (1 epochs); nothing to do' in out
    assert 'Epoch: [' not in out  # no epoch trained again
    assert set(again) == {'test', 'max_accuracy', 'param_checksum'}
    assert again['test']['acc1'] == first['test']['acc1'] and again['max_accuracy'] == first['max_accuracy']
    assert again['param_checksum'] == first['param_checksum']
    assert f'Final accuracy: top-1 {first["test"]["acc1"]:.2f}%' in out


def test_cli_runs_main_where_the_launcher_placed_it_and_reports_its_ends(monkeypatch, capsys):
    place, seen = du.DistInfo(), []
    monkeypatch.setattr(du, 'init_distributed', lambda device: seen.append(('init', device)) or place)

    def preempted(args, where):
        seen.append(('main', where))
        raise Preempted('stopped by SIGUSR1 after epoch 3: saved run/checkpoint.pth; requeue to resume', 10,
                        'run/checkpoint.pth')
    monkeypatch.setattr(dm, 'main', preempted)
    assert dm.cli(DEMO + ['--device', 'cpu']) == REQUEUE_EXIT
    assert seen == [('init', 'cpu'), ('main', place)] and seen[1][1] is place
    assert capsys.readouterr().out == 'stopped by SIGUSR1 after epoch 3: saved run/checkpoint.pth; requeue to resume\n'

    def bad_launcher_env(device):
        raise ValueError('SLURM_PROCID=x: not a number')
    monkeypatch.setattr(du, 'init_distributed', bad_launcher_env)
    assert dm.cli(DEMO) == 2
    assert capsys.readouterr().err == 'error: SLURM_PROCID=x: not a number\n'


def test_the_run_is_built_as_configured(monkeypatch, capsys):
    """--amp on the CPU (bfloat16 autocast) and --channels-last reach the run, the loss scaler and the start-up
    line; the loaders get the worker signals, the DDP/EMA wrapping gets the device."""
    seen = {}
    for name in ('build_data', 'loss_scaler', 'wrap_model'):
        real = getattr(dm, name)
        monkeypatch.setattr(dm, name, lambda *a, _real=real, _name=name: seen.setdefault(_name, a) and _real(*a))
    monkeypatch.setattr(dm, 'finish', lambda cfg, run, *a: seen.setdefault('run', run) and {})
    assert dm.main(dm.parse_args(DEMO + ['--epochs', '1', '--amp', '--channels-last', '--output_dir', ''])) == {}
    run, cpu = seen['run'], torch.device('cpu')
    assert (run.amp, run.amp_dtype, run.memory_format) == (True, torch.bfloat16, torch.channels_last)
    assert seen['loss_scaler'] == (cpu, True, torch.bfloat16)
    assert isinstance(seen['build_data'][4], WorkerSignals) and seen['wrap_model'][2] == cpu
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('model '))
    assert line.endswith('classes; AMP bfloat16, channels-last'), line
