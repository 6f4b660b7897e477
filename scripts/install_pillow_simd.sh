#!/usr/bin/env bash
# Optional: pillow-simd (SIMD resize and filters, ~2x faster RandomResizedCrop + RandAugment) for a venv.
#   bash scripts/install_pillow_simd.sh .venv/bin/python
# It is built into <venv>/pillow-simd and put AHEAD of Pillow on sys.path by a .pth file, instead of
# replacing Pillow: torchvision and matplotlib depend on the distribution "pillow", and pip would
# reinstall Pillow over pillow-simd at the next install. MAXSUP_STOCK_PILLOW=1 hides it for one process
# (the benchmark measures both side by side that way). Pixels differ from Pillow's by a few levels in
# resizes; benchmarks/bench_input_pipeline.py reports the maximum difference.
set -euo pipefail
PY=${1:?usage: install_pillow_simd.sh <venv python>}
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "$(dirname "$PY")/.." && pwd)
target=$venv/pillow-simd
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
flags=""
grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"  # its AVX2 paths are compiled only when asked for
rm -rf "$target.tmp"
CC="${CC:-cc} $flags" "$PY" -m pip --disable-pip-version-check install -q --no-deps --no-cache-dir \
    --target "$target.tmp" -r "$here/requirements/pillow-simd.txt"
rm -rf "$target" && mv "$target.tmp" "$target"
echo "import os, sys; os.environ.get('MAXSUP_STOCK_PILLOW') or sys.path.insert(0, '$target')" \
    > "$site/maxsup_pillow_simd.pth"
"$PY" -c 'import PIL, PIL.Image; print("pillow-simd active:", PIL.__version__, PIL.__file__)'
