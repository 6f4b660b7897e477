"""ZIP cache: builder, reader, integrity errors, worker sharing, class-map conversion, trainer --cache."""
from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from data.build_zip_cache import build, main as build_main
from data.class_map import class_permutation, convert_head, convert_predictions, invert
from data.zip_cache import (CacheError, CorruptImageError, ShardSampler, ZipImageDataset, collate_skip_bad,
                            parse_map_file, write_map_file)
from deit.main import cli
from tests.conftest import TINY, make_image, make_imagefolder


@pytest.fixture(scope='module')
def src_tree(tmp_path_factory):
    """ImageFolder with nested names and non-ASCII file and folder names."""
    root = make_imagefolder(tmp_path_factory.mktemp('src'), n_classes=3, n_train=6, n_val=2,
                            names=['aardvark', 'zebra', 'ünïcode_klasse'])
    nested = root / 'train' / 'zebra' / 'sub dir'
    nested.mkdir()
    make_image(1, 77).save(nested / 'bild_ß_é.jpg')
    make_image(2, 78).save(root / 'train' / 'ünïcode_klasse' / '画像.JPEG')
    return root


@pytest.fixture(scope='module')
def cache(src_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp('cache')
    build(src_tree, dst)
    return dst


def rel(ds: ImageFolder):
    return [(os.path.relpath(p, ds.root).replace(os.sep, '/'), t) for p, t in ds.samples]


def test_cache_matches_imagefolder_samples_labels_and_pixels(src_tree, cache):
    for split in ('train', 'val'):
        folder = ImageFolder(str(src_tree / split))
        zds = ZipImageDataset(cache / f'{split}.zip', cache / f'{split}_map.txt', folder_labels=True)
        assert [(n.split('@/', 1)[1], t) for n, t in zds.samples] == rel(folder)
        assert zds.num_classes == len(folder.classes) == 3
        for i in (0, len(zds) - 1):
            a = np.asarray(zds.load(i))
            b = np.asarray(folder.loader(folder.samples[i][0]))
            assert np.array_equal(a, b)
    names = [n for n, _ in parse_map_file(cache / 'train_map.txt')]
    assert 'zebra/sub dir/bild_ß_é.jpg' in names and 'ünïcode_klasse/画像.JPEG' in names
    with zipfile.ZipFile(cache / 'train.zip') as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


def test_build_is_deterministic_and_maps_round_trip(src_tree, cache, tmp_path):
    build(src_tree, tmp_path)
    for f in ('train.zip', 'val.zip', 'train_map.txt', 'val_map.txt'):
        assert (tmp_path / f).read_bytes() == (cache / f).read_bytes(), f
    entries = parse_map_file(cache / 'train_map.txt')
    write_map_file(tmp_path / 'copy.txt', entries)
    assert parse_map_file(tmp_path / 'copy.txt') == entries
    assert not list(tmp_path.glob('*.tmp'))


def test_flat_val_with_label_file(src_tree, tmp_path):
    flat = tmp_path / 'flat'
    (flat / 'val').mkdir(parents=True)
    os.symlink(src_tree / 'train', flat / 'train')
    lines = []
    for c, cls in enumerate(['aardvark', 'zebra', 'ünïcode_klasse']):
        name = f'val_{c:05d}.JPEG'
        make_image(c, 500).save(flat / 'val' / name, format='JPEG')
        lines.append(f'{name} {cls}')
    (tmp_path / 'labels.txt').write_text('\n'.join(lines) + '\n')
    stats = build(flat, tmp_path / 'out', val_labels=tmp_path / 'labels.txt')
    assert stats['val'] == 3
    assert parse_map_file(tmp_path / 'out' / 'val_map.txt') == [('val_00000.JPEG', 0), ('val_00001.JPEG', 1),
                                                                  ('val_00002.JPEG', 2)]


def _zip_with(tmp_path, members: dict, map_lines: str):
    zp = tmp_path / 'train.zip'
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    (tmp_path / 'train_map.txt').write_text(map_lines, encoding='utf-8')
    return zp, tmp_path / 'train_map.txt'


def _jpeg(c=0, i=0):
    buf = io.BytesIO()
    make_image(c, i).save(buf, format='JPEG')
    return buf.getvalue()


def test_truncated_jpeg_errors_naming_member_or_is_skipped_and_counted(tmp_path):
    good, bad = _jpeg(0), _jpeg(1)[:200]
    zp, mp_ = _zip_with(tmp_path, {'a/good.jpg': good, 'b/bad.jpg': bad, 'b/ok.jpg': _jpeg(1, 2)},
                        'a/good.jpg\t0\nb/bad.jpg\t1\nb/ok.jpg\t1\n')
    ds = ZipImageDataset(zp, mp_)
    assert ds[0][1] == 0
    with pytest.raises(CorruptImageError, match=r'train\.zip@/b/bad\.jpg: cannot decode'):
        ds[1]
    skip = ZipImageDataset(zp, mp_, skip_bad=True)
    assert skip[1] is None
    assert skip.pop_skipped() == 1 and skip.pop_skipped() == 0
    # the skipped sample is dropped from its batch, never replaced by another image
    batch = collate_skip_bad([(torch.zeros(1), 0), None, (torch.ones(1), 1), (torch.ones(1), 1)])
    assert len(batch[1]) == 2  # 3 left, trimmed to even for Mixup


def test_missing_member_and_malformed_lines_name_file_and_line(tmp_path):
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg()}, 'a/x.jpg\t0\na/missing.jpg\t0\n')
    with pytest.raises(CacheError, match=r"train_map\.txt: line 2 names member 'a/missing\.jpg'"):
        ZipImageDataset(zp, mp_)
    for text, msg in (('a/x.jpg\n', r'train_map\.txt:1: expected'), ('a/x.jpg\tzero\n', r':1: label .zero.'),
                      ('a/x.jpg\t0\n\n', r':2: expected'), ('a/x.jpg\t1\n', r'missing \[0\]')):
        (tmp_path / 'train_map.txt').write_text(text)
        with pytest.raises(CacheError, match=msg):
            ZipImageDataset(zp, mp_)
    (tmp_path / 'train_map.txt').write_text('a/x.jpg\t0\nb/x.jpg\t0\n')
    with pytest.raises(CacheError, match="label 0 is used by folders 'a' and 'b'"):
        ZipImageDataset(zp, mp_)
    (tmp_path / 'bad.zip').write_bytes(b'not a zip at all')
    with pytest.raises(CacheError, match='bad.zip: not a readable zip'):
        ZipImageDataset(tmp_path / 'bad.zip', mp_)


def _as_list(batch):
    return batch


class _WhoAmI(ZipImageDataset):
    def __getitem__(self, i):
        self.read_bytes(i)
        return type(self.index._mm).__name__, os.getpid()


def test_workers_share_the_mmap_not_a_copy(cache):
    ds = _WhoAmI(cache / 'train.zip', cache / 'train_map.txt')
    state = pickle.dumps(ds)
    assert len(state) < os.path.getsize(cache / 'train.zip') / 4  # no zip bytes travel to workers
    clone = pickle.loads(state)
    assert clone.index._mm is None and isinstance(clone.index.mm, mmap.mmap)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_as_list,
                                         multiprocessing_context='spawn')
    seen = [x for batch in loader for x in batch]
    assert {kind for kind, _ in seen} == {'mmap'}
    assert len({pid for _, pid in seen}) == 2 and os.getpid() not in {pid for _, pid in seen}


def test_part_mode_shards_are_disjoint_and_cover(cache):
    shards = [ZipImageDataset(cache / 'train.zip', cache / 'train_map.txt', cache_mode='part', rank=r,
                              world_size=3).shard for r in range(3)]
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(20))
    s = ShardSampler(shards[1], seed=5)
    first = list(s)
    assert sorted(first) == sorted(shards[1].tolist()) and len(first) == 7
    assert list(ShardSampler(shards[1], seed=5)) == first  # deterministic by seed
    s.set_epoch(1)
    assert sorted(s) == sorted(first) and list(s) != first  # reshuffled each epoch


def test_class_permutation_round_trip(tmp_path):
    folders = ['apple', 'banana', 'cherry', 'date']
    for f in folders:
        (tmp_path / 'train' / f).mkdir(parents=True)
    zip_order = ['cherry', 'apple', 'date', 'banana']  # the map numbers classes differently
    write_map_file(tmp_path / 'map.txt', [(f'{f}/x.jpg', i) for i, f in enumerate(zip_order)])
    perm = class_permutation(tmp_path / 'map.txt', tmp_path / 'train')
    assert perm.tolist() == [2, 0, 3, 1]
    assert torch.equal(invert(invert(perm)), perm)
    head = {'head.weight': torch.randn(4, 3), 'head.bias': torch.randn(4)}
    conv = convert_head(head, perm)
    assert torch.equal(conv['head.weight'][2], head['head.weight'][0])  # cherry: zip 0 -> folder 2
    back = convert_head(conv, invert(perm))
    assert all(torch.equal(back[k], head[k]) for k in head)
    logits = torch.randn(5, 4)
    assert torch.equal(convert_predictions(logits, perm).argmax(1), perm[logits.argmax(1)])
    assert torch.equal(convert_predictions(convert_predictions(logits, perm), invert(perm)), logits)
    # the converted head computes the same outputs, re-ordered
    x = torch.randn(2, 3)
    out_zip = x @ head['head.weight'].T + head['head.bias']
    out_folder = x @ conv['head.weight'].T + conv['head.bias']
    assert torch.allclose(convert_predictions(out_zip, perm), out_folder)


def test_verify_cli_reports_bad_members(tmp_path, src_tree, capsys):
    dst = tmp_path / 'c'
    assert build_main(['--src', str(src_tree), '--dst', str(dst)]) == 0
    assert build_main(['--dst', str(dst), '--verify']) == 0
    # rewrite val.zip with one truncated member
    with zipfile.ZipFile(dst / 'val.zip') as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    victim = sorted(members)[0]
    members[victim] = members[victim][:100]
    with zipfile.ZipFile(dst / 'val.zip', 'w', zipfile.ZIP_STORED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    capsys.readouterr()
    assert build_main(['--dst', str(dst), '--verify']) == 1
    out = capsys.readouterr().out
    assert f'BAD val.zip@/{victim}' in out and 'verify: 1 bad member(s)' in out


def test_trainer_with_and_without_cache_sees_identical_data(src_tree, cache, tmp_path):
    runs = {}
    for name, extra in (('folder', ['--data-path', str(src_tree)]), ('zip', ['--data-path', str(cache), '--cache'])):
        out = tmp_path / name
        assert cli(TINY + ['--data-set', 'IMNET', '--epochs', '1', '--batch-size', '4', '--seed', '1',
                           '--output_dir', str(out)] + extra) == 0
        runs[name] = json.loads((out / 'log.txt').read_text().splitlines()[0])
    # same samples, same labels, same bytes, same seed: the very same losses and accuracy
    for k in ('train_loss', 'test_acc1', 'test_loss', 'test_n'):
        assert runs['zip'][k] == pytest.approx(runs['folder'][k], rel=1e-6), k


@pytest.mark.slow
def test_cache_under_ddp_with_rasampler_and_persistent_workers(cache, tmp_path):
    """2 ranks (gloo) read the same mmap-ed cache through RASampler and persistent workers."""
    import re

    from tests.conftest import run_module
    r = run_module(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'deit.main'] + TINY +
                   ['--data-set', 'IMNET', '--data-path', str(cache), '--cache', '--epochs', '2', '--batch-size', '4',
                    '--num_workers', '1', '--repeated-aug', '--dist-eval', '--output_dir', str(tmp_path / 'run')])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sums = dict(re.findall(r'\[rank (\d)\] parameter checksum ([-+.e0-9]+/[-+.e0-9]+)', r.stdout + r.stderr))
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    log = [json.loads(x) for x in (tmp_path / 'run' / 'log.txt').read_text().splitlines()]
    assert [x['epoch'] for x in log] == [0, 1] and log[-1]['test_n'] == 6


# ---- the stored index (<zip>.idx) -----------------------------------------------------------------------
def _member_table(zp):
    """What zipfile itself says about a zip's file members: name -> (data offset, size, crc)."""
    out = {}
    with zipfile.ZipFile(zp) as zf, open(zp, 'rb') as f:
        for i in zf.infolist():
            if i.is_dir():
                continue
            f.seek(i.header_offset + 26)
            n, m = struct.unpack('<HH', f.read(4))
            out[i.filename] = (i.header_offset + 30 + n + m, i.compress_size, i.CRC)
    return out


def test_index_is_stored_reused_and_rebuilt_when_stale(tmp_path, capsys):
    from data.zip_cache import open_index
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg(0), 'b/y.jpg': _jpeg(1)}, 'a/x.jpg\t0\nb/y.jpg\t1\n')
    idx = open_index(zp, mp_)
    assert (tmp_path / 'train.zip.idx').is_file() and 'wrote' in capsys.readouterr().out
    assert isinstance(idx.offsets, np.memmap) or isinstance(idx.offsets.base, np.memmap)
    again = open_index(zp, mp_)  # reused: no message, same arrays
    assert capsys.readouterr().out == '' and list(again.rows) == [0, 1]
    # a member appended to the zip: the index no longer describes it
    with zipfile.ZipFile(zp, 'a') as zf:
        zf.writestr('c/z.jpg', _jpeg(2))
    (tmp_path / 'train_map.txt').write_text('a/x.jpg\t0\nb/y.jpg\t1\nc/z.jpg\t2\n')
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    assert 'stale' in capsys.readouterr().out and len(ds) == 3 and ds.sample_name(2) == 'train.zip@/c/z.jpg'
    assert ds.read_bytes(2) == _jpeg(2)
    # a corrupt index is named and made again, never trusted
    (tmp_path / 'train.zip.idx').write_bytes(b'MAXSUP-ZIPIDX\n' + b'\xff' * 40)
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    out = capsys.readouterr().out
    assert f'{tmp_path / "train.zip.idx"}: unreadable' in out and ds.read_bytes(1) == _jpeg(1)


def test_index_kept_in_memory_when_the_folder_is_read_only(tmp_path, capsys, monkeypatch):
    import errno

    import data.zip_cache
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg(0)}, 'a/x.jpg\t0\n')

    def read_only(*a, **kw):  # what a read-only data folder answers (tests run as root, who may write)
        raise PermissionError(errno.EACCES, 'Permission denied')

    monkeypatch.setattr(data.zip_cache, 'write_index', read_only)
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    assert 'keeping it in memory' in capsys.readouterr().out and ds.read_bytes(0) == _jpeg(0)
    assert not (tmp_path / 'train.zip.idx').exists()


def test_index_travels_to_workers_without_copying_arrays(cache):
    import pickle
    ds = ZipImageDataset(cache / 'train.zip', cache / 'train_map.txt', cache_mode='no')
    state = pickle.dumps(ds)
    assert len(state) < 4096  # the arrays are not in the pickle: the worker maps the index file again
    clone = pickle.loads(state)
    assert clone.read_bytes(5) == ds.read_bytes(5) and clone.sample_name(5) == ds.sample_name(5)


@pytest.mark.parametrize('method', [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_every_compression_mode_reads_byte_exact(tmp_path, method):
    members = {f'c{i % 3}/{i}.jpg': _jpeg(i % 3, i) for i in range(7)}
    zp = tmp_path / 'train.zip'
    with zipfile.ZipFile(zp, 'w', method) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    (tmp_path / 'train_map.txt').write_text(''.join(f'{k}\t{int(k[1])}\n' for k in members))
    ds = ZipImageDataset(zp, tmp_path / 'train_map.txt', cache_mode='no')
    assert [ds.read_bytes(i) for i in range(len(ds))] == list(members.values())


@pytest.mark.parametrize('method', [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_other_compression_modes_are_refused_naming_the_member(tmp_path, method):
    zp = tmp_path / 'train.zip'
    with zipfile.ZipFile(zp, 'w') as zf:
        zf.writestr('c0/0.jpg', _jpeg(0, 0))
        zf.writestr('c0/1.jpg', _jpeg(0, 1), compress_type=method)
    (tmp_path / 'train_map.txt').write_text('c0/0.jpg\t0\nc0/1.jpg\t0\n')
    with pytest.raises(CacheError, match=rf'train\.zip@/c0/1\.jpg: unsupported compression {method} .*build_zip_cache'):
        ZipImageDataset(zp, tmp_path / 'train_map.txt', cache_mode='no')


def test_zip64_member_past_4gb_parses_as_zipfile_does(tmp_path):
    """A sparse file: 5 GiB of hole, then a zip whose headers sit past 4 GiB (ZIP64 offsets)."""
    from data.zip_index import read_central_directory
    zp = tmp_path / 'big.zip'
    with open(zp, 'wb') as f:
        f.seek(5 << 30)
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i in range(3):
                zf.writestr(f'n0/{i}.jpg', _jpeg(0, i))
            zf.writestr('n0/deflated.jpg', _jpeg(1), compress_type=zipfile.ZIP_DEFLATED)
    assert zp.stat().st_size > 5 << 30
    want = _member_table(zp)
    assert min(off for off, _, _ in want.values()) > 1 << 32
    got = read_central_directory(zp)
    names = bytes(got['name_blob']).decode('utf-8').split('\n')[:-1]
    assert {n: (int(o), int(s), int(c)) for n, o, s, c in
            zip(names, got['offsets'], got['sizes'], got['crcs'])} == want
    (tmp_path / 'big_map.txt').write_text(''.join(f'{n}\t0\n' for n in want))
    ds = ZipImageDataset(zp, tmp_path / 'big_map.txt', cache_mode='no')
    with zipfile.ZipFile(zp) as zf:
        assert [ds.read_bytes(i) for i in range(len(ds))] == [zf.read(n) for n in want]
