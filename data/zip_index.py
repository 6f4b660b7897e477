"""The member table of a ZIP cache, without a Python object per member.

``read_central_directory`` parses the central directory in vectorised passes over the mmap-ed file (record
starts, sizes, CRCs, local-header offsets; ZIP64 extra fields for the few records that need them), instead
of the ``ZipInfo`` per member that ``zipfile`` builds: ImageNet's 1.28 M members open in seconds.

``write_index`` / ``read_index`` store such arrays next to the zip (``train.zip.idx``) in a small container:
a JSON header that names the files the index was made from (size, mtime, and the zip's end-of-central-
directory bytes; a mismatch means stale) and 64-byte-aligned raw arrays, opened with ``np.memmap`` so every
rank and DataLoader worker on a node shares one copy in the page cache.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from data.io import atomic_open

INDEX_MAGIC = b'MAXSUP-ZIPIDX\n'
INDEX_VERSION = 1
EOCD = struct.Struct('<4sHHHHIIH')            # end of central directory, 22 bytes
EOCD64_LOCATOR = struct.Struct('<4sIQI')       # 20 bytes, just before EOCD
EOCD64 = struct.Struct('<4sQHHIIQQQQ')         # ZIP64 end of central directory record, 56 bytes
CD_SIZE, LOCAL_SIZE = 46, 30                   # fixed parts of central / local headers
U16, U32 = 0xFFFF, 0xFFFFFFFF


class CacheError(ValueError):
    """A problem with a cache file (zip, map or index); the message names the file and line or member."""


def _u(a: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """Little-endian unsigned ints of ``width`` bytes at byte positions ``pos`` of uint8 array ``a``."""
    out = np.zeros(len(pos), np.uint64)
    for b in range(width):
        out |= a[pos + b].astype(np.uint64) << np.uint64(8 * b)
    return out


def _end_records(mm, path: Path) -> tuple[int, int, int, int, bytes]:
    """(entries, central directory size, its absolute offset, bytes prepended to the archive, the end
    records' bytes) - ZIP64 aware."""
    tail_start = max(0, len(mm) - (EOCD.size + 65535))
    pos = mm.rfind(b'PK\x05\x06', tail_start)
    if pos < 0:
        raise CacheError(f'{path}: not a readable zip file (no end-of-central-directory record)')
    _, _, _, _, entries, cd_size, cd_offset, _ = EOCD.unpack_from(mm, pos)
    eocd = bytes(mm[pos:pos + EOCD.size])
    end_of_cd = pos
    # A ZIP64 end record, when its locator precedes the end record, holds the values (zipfile writes one as soon
    # as the directory starts past 2 GiB, with the plain record's fields still exact). It sits where the locator
    # says, or, in an archive with bytes prepended, right before the locator (zipfile's rule).
    locator = pos - EOCD64_LOCATOR.size
    sig, _, rec64, _ = EOCD64_LOCATOR.unpack_from(mm, locator) if locator >= 0 else (b'', 0, 0, 0)
    if sig == b'PK\x06\x07':
        before = locator - EOCD64.size
        at = next((r for r in (rec64, before) if 0 <= r <= len(mm) - EOCD64.size and mm[r:r + 4] == b'PK\x06\x06'),
                  None)
        if at is None:
            raise CacheError(f'{path}: bad ZIP64 end record')
        _, _, _, _, _, _, _, entries, cd_size, cd_offset = EOCD64.unpack_from(mm, at)
        end_of_cd = at
        eocd += bytes(mm[at:at + EOCD64.size])
    concat = end_of_cd - cd_size - cd_offset  # bytes prepended to the archive (zipfile allows it too)
    if concat < 0:
        raise CacheError(f'{path}: central directory runs past its end record (truncated or corrupt zip)')
    return int(entries), int(cd_size), int(cd_offset + concat), int(concat), eocd


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF fields by the ZIP64 extra field's 64-bit values (in the spec's order)."""
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from('<HH', extra, i)
        if tag == 1:
            vals, j = [], i + 4
            for v in (usize, csize, offset):
                if v == U32:
                    vals.append(struct.unpack_from('<Q', extra, j)[0])
                    j += 8
                else:
                    vals.append(v)
            return tuple(vals)
        i += 4 + ln
    return usize, csize, offset


def read_central_directory(path: str | os.PathLike) -> dict:
    """Arrays (offsets of the member data, sizes, methods, crcs) and the names of a zip's file members."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'zip file not found: {path}')
    if path.stat().st_size == 0:
        raise CacheError(f'{path}: empty file')
    with open(path, 'rb') as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = cd = None
    try:
        n, cd_size, cd_off, concat, eocd = _end_records(mm, path)
        buf = np.frombuffer(mm, np.uint8)
        cd = buf[cd_off:cd_off + cd_size]
        starts = _record_starts(cd, n, path)
        nlen = _u(cd, starts + 28, 2).astype(np.int64)
        xlen = _u(cd, starts + 30, 2).astype(np.int64)
        method = _u(cd, starts + 10, 2).astype(np.int16)
        crc = _u(cd, starts + 16, 4).astype(np.uint32)
        csize = _u(cd, starts + 20, 4).astype(np.int64)
        usize = _u(cd, starts + 24, 4).astype(np.int64)
        local = _u(cd, starts + 42, 4).astype(np.int64)
        flags = _u(cd, starts + 8, 2).astype(np.int64)
        for k in np.flatnonzero((csize == U32) | (usize == U32) | (local == U32)):  # ZIP64: rare records
            s = int(starts[k])
            extra = bytes(cd[s + CD_SIZE + nlen[k]:s + CD_SIZE + nlen[k] + xlen[k]])
            usize[k], csize[k], local[k] = _zip64_extra(extra, int(usize[k]), int(csize[k]), int(local[k]))
        local += concat  # header offsets count from the archive's start
        blob, starts_out = _name_blob(cd, nlen, xlen + _u(cd, starts + 32, 2).astype(np.int64), flags, path)
        is_file = cd[starts + CD_SIZE + nlen - 1] != ord('/') if n else np.zeros(0, bool)
        if np.any(local + LOCAL_SIZE > len(mm)):
            raise CacheError(f'{path}: a member header lies past the end of the file (truncated zip)')
        name = lambda k: _name(blob, starts_out, k)  # noqa: E731  (for error messages only)
        sig_ok = (buf[local] == 0x50) & (buf[local + 1] == 0x4B) & (buf[local + 2] == 3) & (buf[local + 3] == 4)
        if not sig_ok.all():
            raise CacheError(f'{path}@/{name(int(np.flatnonzero(~sig_ok)[0]))}: bad local header (corrupt zip)')
        data = local + LOCAL_SIZE + _u(buf, local + 26, 2).astype(np.int64) + _u(buf, local + 28, 2).astype(np.int64)
        if np.any(data + csize > len(mm)):
            k = int(np.flatnonzero(data + csize > len(mm))[0])
            raise CacheError(f'{path}@/{name(k)}: member runs past the end of the file (truncated)')
        bad = ~np.isin(method, (0, 8)) & is_file
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise CacheError(f'{path}@/{name(k)}: unsupported compression {int(method[k])} (the reader takes stored '
                             f'and deflated members; rebuild with python -m data.build_zip_cache)')
        if not is_file.all():  # directory entries: drop them and their names
            keep = np.flatnonzero(is_file)
            names = [_name(blob, starts_out, k) for k in keep]
            blob, starts_out = join_names(names)
            data, csize, method, crc = data[keep], csize[keep], method[keep], crc[keep]
        return {'offsets': data, 'sizes': csize, 'methods': method.astype(np.int8), 'crcs': crc,
                'name_blob': blob, 'name_starts': starts_out, 'eocd': eocd}
    finally:
        del buf, cd  # release the exported buffer before closing the map
        _close(mm)


def _name_blob(cd: np.ndarray, nlen: np.ndarray, tail: np.ndarray, flags: np.ndarray, path: Path):
    """All names as one UTF-8 blob, each followed by '\\n', and the start of each (plus the end).

    The records are contiguous (checked by _record_starts): one boolean mask, repeated from each record's
    (header, name, extra + comment) lengths, cuts the name bytes out in a single copy. Names are decoded one
    by one only when some are neither ASCII nor flagged UTF-8 (cp437, the zip default).
    """
    n = len(nlen)
    lengths = np.stack([np.full(n, CD_SIZE), nlen, tail], 1).ravel()
    raw = cd[np.repeat(np.tile(np.array([False, True, False]), n), lengths)]
    ends = np.cumsum(nlen)
    if raw.size and raw.max() >= 0x80 and not ((flags & 0x800).all() and _is_utf8(raw)):
        names = [_decode_name(bytes(raw[e - ln:e]), f, k, path)
                 for k, (e, ln, f) in enumerate(zip(ends.tolist(), nlen.tolist(), flags.tolist()))]
        return join_names(names)
    blob = np.empty(raw.size + len(nlen), np.uint8)
    seps = ends + np.arange(len(nlen))  # position of each '\\n'
    keep = np.ones(blob.size, bool)
    keep[seps] = False
    blob[keep] = raw
    blob[seps] = ord('\n')
    starts = np.zeros(len(nlen) + 1, np.int64)
    starts[1:] = seps + 1
    return blob, starts


def _is_utf8(raw: np.ndarray) -> bool:
    try:
        raw.tobytes().decode('utf-8')
        return True
    except UnicodeDecodeError:
        return False


def _decode_name(raw: bytes, flags: int, k: int, path: Path) -> str:
    """A member name as the zip's UTF-8 flag says (cp437 without it, which decodes any bytes)."""
    try:
        return raw.decode('utf-8' if flags & 0x800 else 'cp437')
    except UnicodeDecodeError as e:
        raise CacheError(f'{path}: member {k + 1} of the central directory: its name {raw!r} is not UTF-8 though '
                         f'its UTF-8 flag is set ({e.reason} at byte {e.start}); rebuild the cache with '
                         f'python -m data.build_zip_cache') from None


def join_names(names: list[str]):
    """(blob, starts) of a list of names, in the layout of _name_blob."""
    data = [n.encode('utf-8') for n in names]
    starts = np.zeros(len(data) + 1, np.int64)
    starts[1:] = np.cumsum([len(d) + 1 for d in data]) if data else []
    return np.frombuffer(b''.join(d + b'\n' for d in data), np.uint8), starts


def _name(blob: np.ndarray, starts: np.ndarray, k: int) -> str:
    return bytes(blob[starts[k]:starts[k + 1] - 1]).decode('utf-8')


def _record_starts(cd: np.ndarray, n: int, path: Path) -> np.ndarray:
    """Start of each central-directory record: signature hits, validated as one unbroken chain."""
    if len(cd) < CD_SIZE * n:
        raise CacheError(f'{path}: central directory too short for {n} records (corrupt zip)')
    if n == 0:
        return np.zeros(0, np.int64)
    hits = np.flatnonzero((cd[:-3] == 0x50) & (cd[1:-2] == 0x4B) & (cd[2:-1] == 1) & (cd[3:] == 2))
    hits = hits[hits + CD_SIZE <= len(cd)]
    nxt = hits + CD_SIZE + sum(_u(cd, hits + o, 2).astype(np.int64) for o in (28, 30, 32))
    if len(hits) == n and hits[0] == 0 and np.array_equal(nxt[:-1], hits[1:]) and nxt[-1] == len(cd):
        return hits
    # a name happened to contain the signature bytes: follow the chain record by record
    follow = dict(zip(hits.tolist(), nxt.tolist()))
    starts, pos = [], 0
    while pos < len(cd) and len(starts) < n:
        if pos not in follow:
            raise CacheError(f'{path}: corrupt central directory at byte {pos}')
        starts.append(pos)
        pos = follow[pos]
    if len(starts) != n:
        raise CacheError(f'{path}: central directory holds {len(starts)} records, its end record says {n}')
    return np.asarray(starts, np.int64)


def _close(mm: mmap.mmap) -> None:
    """Close a map unless an error on its way out still holds a view of it (its traceback keeps the frame's
    arrays alive): then the map closes when they are freed, and the error itself is what the user sees,
    not ``BufferError: cannot close exported pointers exist``."""
    try:
        mm.close()
    except BufferError:
        pass


def input_signature(path: Path, eocd: bytes | None = None) -> dict:
    st = Path(path).stat()
    sig = {'name': Path(path).name, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}
    if eocd is not None:
        sig['eocd'] = eocd.hex()
    return sig


def zip_tail(path: Path) -> bytes:
    """The end records of a zip (cheap: the last 64 KiB at most), to tie an index to its zip's contents."""
    with open(path, 'rb') as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _end_records(mm, path)[4]
        finally:
            _close(mm)


def write_index(path: Path, inputs: dict, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` with a header naming ``inputs``; raises OSError when it cannot."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout[name] = [a.dtype.str, list(a.shape), offset]
        offset += -(-a.nbytes // 64) * 64
    header = json.dumps({'version': INDEX_VERSION, 'inputs': inputs, 'arrays': layout}).encode()
    start = -(-(len(INDEX_MAGIC) + 8 + len(header)) // 64) * 64
    with atomic_open(path, 'wb', file_mode=0o644) as f:
        f.write(INDEX_MAGIC + struct.pack('<Q', len(header)) + header)
        for name, a in arrays.items():
            f.seek(start + layout[name][2])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(start + offset)


def read_index(path: Path, inputs: dict | None, check_inputs: bool = True) -> dict[str, np.ndarray] | str:
    """The memory-mapped arrays of an index made from exactly ``inputs``, or the reason it cannot be used.

    ``check_inputs=False``: a DataLoader worker re-mapping an index its parent already checked."""
    try:
        with open(path, 'rb') as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                return 'not an index file'
            (hlen,) = struct.unpack('<Q', f.read(8))
            if hlen > path.stat().st_size:
                return 'unreadable (header length past the end of the file)'
            header = json.loads(f.read(hlen))
        if header.get('version') != INDEX_VERSION:
            return f'index version {header.get("version")}, this code reads {INDEX_VERSION}'
        if check_inputs and header.get('inputs') != inputs:
            return 'stale: made from other files (zip or map changed since)'
        start = -(-(len(INDEX_MAGIC) + 8 + hlen) // 64) * 64
        buf = np.memmap(path, np.uint8, mode='r')
        out = {}
        for name, (dtype, shape, off) in header['arrays'].items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) * dt.itemsize
            if start + off + count > len(buf):
                return 'truncated'
            out[name] = buf[start + off:start + off + count].view(dt).reshape(shape)
        return out
    except (OSError, ValueError, struct.error, json.JSONDecodeError, KeyError, TypeError) as e:
        return f'unreadable ({type(e).__name__}: {e})'
