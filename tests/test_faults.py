"""Fault injection: kills at every write boundary, corrupted inputs of each kind, bad flags.

Contract: every bad input ends with exit code != 0 and one line naming the file/flag (never a traceback);
nothing is substituted; nothing written before the error is lost; a killed run resumes to the same end state.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from data.build_zip_cache import main as build_zip
from deit.main import cli
from tests.conftest import TINY, make_image, make_imagefolder, run_module

HARNESS1 = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', '-m', 'tests.dist_harness']


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return err


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp('faults'), n_classes=3, n_train=8, n_val=3)


def _summary_epochs(out: Path) -> list[int]:
    import csv
    with open(out / 'summary.csv', newline='') as f:
        return [int(r['epoch']) for r in csv.DictReader(f)]


def _tb_steps(out: Path, tag: str = 'train/loss') -> list[int]:
    """The steps TensorBoard shows for ``tag`` (its reader applies the purges of resumed runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / 'tb'))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


# ---- the run folder: one run per folder, every per-epoch file repaired alike ------------------------------
def test_a_fresh_start_moves_the_previous_run_aside_whole(tmp_path):
    out = tmp_path / 'run'
    common = TINY + ['--data-set', 'DEMO', '--output_dir', str(out)]
    assert cli(common + ['--epochs', '2']) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != '.lock'}
    assert cli(common + ['--epochs', '1', '--no-auto-resume', '--lr', '1e-3']) == 0
    old = out / 'previous_run'
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before  # moved whole, untouched
    assert (old / 'tb').is_dir() and len(list((out / 'tb').iterdir())) == 1
    assert torch.load(out / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    assert torch.load(out / 'best_checkpoint.pth', weights_only=False)['epoch'] == 0  # the new run's
    assert [x['epoch'] for x in _log(out)] == [0] and _summary_epochs(out) == [0] and _tb_steps(out) == [0]
    assert 'lr: 0.001' in (out / 'args.yaml').read_text()
    stdout = (out / 'stdout.log').read_text()  # the new run's, from its first line on
    assert stdout.count('input pipeline:') == 1 and 'parameters' in stdout and 'Final accuracy' in stdout
    assert cli(common + ['--epochs', '1', '--no-auto-resume']) == 0  # and again: a second folder
    assert (out / 'previous_run2' / 'checkpoint.pth').is_file() and (old / 'checkpoint.pth').is_file()


def test_resume_cuts_every_per_epoch_file_back_to_the_checkpoint(tmp_path):
    """log.txt, summary.csv and TensorBoard after a kill between an epoch's record and its checkpoint, and
    after one inside summary.csv's append (a torn row)."""
    from deit.rundir import open_tensorboard, write_log
    from deit.rundir import repair_epoch_files
    records = [{'train_loss': 2.0 - e, 'test_acc1': 10.0 * e, 'epoch': e} for e in range(3)]
    tb = open_tensorboard(tmp_path)
    for e in range(3):
        write_log(tmp_path, tb, records[e], e)
    tb.close()
    with open(tmp_path / 'summary.csv', 'a') as f:
        f.write('1.5,3')  # a torn row
    (tmp_path / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in records[:1]))  # epoch 1 lost
    repair_epoch_files(tmp_path, 1, records[1])  # the checkpoint ends at epoch 1 and carries its record
    tb = open_tensorboard(tmp_path, (1, records[1]))
    write_log(tmp_path, tb, {**records[2], 'train_loss': 0.25}, 2)  # epoch 2 trained again
    tb.close()
    assert [x['epoch'] for x in _log(tmp_path)] == [0, 1, 2] and _summary_epochs(tmp_path) == [0, 1, 2]
    assert _tb_steps(tmp_path) == [0, 1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / 'tb'))
    acc.Reload()
    assert [e.value for e in acc.Scalars('train/loss')] == [2.0, 1.0, 0.25]
    (tmp_path / 'summary.csv').write_text('epoch,loss\n0,1\nzero,2\n1,3\n')
    with pytest.raises(ValueError, match=r'summary.csv:3: not an epoch row'):
        repair_epoch_files(tmp_path, 1, None)


def test_repair_log_keeps_what_the_checkpoint_covers_line_by_line(tmp_path, capsys):
    from deit.rundir import repair_log
    log = tmp_path / 'log.txt'
    repair_log(tmp_path, 1, None)
    assert not log.exists()  # nothing logged yet, nothing to restore: no file made
    lines = [json.dumps({'epoch': 0}), '', json.dumps({'note': 'no epoch'}), json.dumps({'epoch': 1, 'x': 2}),
             json.dumps({'epoch': 2}), '{"epoch": 3, "tor']
    log.write_text('\n'.join(lines) + '\n')
    repair_log(tmp_path, 1, None)
    assert log.read_text().splitlines() == [lines[0], lines[2], lines[3]]  # blank, later and torn lines dropped
    out = capsys.readouterr().out
    assert 'log.txt:6: dropping a torn last line' in out and f'repaired {log}: now ends at epoch 1 (6 -> 3 lines)' in out
    log.write_text(json.dumps({'note': 'no epoch'}) + '\n' + json.dumps({'epoch': 0}) + '\n')
    repair_log(tmp_path, 0, {'epoch': 0})
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{'note': 'no epoch'}, {'epoch': 0}]
    repair_log(tmp_path, -1, None)  # preempted inside epoch 0: a record without an epoch is kept
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{'note': 'no epoch'}]
    log.write_text(json.dumps({'epoch': 0}) + '\n[1, 2]\n' + json.dumps({'epoch': 1}) + '\n')
    with pytest.raises(ValueError, match=r'log\.txt:2: not a log record \(a JSON list, not an epoch record\); fix or '
                                         r'remove that line, then resume'):
        repair_log(tmp_path, 1, None)


def test_repair_summary_keeps_rows_the_checkpoint_covers_and_restores_its_record(tmp_path, capsys):
    from deit.rundir import repair_epoch_files, repair_summary
    path = tmp_path / 'summary.csv'
    rows = 'epoch,loss,acc\r\n0,1.5,10\r\n1,1.0,20\r\n2,0.5,30\r\n'
    path.write_bytes(rows.encode())
    repair_summary(tmp_path, 2, None)
    assert path.read_bytes() == rows.encode() and capsys.readouterr().out == ''  # complete up to 2: untouched
    repair_summary(tmp_path, 5, None)  # no record to restore for an epoch without a row
    assert path.read_bytes() == rows.encode()
    path.write_bytes((rows + '3,0.2').encode())  # a torn last row
    repair_summary(tmp_path, 1, None)
    assert path.read_bytes() == b'epoch,loss,acc\r\n0,1.5,10\r\n1,1.0,20\r\n'
    out = capsys.readouterr().out
    assert f'note: {path}:5: dropping a torn last row' in out
    assert f'repaired {path}: now ends at epoch 1 (4 -> 2 rows)' in out
    repair_epoch_files(tmp_path, 2, {'epoch': 2, 'loss': 0.5})  # the checkpoint's record, one column missing
    assert path.read_bytes() == b'epoch,loss,acc\r\n0,1.5,10\r\n1,1.0,20\r\n2,0.5,\r\n'
    long = ','.join(['x' * 30] * 4)
    path.write_text(f'epoch,loss\n0,1\n{long}\n1,3\n')
    with pytest.raises(ValueError, match=re.escape(f"summary.csv:3: not an epoch row ({long[:80]!r}); fix or remove "
                                                   f"that line, then resume")):
        repair_summary(tmp_path, 1, None)


# ---- kills at each write boundary -----------------------------------------------------------------------
@pytest.mark.slow
def test_kill_at_every_write_boundary_resumes_to_the_uninterrupted_end_state(folder, tmp_path):
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(folder), '--batch-size', '4', '--epochs', '2',
                     '--aa', 'rand-m9-mstd0.5', '--mixup', '0.8']
    ref = tmp_path / 'ref'
    assert run_module(HARNESS1 + ['--'] + common + ['--output_dir', str(ref)]).returncode == 0
    want = torch.load(ref / 'checkpoint.pth', weights_only=False)
    writes = 3 + 2 + int(_log(ref)[1]['test_acc1'] > _log(ref)[0]['test_acc1'])  # best?, log, checkpoint
    for n in range(1, writes):
        out = tmp_path / f'kill{n}'
        killed = run_module(HARNESS1 + ['--kill-after-write', str(n), '--'] + common + ['--output_dir', str(out)])
        assert killed.returncode != 0, n
        (out / '.checkpoint.pth.tmp-node-123-abcd').write_bytes(b'half a save')  # a save killed midway
        r = run_module(HARNESS1 + ['--'] + common + ['--output_dir', str(out)])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        log = _log(out)
        assert [x['epoch'] for x in log] == [0, 1], (n, log)
        assert _summary_epochs(out) == [0, 1], n
        assert _tb_steps(out) == [0, 1], n
        got = torch.load(out / 'checkpoint.pth', weights_only=False)
        assert got['epoch'] == 1
        assert all(torch.equal(got['model'][k], want['model'][k]) for k in want['model']), n
        best = torch.load(out / 'best_checkpoint.pth', weights_only=False)
        assert best['epoch'] == max(log, key=lambda x: (x['test_acc1'], -x['epoch']))['epoch']
        assert not list(out.glob('.*tmp*')), n
    # a finished run started again says where it ended
    r = run_module(HARNESS1 + ['--'] + common + ['--output_dir', str(ref)])
    assert r.returncode == 0 and 'training already finished' in r.stdout and 'Final accuracy: top-1' in r.stdout
    assert len(_log(ref)) == 2


# ---- unreadable checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize('content, what', [
    (b'hello\n', 'a text file'), (b'{"model": 1}', 'a JSON file'), (b'', 'an empty file'),
    (bytes(range(1, 255)) * 4, 'a binary file of unknown format'), (b'e', 'a text file')])
def test_garbage_checkpoints_get_one_line_everywhere(content, what, tmp_path, capsys):
    from tools import analyze, evaluate
    from tools.load_checkpoint import main as load_main
    bad = tmp_path / 'ckpt.pth'
    bad.write_bytes(content)
    runs = [lambda: cli(TINY + ['--data-set', 'DEMO', '--resume', str(bad), '--epochs', '1']),
            lambda: cli(TINY + ['--data-set', 'DEMO', '--resume', str(bad), '--eval']),
            lambda: cli(TINY + ['--data-set', 'DEMO', '--finetune', str(bad), '--epochs', '1']),
            lambda: load_main([str(bad)]),
            lambda: evaluate.main([str(bad), '--data-set', 'DEMO']),
            lambda: analyze.main(['logits', '--ckpt', str(bad), '--data-set', 'DEMO'])]
    for run in runs:
        assert run() == 2
        err = _err(capsys)
        assert f'{bad}: {what}, not a PyTorch checkpoint' in err and err.count('\n') == 1, err


# ---- corrupted data --------------------------------------------------------------------------------------
def _flip_inside_jpeg(zip_path: Path) -> str:
    """Flip one byte in the entropy-coded data of the first member: the JPEG still decodes, to wrong pixels."""
    with zipfile.ZipFile(zip_path) as zf:
        info = sorted(zf.infolist(), key=lambda i: i.filename)[0]
        data = zf.read(info)
    raw = bytearray(zip_path.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + data.find(b'\xff\xda') + 60
    raw[at] ^= 0x55
    zip_path.write_bytes(bytes(raw))
    from PIL import Image
    with zipfile.ZipFile(zip_path) as zf:  # still a decodable image (zipfile's own read would check the CRC)
        off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        Image.open(io.BytesIO(bytes(raw[off:off + info.compress_size]))).load()
    return info.filename


def test_build_into_a_place_that_cannot_be_written_is_one_line_before_any_work(folder, tmp_path, capsys,
                                                                               monkeypatch):
    (tmp_path / 'file').write_text('')
    assert build_zip(['--src', str(folder), '--dst', str(tmp_path / 'file' / 'cache')]) == 2
    assert _err(capsys).strip() == f'error: {tmp_path / "file" / "cache"}: cannot write there (Not a directory)'
    import data.build_zip_cache as builder  # a write error midway (a full disk): one line too

    def full(*a, **k):
        raise OSError(28, 'No space left on device', str(tmp_path / 'cache' / 'train.zip'))
    monkeypatch.setattr(builder, 'write_zip', full)
    assert build_zip(['--src', str(folder), '--dst', str(tmp_path / 'cache')]) == 2
    assert 'No space left on device' in _err(capsys)


def test_crc_errors_are_found_by_verify_and_the_reader(folder, tmp_path, capsys):
    dst = tmp_path / 'cache'
    assert build_zip(['--src', str(folder), '--dst', str(dst)]) == 0
    victim = _flip_inside_jpeg(dst / 'val.zip')
    capsys.readouterr()
    assert build_zip(['--dst', str(dst), '--verify']) == 1
    assert f'BAD val.zip@/{victim}: CRC-32 mismatch' in capsys.readouterr().out
    args = TINY + ['--data-set', 'IMNET', '--data-path', str(dst), '--cache', '--epochs', '1', '--batch-size', '4']
    assert cli(args) == 2
    assert f'val.zip@/{victim}: CRC-32 mismatch' in _err(capsys)
    out = tmp_path / 'skip'
    assert cli(args + ['--skip-bad-images', '--output_dir', str(out)]) == 0
    log = _log(out)[0]
    assert log['test_skipped_images'] == 1 and log['test_n'] == 8  # reported, over the 8 readable images


def test_val_labels_must_match_their_class_folders(folder, tmp_path, capsys):
    dst = tmp_path / 'cache'
    assert build_zip(['--src', str(folder), '--dst', str(dst)]) == 0
    lines = (dst / 'val_map.txt').read_text().splitlines()
    name, label = lines[0].split('\t')
    lines[0] = f'{name}\t{(int(label) + 1) % 3}'
    (dst / 'val_map.txt').write_text('\n'.join(lines) + '\n')
    assert build_zip(['--dst', str(dst), '--verify']) == 2
    assert f"val_map.txt:1: '{name}' has label" in _err(capsys)
    assert cli(TINY + ['--data-set', 'IMNET', '--data-path', str(dst), '--cache', '--epochs', '1']) == 2
    assert f"but class folder '{name.split('/')[0]}' is label {label}" in _err(capsys)


def test_undecodable_file_in_an_image_folder(tmp_path, capsys):
    root = make_imagefolder(tmp_path / 'f', n_classes=2, n_train=4, n_val=2)
    bad = root / 'train' / 'class_1' / '001.jpg'
    bad.write_bytes(bad.read_bytes()[:100])
    args = TINY + ['--data-set', 'FOLDER', '--data-path', str(root), '--epochs', '1', '--batch-size', '4']
    assert cli(args) == 2
    assert f'{bad}: cannot decode image' in _err(capsys)
    out = tmp_path / 'run'
    assert cli(args + ['--skip-bad-images', '--output_dir', str(out)]) == 0
    assert _log(out)[0]['train_skipped_images'] == 1


def test_failed_cache_build_leaves_nothing(tmp_path, capsys):
    src = tmp_path / 'src'
    (src / 'train' / 'a').mkdir(parents=True)
    make_image(0, 0).save(src / 'train' / 'a' / 'x.jpg')
    (src / 'val' / 'b').mkdir(parents=True)
    make_image(0, 1).save(src / 'val' / 'b' / 'x.jpg')
    assert build_zip(['--src', str(src), '--dst', str(tmp_path / 'out')]) == 2
    assert 'class folders differ' in _err(capsys) and not (tmp_path / 'out').exists()


# ---- bad flags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('extra, msg', [
    (['--epochs', '0'], '--epochs 0: train for at least 1 epoch'),
    (['--input-size', '7'], "--input-size 7 is not a multiple of deit_demo_patch4_32's patch size 4"),
    (['--input-size', '30'], 'use e.g. --input-size 28'),
    (['--eval-every', '0'], '--eval-every 0'),
])
def test_bad_flags_are_one_line(extra, msg, capsys):
    assert cli(TINY + ['--data-set', 'DEMO'] + extra) == 2
    err = _err(capsys)
    assert msg in err and err.count('\n') == 1, err


def test_patch16_model_input_size_is_checked(capsys):
    assert cli(['--model', 'deit_tiny_patch16_224', '--input-size', '100', '--data-set', 'DEMO', '--epochs', '1',
                '--warmup-epochs', '0', '--num_workers', '0']) == 2
    assert 'use e.g. --input-size 96' in _err(capsys)


def test_one_run_per_output_dir(tmp_path, capsys):
    from deit.rundir import lock_run_dir, release_run_dir
    out = tmp_path / 'run'
    out.mkdir()
    held = lock_run_dir(out)  # a live training holds the folder
    args = TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1', '--output_dir', str(out)]
    assert cli(args) == 2
    assert 'is in use by a running training' in _err(capsys) and not (out / 'log.txt').exists()
    release_run_dir(held)
    (out / '.lock').write_text('host gone, pid 999999\n')  # the lock file of a run that was killed
    assert cli(args) == 0
    assert 'taking over' in capsys.readouterr().out and len(_log(out)) == 1


def test_eval_every_logs_test_values_only_when_measured(tmp_path):
    out = tmp_path / 'run'
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '3', '--max-steps-per-epoch', '1', '--eval-every', '2',
                       '--output_dir', str(out)]) == 0
    log = _log(out)
    assert ['test_acc1' in x for x in log] == [False, True, True]
