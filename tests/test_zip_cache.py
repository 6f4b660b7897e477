"""ZIP cache: builder, reader, integrity errors, worker sharing, class-map conversion, trainer --cache."""
from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import zipfile
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from data.build_zip_cache import build, main as build_main, scan_class_folders
from data.class_map import class_permutation, convert_head, convert_predictions, invert
import data.zip_cache as zc
from data.decode import CorruptImageError, LazyJpeg
from data.map_file import (check_labels, check_split_labels, class_folder, parse_map_file, train_class_index,
                           write_map_file)
from data.skip import collate_skip_bad
from data.zip_cache import ShardSampler, ZipImageDataset, _labels_ok, _map_arrays, open_index
from data.zip_index import CacheError
from deit.main import cli
from tests.conftest import ROOT, TINY, make_image, make_imagefolder


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


def _zip_with(tmp_path, members: dict, map_lines: str, split: str = 'train'):
    zp = tmp_path / f'{split}.zip'
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    (tmp_path / f'{split}_map.txt').write_text(map_lines, encoding='utf-8')
    return zp, tmp_path / f'{split}_map.txt'


def _two_classes(tmp_path):
    """train.zip + train_map.txt: a/x.jpg (class 0) and b/y.jpg (class 1), zip in map order."""
    return _zip_with(tmp_path, {'a/x.jpg': _jpeg(), 'b/y.jpg': _jpeg(1)}, 'a/x.jpg\t0\nb/y.jpg\t1\n')


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
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg(0), 'b/y.jpg': _jpeg(1)}, 'a/x.jpg\t0\nb/y.jpg\t1\n')
    idx = open_index(zp, mp_, folder_labels=True)
    assert (tmp_path / 'train.zip.idx').is_file() and 'wrote' in capsys.readouterr().out
    assert isinstance(idx.offsets, np.memmap) or isinstance(idx.offsets.base, np.memmap)
    again = open_index(zp, mp_, folder_labels=True)  # reused: no message, same arrays
    assert capsys.readouterr().out == '' and list(again.rows) == [0, 1]
    # a member appended to the zip: the index no longer describes it
    with zipfile.ZipFile(zp, 'a') as zf:
        zf.writestr('c/z.jpg', _jpeg(2))
    (tmp_path / 'train_map.txt').write_text('a/x.jpg\t0\nb/y.jpg\t1\nc/z.jpg\t2\n')
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    assert 'stale' in capsys.readouterr().out and len(ds) == 3 and ds.sample_name(2) == 'train.zip@/c/z.jpg'
    assert ds.read_bytes(2) == _jpeg(2)
    # rewritten to the same name, size and mtime, other end records: 3 bytes of data less, a 3-byte comment
    st = zp.stat()
    with zipfile.ZipFile(zp) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr(members[0][0], members[0][1][:-3])
        for name, data in members[1:]:
            zf.writestr(name, data)
        zf.comment = b'abc'
    os.utime(zp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert zp.stat().st_size == st.st_size and zp.stat().st_mtime_ns == st.st_mtime_ns
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    assert 'stale' in capsys.readouterr().out and ds.read_bytes(0) == _jpeg(0)[:-3] and ds.read_bytes(2) == _jpeg(2)
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


def _names(table: dict) -> list[str]:
    """The member names of read_central_directory's table, in order."""
    blob, starts = table['name_blob'], table['name_starts']
    return [bytes(blob[starts[k]:starts[k + 1] - 1]).decode('utf-8') for k in range(len(starts) - 1)]


def _members(table: dict) -> dict:
    """read_central_directory's table in _member_table's form: name -> (data offset, size, crc)."""
    return {n: (int(o), int(s), int(c)) for n, o, s, c in
            zip(_names(table), table['offsets'], table['sizes'], table['crcs'])}


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
    assert _members(read_central_directory(zp)) == want
    (tmp_path / 'big_map.txt').write_text(''.join(f'{n}\t0\n' for n in want))
    ds = ZipImageDataset(zp, tmp_path / 'big_map.txt', cache_mode='no')
    with zipfile.ZipFile(zp) as zf:
        assert [ds.read_bytes(i) for i in range(len(ds))] == [zf.read(n) for n in want]


def test_zip64_extra_field_after_other_extra_fields():
    """The ZIP64 field (tag 1) holds only the header fields that read 0xFFFFFFFF, in the order uncompressed size,
    compressed size, offset; other tools put their fields (timestamps 0x5455, Unix ids 0x7875, padding) before it."""
    from data.zip_index import _zip64_extra
    U32 = 0xFFFFFFFF
    timestamp = struct.pack('<HHB', 0x5455, 5, 3) + struct.pack('<I', 1_700_000_000)
    ids = struct.pack('<HHBBB', 0x7875, 3, 1, 1, 0)[:7]  # 7 bytes: a header of length 3
    zip64 = struct.pack('<HHQQ', 1, 16, 6 << 30, 7 << 30)
    assert _zip64_extra(timestamp + ids + zip64, U32, 100, U32) == (6 << 30, 100, 7 << 30)
    assert _zip64_extra(zip64[:4] + struct.pack('<QQ', 5 << 30, 9 << 30), 10, U32, U32) == (10, 5 << 30, 9 << 30)
    assert _zip64_extra(timestamp + ids, 10, 20, 30) == (10, 20, 30)  # no ZIP64 field: the header's values
    padding = struct.pack('<HH', 0xCAFE, 0x8000) + bytes(0x8000)  # a field of 32 KiB (its length >= 2**15)
    assert _zip64_extra(padding + zip64, U32, 100, U32) == (6 << 30, 100, 7 << 30)


def _zip_with_names(path, raw_names: dict[bytes, bytes], flag_bits: int = 0) -> None:
    """A zip written by zipfile with ASCII placeholder names, then the names' bytes replaced in the local and
    central headers (how other tools store cp437 or mislabelled names); ``flag_bits`` is OR-ed into every
    central record's general-purpose flags."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        for k, placeholder in enumerate(raw_names):
            zf.writestr(placeholder.decode(), _jpeg(0, k))
    data = bytearray(path.read_bytes())
    for placeholder, raw in raw_names.items():
        data = bytearray(bytes(data).replace(placeholder, raw))
    at = data.find(b'PK\x01\x02')
    while at >= 0:
        flags = struct.unpack_from('<H', data, at + 8)[0]
        struct.pack_into('<H', data, at + 8, flags | flag_bits)
        at = data.find(b'PK\x01\x02', at + 4)
    path.write_bytes(bytes(data))


def test_member_names_cp437_without_the_utf8_flag_and_utf8_with_it(tmp_path):
    from data.zip_index import read_central_directory
    legacy = tmp_path / 'legacy.zip'  # cp437 (the zip default): 0x82 is e-acute, 0x80 C-cedilla; bit 0 set as
    _zip_with_names(legacy, {b'n0/caf_.jpg': b'n0/caf\x82.jpg', b'n0/_a.jpg': b'n0/\x80a.jpg',  # some tools do
                             b'n0/plain.jpg': b'n0/plain.jpg'}, flag_bits=1)
    assert _names(read_central_directory(legacy)) == ['n0/caf\u00e9.jpg', 'n0/\u00c7a.jpg', 'n0/plain.jpg']
    lowest = tmp_path / 'lowest.zip'  # 0x80, the lowest byte outside ASCII, as the highest byte of the directory
    _zip_with_names(lowest, {b'n0/_a.jpg': b'n0/\x80a.jpg', b'n0/plain.jpg': b'n0/plain.jpg'})
    assert _names(read_central_directory(lowest)) == ['n0/\u00c7a.jpg', 'n0/plain.jpg']
    lookalike = tmp_path / 'lookalike.zip'  # cp437 bytes that happen to be valid UTF-8: still cp437, unflagged
    _zip_with_names(lookalike, {b'n0/__.jpg': b'n0/\xc3\xa9.jpg'}, flag_bits=1)
    assert _names(read_central_directory(lookalike)) == ['n0/\u251c\u2310.jpg']
    utf8 = tmp_path / 'utf8.zip'
    with zipfile.ZipFile(utf8, 'w', zipfile.ZIP_STORED) as zf:  # zipfile sets the UTF-8 flag for such names
        zf.writestr('n0/caf\u00e9.jpg', _jpeg(0, 0))
        zf.writestr('n0/\u732b.jpg', _jpeg(0, 1))
    assert _names(read_central_directory(utf8)) == ['n0/caf\u00e9.jpg', 'n0/\u732b.jpg']
    liar = tmp_path / 'liar.zip'  # the UTF-8 flag set, the bytes latin-1
    _zip_with_names(liar, {b'n0/caf_.jpg': b'n0/caf\xe9.jpg'}, flag_bits=0x800)
    with pytest.raises(CacheError, match=r"liar\.zip: member 1 of the central directory: its name b'n0/caf\\xe9\.jpg' "
                                         r"is not UTF-8 though its UTF-8 flag is set"):
        read_central_directory(liar)


def test_index_file_layout_header_then_arrays_each_on_a_64_byte_boundary(tmp_path):
    """The .idx format: magic, the header's length (u64), the JSON header; the arrays from the first multiple of
    64 after it, each padded to a multiple of 64, the file ending with the last one's padding; mode 0o644 (a
    cache others read)."""
    from data.zip_index import INDEX_MAGIC, read_index, write_index
    arrays = {'a': np.arange(13, dtype=np.int64), 'b': np.arange(130, dtype=np.uint8), 'c': np.ones(3, np.int16)}
    old_umask = os.umask(0o077)
    try:
        for pad in range(64):  # every position of the header's end within a 64-byte block
            path = tmp_path / f'{pad}.idx'
            write_index(path, {'zip': 'x' * pad}, arrays)
            raw = path.read_bytes()
            assert raw.startswith(INDEX_MAGIC)
            n = struct.unpack_from('<Q', raw, len(INDEX_MAGIC))[0]
            header = json.loads(raw[len(INDEX_MAGIC) + 8:len(INDEX_MAGIC) + 8 + n])
            start = -(-(len(INDEX_MAGIC) + 8 + n) // 64) * 64
            offsets, expect = [header['arrays'][k][2] for k in arrays], 0
            for k, a in arrays.items():
                assert header['arrays'][k][2] == expect and (start + expect) % 64 == 0
                assert raw[start + expect:start + expect + a.nbytes] == a.tobytes()
                expect += -(-a.nbytes // 64) * 64
            assert len(raw) == start + expect and offsets == [0, 128, 320]
            got = read_index(path, {'zip': 'x' * pad})
            assert all(np.array_equal(got[k], a) for k, a in arrays.items())
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


def test_an_unusable_index_gives_its_reason(tmp_path):
    """The reason is printed before the index is made again ('<idx>: <reason>; making it again')."""
    from data.zip_index import INDEX_MAGIC, INDEX_VERSION, read_index, write_index
    path = tmp_path / 'a.idx'
    write_index(path, {'zip': 'z'}, {'a': np.arange(100, dtype=np.int64)})
    good = path.read_bytes()
    n = struct.unpack_from('<Q', good, len(INDEX_MAGIC))[0]
    header = json.loads(good[len(INDEX_MAGIC) + 8:len(INDEX_MAGIC) + 8 + n])

    def with_header(h):  # the same layout, another header of the same length
        text = json.dumps(h).encode()
        return good[:len(INDEX_MAGIC)] + struct.pack('<Q', len(text)) + text.ljust(n) + good[len(INDEX_MAGIC) + 8 + n:]
    cases = [(b'PK\x03\x04' + good[4:], 'not an index file'),
             (good[:len(INDEX_MAGIC)] + struct.pack('<Q', len(good) + 1) + good[len(INDEX_MAGIC) + 8:],
              'unreadable (header length past the end of the file)'),
             (with_header({**header, 'version': INDEX_VERSION + 1}),
              f'index version {INDEX_VERSION + 1}, this code reads {INDEX_VERSION}'),
             (good, 'stale: made from other files (zip or map changed since)'),
             (good[:-64], 'truncated')]
    for k, (raw, reason) in enumerate(cases):
        path.write_bytes(raw)
        assert read_index(path, {'zip': 'z'} if k < 3 or k == 4 else {'zip': 'other'}) == reason, k


def test_central_directory_of_zips_other_tools_write(tmp_path, monkeypatch):
    """Member comments, real timestamps, deflated members, ZIP64 records and a ZIP64 end record beside exact
    plain fields (zipfile writes them past ZIP64_LIMIT, 2 GiB, lowered here) and bytes prepended to the archive
    (a self-extractor): every member's data offset, size and CRC as zipfile reads them, in the index's dtypes."""
    from data.zip_index import read_central_directory
    monkeypatch.setattr(zipfile, 'ZIP64_LIMIT', 40)
    plain = tmp_path / 'plain.zip'
    with zipfile.ZipFile(plain, 'w', zipfile.ZIP_STORED) as zf:
        for k in range(4):
            info = zipfile.ZipInfo(f'n{k % 2}/{k}.jpg', date_time=(2024, 5, 6, 7, 8, 10 + 2 * k))
            info.comment = f'member comment {k}'.encode() * (k + 1)
            info.compress_type = zipfile.ZIP_DEFLATED if k == 2 else zipfile.ZIP_STORED
            zf.writestr(info, _jpeg(k, k))
        zf.writestr('n1/z.bin', b'PK\x05\x06' + bytes(18))  # the end record's signature in the last member's data
    monkeypatch.undo()
    sfx = tmp_path / 'sfx.zip'
    sfx.write_bytes(b'#!/bin/sh\necho a self-extracting stub\n' * 3 + plain.read_bytes())
    for zp in (plain, sfx):
        want = _member_table(zp)
        got = read_central_directory(zp)
        assert _members(got) == want
        assert got['methods'].tolist() == [0, 0, 8, 0, 0]
        assert [got[k].dtype for k in ('offsets', 'sizes', 'methods', 'crcs')] == [np.int64, np.int64, np.int8,
                                                                                  np.uint32]
        with zipfile.ZipFile(zp) as zf:
            assert sum(i.file_size > 40 for i in zf.infolist()) == 4  # ZIP64 records, all images
    broken = tmp_path / 'broken.zip'
    broken.write_bytes(plain.read_bytes().replace(b'PK\x06\x06', b'PK\x06\x00'))
    with pytest.raises(CacheError, match=r'broken\.zip: bad ZIP64 end record'):
        read_central_directory(broken)


def test_a_zip64_extra_that_holds_only_the_compressed_size(tmp_path):
    """Only the fields that overflow are 0xFFFFFFFF and carried in the ZIP64 extra, in APPNOTE's order (what
    Info-ZIP writes; zipfile always writes both sizes): here a deflated member's compressed size alone."""
    from data.zip_index import read_central_directory
    path = tmp_path / 'one.zip'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
        zf.writestr('n0/a.jpg', _jpeg(0, 0))
        zf.writestr('n0/b.jpg', _jpeg(0, 1))
    data = bytearray(path.read_bytes())
    at = data.find(b'PK\x01\x02')  # the first central record
    csize = struct.unpack_from('<I', data, at + 20)[0]
    nlen, xlen = struct.unpack_from('<HH', data, at + 28)
    struct.pack_into('<I', data, at + 20, 0xFFFFFFFF)
    struct.pack_into('<H', data, at + 30, xlen + 12)
    data[at + 46 + nlen + xlen:at + 46 + nlen + xlen] = struct.pack('<HHQ', 1, 8, csize)
    end = data.rfind(b'PK\x05\x06')
    struct.pack_into('<I', data, end + 12, struct.unpack_from('<I', data, end + 12)[0] + 12)  # the directory's size
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert zf.infolist()[0].compress_size == csize and zf.testzip() is None
    assert _members(read_central_directory(path)) == _member_table(path)


def test_central_directory_of_an_empty_zip_and_of_files_that_are_no_zip(tmp_path):
    from data.zip_index import read_central_directory
    empty = tmp_path / 'empty.zip'
    zipfile.ZipFile(empty, 'w').close()
    got = read_central_directory(empty)
    assert len(got['offsets']) == 0 and _names(got) == [] and got['methods'].dtype == np.int8
    with pytest.raises(FileNotFoundError, match=f'^zip file not found: {re.escape(str(tmp_path / "none.zip"))}$'):
        read_central_directory(tmp_path / 'none.zip')
    (tmp_path / 'zero.zip').write_bytes(b'')
    with pytest.raises(CacheError, match=f'^{re.escape(str(tmp_path / "zero.zip"))}: empty file$'):
        read_central_directory(tmp_path / 'zero.zip')
    (tmp_path / 'one.zip').write_bytes(b'P')
    with pytest.raises(CacheError, match=f'^{re.escape(str(tmp_path / "one.zip"))}: not a readable zip file'):
        read_central_directory(tmp_path / 'one.zip')


def test_central_directory_entries_that_point_outside_the_file_are_named(tmp_path):
    """A central record whose local-header offset or size points past the file or at something else: one line
    naming the zip and the member (a zip cut short, or overwritten)."""
    from data.zip_index import read_central_directory
    good = tmp_path / 'good.zip'
    with zipfile.ZipFile(good, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('n0/a.jpg', _jpeg(0, 0))
        zf.writestr('n0/b.jpg', _jpeg(0, 1))
    raw = good.read_bytes()
    second = raw.find(b'PK\x01\x02', raw.find(b'PK\x01\x02') + 4)  # b.jpg's central record

    def edited(name, offset, fmt, value):
        data = bytearray(raw)
        struct.pack_into(fmt, data, second + offset, value)
        (tmp_path / name).write_bytes(bytes(data))
        return tmp_path / name
    cases = [(edited('past.zip', 42, '<I', len(raw) - 10), r'past\.zip: a member header lies past the end of the '
                                                           r'file \(truncated zip\)$'),
             (edited('moved.zip', 42, '<I', 3), r'moved\.zip@/n0/b\.jpg: bad local header \(corrupt zip\)$'),
             (edited('long.zip', 20, '<I', len(raw)), r'long\.zip@/n0/b\.jpg: member runs past the end of the file '
                                                     r'\(truncated\)$')]
    for path, message in cases:
        with pytest.raises(CacheError, match=message):
            read_central_directory(path)
    data = bytearray(raw)
    struct.pack_into('<HH', data, raw.rfind(b'PK\x05\x06') + 8, 5, 5)  # the end record claims 5 members
    (tmp_path / 'claims.zip').write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r'claims\.zip: central directory too short for 5 records \(corrupt zip\)$'):
        read_central_directory(tmp_path / 'claims.zip')
    for k in range(4):  # each byte of the local signature is checked
        data = bytearray(raw)
        data[struct.unpack_from('<I', raw, second + 42)[0] + k] ^= 0xFF
        (tmp_path / f'sig{k}.zip').write_bytes(bytes(data))
        with pytest.raises(CacheError, match=rf'sig{k}\.zip@/n0/b\.jpg: bad local header'):
            read_central_directory(tmp_path / f'sig{k}.zip')


def test_directory_entries_are_dropped_with_their_names(tmp_path):
    """`zip -r train.zip train` (the official README's command) stores a record per folder."""
    from data.zip_index import read_central_directory
    zp = tmp_path / 'train.zip'
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_STORED) as zf:
        for name in ('train/', 'train/n0/', 'train/n0/a.jpg', 'train/n0/b.jpg', 'train/n1/', 'train/n1/c.jpg'):
            zf.writestr(name, b'' if name.endswith('/') else _jpeg(0, len(name)))
    table = read_central_directory(zp)
    assert _names(table) == ['train/n0/a.jpg', 'train/n0/b.jpg', 'train/n1/c.jpg']
    with zipfile.ZipFile(zp) as zf:
        assert [zf.getinfo(n).file_size for n in _names(table)] == table['sizes'].tolist()


# ---------------------------------------------------------------- label checks, defaults and edge cases users rely on
def test_check_labels_names_what_is_wrong(tmp_path):
    with pytest.raises(CacheError, match=r'^m.txt: labels must cover 0..12; missing \[1, 2, 3, 4, 5, 6, 7, 8, 9, '
                                         r'10\] ...$'):
        check_labels([('a/x', 0), ('b/y', 12)], 'm.txt', False)  # 11 missing: the first 10 and "..."
    with pytest.raises(CacheError, match=r'^m.txt: labels must cover 0..11; missing \[1, 2, 3, 4, 5, 6, 7, 8, 9, '
                                         r'10\]$'):
        check_labels([('a/x', 0), ('b/y', 11)], 'm.txt', False)  # exactly 10 missing: no "..."
    with pytest.raises(CacheError, match="^m.txt: entry 'x.jpg' has no class folder$"):
        check_labels([('x.jpg', 0)], 'm.txt', True)
    with pytest.raises(CacheError, match="^m.txt: class folder 'a' has labels 0 and 1$"):
        check_labels([('a/x', 0), ('a/y', 1)], 'm.txt', True)
    # sub-folders of a class folder belong to it (ImageFolder's rule: the first path component is the class)
    assert check_labels([('a/x.jpg', 0), ('a/sub/y.jpg', 0), ('b/deep/er/z.jpg', 1)], 'm.txt', True) == 2
    assert check_labels([('x.jpg', 1), ('y.jpg', 0)], 'm.txt', False) == 2


def test_map_member_missing_from_a_reordered_zip_names_the_line_and_prefix_hint(tmp_path):
    zp, mp_ = _zip_with(tmp_path, {'a/y.jpg': _jpeg(0, 1), 'a/x.jpg': _jpeg()}, 'a/x.jpg\t0\na/y.jpg\t0\n')
    ds = ZipImageDataset(zp, mp_, cache_mode='no')  # zip order differs from the map: rows are looked up
    assert ds.rows.tolist() == [1, 0] and ds.rows.dtype == np.int64
    assert ds.sample_name(0) == 'train.zip@/a/x.jpg'
    (tmp_path / 'train_map.txt').write_text('a/x.jpg\t0\na/z.jpg\t0\n')
    with pytest.raises(CacheError, match=f"line 2 names member 'a/z.jpg', which is not in {zp}$"):
        ZipImageDataset(zp, mp_)
    for prefix in ('train/', 'val/'):  # a zip built one folder too high gets a hint naming the prefix
        (tmp_path / prefix).mkdir()
        zp2, mp2 = _zip_with(tmp_path / prefix, {f'{prefix}a/x.jpg': _jpeg()}, 'a/x.jpg\t0\n')
        with pytest.raises(CacheError, match=f"the zip has '{prefix}a/x.jpg': it was built from the folder "
                                             f"above '{prefix}'"):
            ZipImageDataset(zp2, mp2)


def _split_tree(tmp_path, val_members: dict, val_map: str):
    """root/train.zip (+map, class folders a, b) and root/val.zip with the given members and map."""
    _two_classes(tmp_path)
    _zip_with(tmp_path, val_members, val_map, split='val')
    return tmp_path


def test_from_folder_defaults_folder_labels_train_map_and_rank(tmp_path, monkeypatch):
    import deit.distributed
    root = _split_tree(tmp_path, {'v1.jpg': _jpeg(0), 'v2.jpg': _jpeg(1)}, 'v1.jpg\t0\nv2.jpg\t1\n')
    val = ZipImageDataset.from_folder(root, 'val')  # flat val names are fine; full cache, no skipping
    assert val.cache_mode == 'full' and val.skip_bad is False and val.pop_skipped() == 0
    assert val.targets.tolist() == [0, 1] and val.shard is None
    (root / 'train_map.txt').rename(root / 'train_map.bak')
    assert len(ZipImageDataset.from_folder(root, 'val', cache_mode='no')) == 2  # no train map: nothing to check
    (root / 'train_map.bak').rename(root / 'train_map.txt')
    # the train split needs class folders; val members in class folders must carry their train label
    (tmp_path / 'flat').mkdir()
    flat, _ = _zip_with(tmp_path / 'flat', {'x.jpg': _jpeg(0), 'y.jpg': _jpeg(1)}, 'x.jpg\t0\ny.jpg\t1\n')
    flat = flat.parent
    with pytest.raises(CacheError, match="entry 'x.jpg' has no class folder"):
        ZipImageDataset.from_folder(flat, 'train')
    _split_tree(root, {'b/v.jpg': _jpeg(1)}, 'b/v.jpg\t0\n')
    with pytest.raises(CacheError, match=r"val_map.txt:1: 'b/v.jpg' has label 0, but class folder 'b' is label 1"):
        ZipImageDataset.from_folder(root, 'val')
    # 'part': this rank's shard; the trainer gives the process group's rank and world size
    assert ZipImageDataset.from_folder(root, 'train', cache_mode='part', rank=1, world_size=2).shard.tolist() == [1]
    assert ZipImageDataset.from_folder(root, 'train', cache_mode='part').shard.tolist() == [0, 1]
    from deit.datasets import build_dataset
    monkeypatch.setattr(deit.distributed, 'get_rank', lambda: 1)
    monkeypatch.setattr(deit.distributed, 'get_world_size', lambda: 2)
    args = Namespace(data_set='IMNET', data_path=str(root), cache=True, cache_mode='part', skip_bad_images=False)
    assert build_dataset(True, args, transform=lambda x: x)[0].shard.tolist() == [1]


def test_skips_are_counted_across_calls_and_lazy_transforms_get_an_undecoded_jpeg(tmp_path):
    bad = _jpeg(1)[:200]
    zp, mp_ = _zip_with(tmp_path, {'a/b1.jpg': bad, 'a/b2.jpg': bad, 'a/ok.jpg': _jpeg()},
                        'a/b1.jpg\t0\na/b2.jpg\t0\na/ok.jpg\t0\n')
    ds = ZipImageDataset(zp, mp_, skip_bad=True, cache_mode='no')
    assert ds[0] is None and ds[1] is None and ds.pop_skipped() == 2
    assert not isinstance(ds.load(2), LazyJpeg)

    class Lazy:
        decodes_lazily = True

        def __call__(self, img):
            return img
    ds.transform = Lazy()
    assert isinstance(ds.load(2), LazyJpeg) and ds[2][0].header.size == (32, 32)


def test_collate_skip_bad_keeps_even_batches_and_empty_batches_typed():
    x = (torch.zeros(2), 1)
    assert len(collate_skip_bad([x, None, x, None])[1]) == 2  # 2 left: already even
    assert len(collate_skip_bad([x, None, x, x])[1]) == 2  # 3 left: trimmed for Mixup's pairs
    assert len(collate_skip_bad([x, None, x, x], keep_even=False)[1]) == 3  # evaluation keeps every image
    assert len(collate_skip_bad([x, None, x])[1]) == 2  # odd batch (the last one): nothing to pair
    images, labels = collate_skip_bad([None, None])
    assert images.shape == (0,) and labels.shape == (0,) and labels.dtype == torch.long


def test_shard_sampler_seed_epoch_and_padding():
    shard = np.arange(3, 20, 2)
    assert list(ShardSampler(shard)) == list(ShardSampler(shard, seed=0))
    later = ShardSampler(shard, seed=0)
    later.set_epoch(1)
    assert list(later) == list(ShardSampler(shard, seed=1))  # the order is drawn from seed + epoch
    with pytest.raises(ValueError, match='^shard of 9 samples cannot yield 5$'):
        ShardSampler(shard, num_samples=5)
    with pytest.raises(ValueError, match='^shard of 0 samples cannot yield 2$'):
        ShardSampler(np.arange(0), num_samples=2)
    assert list(ShardSampler(np.arange(0), num_samples=0)) == []

    class Part:  # a part-cached dataset of 17 samples on 2 ranks: each rank yields ceil(17 / 2)
        shard = np.arange(1, 17, 2)

        def __len__(self):
            return 17
    s = ShardSampler.for_dataset(Part(), world_size=2, seed=4)
    assert len(s) == 9 and list(s) == list(ShardSampler(Part.shard, 4, num_samples=9))
    assert list(ShardSampler.for_dataset(Part(), world_size=2)) == list(ShardSampler(Part.shard, 0, num_samples=9))


@pytest.fixture
def ascii_locale():
    """The locale of a node started with LANG=C and PYTHONCOERCECLOCALE=0: open() defaults to ASCII there."""
    import locale
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, 'C')
    yield
    locale.setlocale(locale.LC_CTYPE, before)


def test_map_files_are_utf8_whatever_the_locale(tmp_path, ascii_locale):
    entries = [('zebra/sub dir/bild_ß_é.jpg', 0), ('ünïcode_klasse/画像.JPEG', 1)]
    write_map_file(tmp_path / 'm.txt', entries)
    assert (tmp_path / 'm.txt').read_bytes() == ''.join(f'{n}\t{lab}\n' for n, lab in entries).encode('utf-8')
    assert parse_map_file(tmp_path / 'm.txt') == entries


def test_map_file_separators_line_ends_and_exact_errors(tmp_path):
    m = tmp_path / 'm.txt'
    # tab or one space separates; names keep their spaces (inside and at the end); CRLF files read the same
    m.write_bytes(b'a/x y.jpg 3\r\na/tab name.jpg\t1\nb/end \t2\na/x  4\n')
    assert parse_map_file(m) == [('a/x y.jpg', 3), ('a/tab name.jpg', 1), ('b/end ', 2), ('a/x ', 4)]
    for text, msg in ((b'a/BOX\r\n', "m.txt:1: expected \"<member>\\t<label>\", got 'a/BOX'"),
                      (b'a/x.jpg\t0\na/x.jpg\t\n', "m.txt:2: label '' is not an integer"),
                      (b'a/x.jpg\t-1\n', 'm.txt:1: negative label -1'), (b'', 'm.txt: no entries')):
        m.write_bytes(text)
        with pytest.raises(CacheError) as e:
            parse_map_file(m)
        assert str(e.value) == f'{tmp_path}/{msg}'
    with pytest.raises(FileNotFoundError, match=f'^map file not found: {tmp_path}/none.txt$'):
        parse_map_file(tmp_path / 'none.txt')
    for bad in ('a/tab\there.jpg', 'a/new\nline.jpg'):
        with pytest.raises(CacheError, match=f'^member name {bad!r} contains a tab or newline; cannot be '
                                             f'written to a map file$'.replace('\\', '\\\\')):
            write_map_file(tmp_path / 'out.txt', [('a/ok.jpg', 0), (bad, 0)])
        assert not (tmp_path / 'out.txt').exists()  # nothing half-written


def test_split_labels_follow_the_train_class_folders(tmp_path):
    assert [class_folder(n) for n in ('a/x.jpg', 'a/b/c.jpg', 'x.jpg', '/x.jpg')] == ['a', 'a', None, '']
    write_map_file(tmp_path / 'train_map.txt', [('n01/a.jpg', 0), ('n01/deep/b.jpg', 0), ('n02/c.jpg', 1)])
    index = train_class_index(tmp_path / 'train_map.txt')
    assert index == {'n01': 0, 'n02': 1}
    check_split_labels([('n01/v/1.jpg', 0), ('flat.jpg', 1)], index, 'val_map.txt')
    for entries, msg in (([('n03/v.jpg', 0)], "val_map.txt:1: class folder 'n03' of 'n03/v.jpg' is not a train class"),
                         ([('ok.jpg', 0), ('flat.jpg', 2)], 'val_map.txt:2: label 2 outside the 2 train classes'),
                         ([('flat.jpg', -1)], 'val_map.txt:1: label -1 outside the 2 train classes')):
        with pytest.raises(CacheError) as e:
            check_split_labels(entries, index, 'val_map.txt')
        assert str(e.value) == msg


MAPS = {  # map text -> class folders required (train) or not (val)
    b'a/x\t0\nb/y\t1\n': True, b'a/x\t0\nb/y\t1': True, b'a/s p/x\t0\nb/y\t1\na/z\t0\n': True,
    b'x\t1\ny\t0\n': False,
    b'': True, b'a/x\t0\r\nb/y\t1\r\n': True, b'a/x 0\nb/y\t1\n': True, b'a/x\t0\t1\n': True,
    b'a/x\t0\n\nb/y\t1\n': True, b'\t0\n': False, b'a/x\tzero\n': True, b'a/x\t-1\n': True,
    b'a/x\t0\nb/y\t2\n': True, b'a/x\t0\na/y\t1\n': True, b'a/x\t0\nb/y\t0\n': True, b'x\t0\n': True,
    b'x\t0\nb/y\t1\n': True, b'a/x\t0\n\t1\n': True, b'a/x\ry\t0\n': True,
}


@pytest.mark.parametrize('text', list(MAPS))
def test_map_fast_path_takes_every_regular_map_and_agrees_with_the_exact_parser(text, tmp_path):
    """Opening a 1.28M-line map parses it in whole-file passes (_map_arrays, _labels_ok); anything irregular
    falls back to parse_map_file / check_labels, which name the line. The fast path must give the exact
    parser's result, accept every map the exact checks accept, and never accept one they refuse."""
    folder_labels = MAPS[text]
    m = tmp_path / 'm.txt'
    m.write_bytes(text)
    try:
        entries = parse_map_file(m)
    except CacheError:
        entries = None
    fast = _map_arrays(m)
    if entries is None:
        assert fast is None
        return
    tab_lf = all(re.fullmatch(rb'[^\t]*\t\d+', line) for line in text.split(b'\n') if line)
    assert (fast is not None) == tab_lf, 'every tab-separated LF map takes the fast path (others need not)'
    if fast is None:
        return
    names, labels = fast
    assert names == ''.join(f'{n}\n' for n, _ in entries).encode() and labels.tolist() == [lab for _, lab in entries]
    assert labels.dtype == np.int64
    try:
        check_labels(entries, 'm.txt', folder_labels)
        exact_ok = True
    except CacheError:
        exact_ok = False
    assert _labels_ok(names, labels, folder_labels) == exact_ok


def test_dataset_defaults_one_process_and_refuses_unknown_cache_modes(tmp_path):
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg(), 'a/y.jpg': _jpeg(0, 1), 'b/z.jpg': _jpeg(1)},
                        'a/x.jpg\t0\na/y.jpg\t0\nb/z.jpg\t1\n')
    assert ZipImageDataset(zp, mp_, cache_mode='part').shard.tolist() == [0, 1, 2]  # rank 0 of 1
    with pytest.raises(ValueError, match="^cache_mode must be 'full', 'part' or 'no', got 'all'$"):
        ZipImageDataset(zp, mp_, cache_mode='all')


class _Pages:
    """Stands in for the zip's mmap: records what warm() touches."""

    def __init__(self, size):
        self.size, self.calls = size, []

    def __len__(self):
        return self.size

    def __getitem__(self, s):
        self.calls.append((s.start, s.stop))
        return b''

    def madvise(self, flag):
        self.calls.append(('madvise', flag))


def test_warm_hands_the_file_to_readahead_or_reads_it_in_chunks_and_members_without_crc(tmp_path, monkeypatch):
    zp, mp_ = _two_classes(tmp_path)
    index = ZipImageDataset(zp, mp_, cache_mode='no').index
    index._mm = pages = _Pages(25)
    index.warm()
    assert pages.calls == [('madvise', mmap.MADV_WILLNEED)]
    pages.calls.clear()
    monkeypatch.delattr(mmap, 'MADV_WILLNEED')  # a platform without it (macOS before 3.8's constant, Windows)
    index.warm(chunk=10)
    assert pages.calls == [(0, 10), (10, 20), (20, 30)]
    reads = []
    monkeypatch.setattr(index, 'read', lambda k, check_crc=True: reads.append((k, check_crc)))
    index.warm(np.array([1, 0]))  # part mode: only this rank's members, read once without the CRC work
    assert reads == [(1, False), (0, False)]


def test_index_travels_by_file_and_maps_it_once_per_worker(tmp_path, monkeypatch):
    zp, mp_ = _two_classes(tmp_path)
    index = ZipImageDataset(zp, mp_, cache_mode='no').index
    clone = pickle.loads(pickle.dumps(index))
    assert clone.__dict__['_arrays'] is None and clone.__dict__['_mm'] is None  # arrays stay in the .idx file
    calls = []
    real = zc.read_index
    monkeypatch.setattr(zc, 'read_index', lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    assert clone.labels.tolist() == [0, 1] and clone.offsets.tolist() == index.offsets.tolist() and len(clone) == 2
    assert calls == [{'check_inputs': False}]  # mapped once, on first use
    assert not hasattr(clone, 'no_such_array')
    with pytest.raises(AttributeError, match='^no_such_array$'):
        clone.no_such_array
    memory = zc.ZipIndex(zp, {k: np.asarray(getattr(index, k)) for k in ('offsets', 'labels')}, None)
    assert pickle.loads(pickle.dumps(memory)).labels.tolist() == [0, 1]  # no file: the arrays travel


def test_cache_modes_warm_what_they_promise(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(zc.ZipIndex, 'warm', lambda self, members=None: calls.append(
        None if members is None else members.tolist()))
    zp, mp_ = _zip_with(tmp_path, {'b/y.jpg': _jpeg(1), 'a/x.jpg': _jpeg()}, 'a/x.jpg\t0\nb/y.jpg\t1\n')
    ZipImageDataset(zp, mp_)  # full: the whole file
    ZipImageDataset(zp, mp_, cache_mode='part', rank=1, world_size=2)  # this rank's samples' members only
    ZipImageDataset(zp, mp_, cache_mode='no')  # nothing ahead of time
    assert calls == [None, [0]]  # map entry 1 (b/y.jpg) is member 0 of the zip


def test_missing_zip_or_map_is_named(tmp_path):
    zp, mp_ = _zip_with(tmp_path, {'a/x.jpg': _jpeg()}, 'a/x.jpg\t0\n')
    with pytest.raises(FileNotFoundError, match=f'^zip file not found: {tmp_path}/val.zip$'):
        ZipImageDataset(tmp_path / 'val.zip', mp_)
    with pytest.raises(FileNotFoundError, match=f'^map file not found: {tmp_path}/val_map.txt$'):
        ZipImageDataset(zp, tmp_path / 'val_map.txt')


def test_reopened_index_is_mapped_once_and_travels_by_file(tmp_path, monkeypatch):
    zp, mp_ = _two_classes(tmp_path)
    zc.open_index(zp, mp_, folder_labels=True)  # writes train.zip.idx
    monkeypatch.setattr(zc, 'parse_map_file', lambda *a: pytest.fail('a regular map takes the whole-file path'))
    (tmp_path / 'train.zip.idx').unlink()
    zc.open_index(zp, mp_, folder_labels=True)  # made again, without the line-by-line parser
    again = zc.open_index(zp, mp_, folder_labels=True)  # reused
    assert again.index_path == tmp_path / 'train.zip.idx'
    assert pickle.loads(pickle.dumps(again)).__dict__['_arrays'] is None  # workers map the file, no copy


def test_irregular_maps_open_through_the_exact_parser(tmp_path):
    zp, mp_ = _zip_with(tmp_path, {'b/y z.jpg': _jpeg(1), 'a/x.jpg': _jpeg()}, '')
    mp_.write_bytes(b'a/x.jpg 0\r\nb/y z.jpg\t1\r\n')  # CRLF, one space-separated line
    index = open_index(zp, mp_, folder_labels=True)
    assert index.labels.tolist() == [0, 1] and index.rows.tolist() == [1, 0]
    assert [index.member_name(int(k)) for k in index.rows] == ['a/x.jpg', 'b/y z.jpg']
    mp_.write_bytes(b'a/x.jpg\t0\r\nb/y z.jpg\t2\r\n')
    with pytest.raises(CacheError, match=f'^{mp_}: labels must cover 0..2; missing \\[1\\]$'):
        open_index(zp, mp_, folder_labels=True)


def test_val_index_is_checked_again_when_the_train_map_changes(tmp_path):
    root = _split_tree(tmp_path, {'a/s p/v.jpg': _jpeg(0), 'b/w.jpg': _jpeg(1)}, 'a/s p/v.jpg\t0\nb/w.jpg\t1\n')
    open_index(root / 'val.zip', root / 'val_map.txt', False, root / 'train_map.txt')  # names with spaces: fine
    (root / 'train_map.txt').write_text('a/x.jpg\t1\nb/y.jpg\t0\n')  # the train labels were swapped since
    with pytest.raises(CacheError, match="val_map.txt:1: 'a/s p/v.jpg' has label 0, but class folder 'a' is "
                                         "label 1 in train"):
        open_index(root / 'val.zip', root / 'val_map.txt', False, root / 'train_map.txt')


def test_an_index_of_another_zip_is_named_as_such_not_as_corrupt_bytes(tmp_path):
    from data.zip_cache import ZipImageDataset
    from data.zip_index import CacheError
    from data.zip_index import read_index, write_index
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir(), b.mkdir()
    za, ma = _zip_with(a, {'a/x.jpg': _jpeg(0), 'b/y.jpg': _jpeg(1)}, 'a/x.jpg\t0\nb/y.jpg\t1\n')
    zb, mb = _zip_with(b, {'a/x.jpg': _jpeg(2, 5) + b'pad' * 40, 'b/y.jpg': _jpeg(3, 6)}, 'a/x.jpg\t0\nb/y.jpg\t1\n')
    ZipImageDataset(za, ma), ZipImageDataset(zb, mb)  # both indexes written
    idx_a = za.with_name('train.zip.idx')
    header = json.loads(idx_a.read_bytes()[22:22 + int.from_bytes(idx_a.read_bytes()[14:22], 'little')])
    foreign = read_index(zb.with_name('train.zip.idx'), None, check_inputs=False)
    write_index(idx_a, header['inputs'], {k: np.array(v) for k, v in foreign.items()})  # forged: a's signature
    for skip_bad in (False, True):  # a wrong index is no bad image to skip
        ds = ZipImageDataset(za, ma, skip_bad=skip_bad)
        with pytest.raises(CacheError, match=r'train\.zip\.idx does not belong to .*a/train\.zip: its member '
                                             r'table differs .* delete it and it is made again'):
            ds[0]
    idx_a.unlink()
    raw = bytearray(za.read_bytes())  # a genuinely flipped byte inside a member is still called corruption
    raw[60] ^= 0xFF
    za.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match='CRC-32 mismatch'):
        ZipImageDataset(za, ma)[0]


# ------------------------------------------------------------------------------------------------------------
# corrupt or unusual zips and names; a zip truncated while a reader maps it
# ------------------------------------------------------------------------------------------------------------
def test_a_corrupt_central_directory_record_is_the_error_not_a_buffer_error(tmp_path):
    from data.zip_index import read_central_directory
    zp, _ = _two_classes(tmp_path)
    raw = bytearray(zp.read_bytes())
    cd = raw.rindex(b'PK\x01\x02')  # the last member's central record loses its signature
    raw[cd + 3] = 9
    zp.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=rf'{zp}: corrupt central directory at byte \d+'):
        read_central_directory(zp)  # (raised where a view of the map is alive: closing it failed instead)


def test_a_member_name_that_is_not_utf8_despite_its_flag_is_named(tmp_path, capsys):
    from data.build_zip_cache import main as build_main
    zp, mp_ = _zip_with(tmp_path, {'a/caf\u00e9.jpg': _jpeg(0), 'b/y.jpg': _jpeg(1)},
                        'a/caf\u00e9.jpg\t0\nb/y.jpg\t1\n')
    zp.write_bytes(zp.read_bytes().replace('\u00e9'.encode(), b'\xc3\x28'))  # flag set, bytes not UTF-8
    with pytest.raises(CacheError, match=r"member 1 of the central directory: its name b'a/caf\\xc3\(\.jpg' is "
                                         r"not UTF-8 though its UTF-8 flag is set"):
        ZipImageDataset(zp, mp_)
    (tmp_path / 'val.zip').write_bytes(zp.read_bytes())
    (tmp_path / 'val_map.txt').write_bytes(mp_.read_bytes())
    assert build_main(['--verify', '--dst', str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'is not UTF-8 though its UTF-8 flag is set' in err


def test_a_latin1_source_file_name_is_named_by_the_builder(tmp_path, capsys):
    from data.build_zip_cache import main as build_main
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (tmp_path / 'src' / split / c).mkdir(parents=True)
            make_image(0, 0).save(tmp_path / 'src' / split / c / '0.jpg')
    bad = os.path.join(os.fsencode(tmp_path / 'src' / 'train' / 'a'), b'caf\xe9.jpg')  # Latin-1 bytes on disk
    with open(bad, 'wb') as f:
        f.write(_jpeg(0))
    assert build_main(['--src', str(tmp_path / 'src'), '--dst', str(tmp_path / 'cache')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file name is not valid UTF-8 (b'" in err and 'caf\\xe9.jpg' in err
    assert not (tmp_path / 'cache' / 'train.zip').exists()


def test_a_zip_truncated_under_a_running_reader_stops_it_with_one_line(tmp_path):
    """A child maps the zip and reads; the zip is cut in place meanwhile; its next read must not die of
    SIGBUS (exit -7, no message) but raise an error naming the zip."""
    zp, mp_ = _zip_with(tmp_path, {f'a/{i}.jpg': _jpeg(0, i) for i in range(8)},
                        ''.join(f'a/{i}.jpg\t0\n' for i in range(8)))
    ZipImageDataset(zp, mp_)  # index stored
    code = ('import sys; from data.zip_cache import ZipImageDataset\n'
            f'ds = ZipImageDataset({str(zp)!r}, {str(mp_)!r})\n'
            'ds.index.read(0); print("ready", flush=True); sys.stdin.readline()\n'
            'try:\n    ds.index.read(7)\nexcept Exception as e:\n    print(type(e).__name__, e, flush=True)\n')
    child = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == 'ready'
    with open(zp, 'r+b') as f:  # cut in place (what a second `build_zip_cache` or a full copy-over does)
        f.truncate(zp.stat().st_size // 3)
    out, err = child.communicate('go\n', timeout=60)
    assert child.returncode == 0, (child.returncode, err)
    assert out.startswith(f'CacheError {zp}: the file shrank to ') and "member 'a/7.jpg'" in out


def test_the_cache_builder_command_line(tmp_path, capsys):
    src = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=3, n_val=2, size=40)
    dst = tmp_path / 'cache'
    assert build_main(['--src', str(src), '--dst', str(dst), '--max-size', '32', '--quality', '80']) == 0
    printed = capsys.readouterr()
    assert printed.out.endswith(f'wrote {dst}: 2 classes, 6 train, 4 val images\n')
    assert 'train.zip: 100%' in printed.err and '| 6/6 [' in printed.err and 'img/s]' in printed.err  # progress
    assert build_main(['--src', str(src), '--dst', str(tmp_path / 'again'), '--max-size', '32', '--quality', '80']) == 0
    for name in ('train.zip', 'val.zip', 'train_map.txt', 'val_map.txt'):  # a build is reproducible byte for byte
        assert (tmp_path / 'again' / name).read_bytes() == (dst / name).read_bytes(), name
    with zipfile.ZipFile(dst / 'train.zip') as z:
        assert {max(Image.open(io.BytesIO(z.read(n))).size) for n in z.namelist()} == {32}
        assert {i.external_attr >> 16 for i in z.infolist()} == {0o644}  # rw-r--r-- when unzipped
    assert build_main(['--dst', str(dst), '--verify', '--max-size', '1', '--quality', '1']) == 0  # the edges
    assert build_main(['--dst', str(dst), '--verify', '--quality', '100']) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-1] == 'verify: 0 bad member(s)'
    assert 'verify train: 100%' in printed.err and 'verify val: 100%' in printed.err  # the progress bars name the split
    for bad, got in ((['--max-size', '0'], '0, 90'), (['--quality', '0'], 'None, 0'),
                     (['--quality', '101'], 'None, 101'),
                     (['--max-size', '0', '--quality', '50'], '0, 50')):
        with pytest.raises(SystemExit) as e:
            build_main(['--dst', str(dst), '--verify', *bad])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f'error: --max-size must be >= 1 and --quality within 1..100 (got {got})')
    for argv, message in (([], 'the following arguments are required: --dst'),
                          (['--dst', str(dst)], 'give --src to build, or --verify to check an existing cache')):
        with pytest.raises(SystemExit) as e:
            build_main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(f'error: {message}')
    (tmp_path / 'a_file').write_text('')  # --dst names a file: refused before the tree is read
    assert build_main(['--src', str(src), '--dst', str(tmp_path / 'a_file')]) == 2
    assert capsys.readouterr().err == f'error: {tmp_path / "a_file"}: cannot write there (Not a directory)\n'


def test_a_tree_without_classes_or_images_is_named(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'notes.txt').write_text('')
    with pytest.raises(CacheError) as e:
        scan_class_folders(tmp_path / 'train')
    assert str(e.value) == f'{tmp_path / "train"}: no class folders'
    (tmp_path / 'train' / 'b').mkdir()
    make_image(0, 0).save(tmp_path / 'train' / 'b' / '0.jpg')
    (tmp_path / 'train' / 'a').mkdir()  # the first class, empty
    with pytest.raises(CacheError) as e:
        scan_class_folders(tmp_path / 'train')
    assert str(e.value) == f'{tmp_path / "train" / "a"}: class folder without images'


def test_build_with_the_official_train_map_and_val_class_folders(tmp_path, capsys):
    """--train-map: the release's class numbering (here not the folders' alphabetical order) labels val's class
    folders too; the cache folder is made with its parents; the val index is made against train_map.txt, so the
    trainer opens it as built."""
    src = make_imagefolder(tmp_path / 'src', n_classes=3, n_train=2, n_val=1, names=['apple', 'kiwi', 'pear'])
    numbering = {'pear': 0, 'apple': 1, 'kiwi': 2}
    (tmp_path / 'train_map.txt').write_text(''.join(f'{c}/{i:03d}.jpg\t{k}\n' for c, k in numbering.items()
                                                    for i in range(2)))
    dst = tmp_path / 'not' / 'yet' / 'cache'
    assert build(src, dst, train_map=tmp_path / 'train_map.txt') == {'classes': 3, 'train': 6, 'val': 3}
    assert parse_map_file(dst / 'val_map.txt') == [('apple/000.jpg', 1), ('kiwi/000.jpg', 2), ('pear/000.jpg', 0)]
    capsys.readouterr()
    val = ZipImageDataset.from_folder(dst, 'val')
    assert len(val) == 3 and 'making it again' not in capsys.readouterr().out  # the index built is the one used
    (src / 'val' / 'plum').mkdir()
    make_image(0, 0).save(src / 'val' / 'plum' / '000.jpg')
    with pytest.raises(CacheError) as e:
        build(src, tmp_path / 'c2', train_map=tmp_path / 'train_map.txt')
    assert str(e.value) == f"{src / 'val'}: class folders ['plum'] are not classes of {tmp_path / 'train_map.txt'}"
    with pytest.raises(CacheError) as e:  # without a train map, train/ names the classes
        build(src, tmp_path / 'c3')
    assert str(e.value) == f"{src / 'val'}: class folders differ from train/ (['plum'] ...)"
    with pytest.raises(CacheError) as e:
        build(src, tmp_path / 'c4', val_labels=tmp_path / 'labels.txt', val_map=tmp_path / 'val_map.txt')
    assert str(e.value) == 'give --val-map (official map) or --val-labels, not both'
    assert not any((tmp_path / c).exists() for c in ('c2', 'c3', 'c4'))  # refused before anything is written
