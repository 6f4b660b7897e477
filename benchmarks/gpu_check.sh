#!/usr/bin/env bash
# The CUDA paths in one run (< 10 min on one GPU); its numbers go into docs/data.md ("Data loading speed").
#   bash benchmarks/gpu_check.sh          PYTHON=python3  WORK=/tmp/gpu_check (a fresh folder below it per run)
# 1. AMP train steps of DeiT-S 224, batch 128, MaxSup vs CE, img/s: fp16 + GradScaler, bf16, bf16 + compile;
#    ResNet-50 fp16 with and without channels-last
# 2. fused MaxSup under CUDA fp16 autocast equals the fp32 reference (asserted)
# 3. the input pipeline feeding the GPU from every core: default vs --device-aug vs --gpu-decode, img/s, and
#    the cores per GPU each needs; 3b. --gpu-decode's nvJPEG batch equals its CPU decode within a few levels
# 4. the trainer itself, in a new folder: one AMP epoch on a ZIP cache with the EMA kept on the CPU
#    (--model-ema-force-cpu); the EMA metrics it logs must equal a blocking CPU evaluation of its checkpoint
# 5. the trainer with --gpu-decode --device-aug: one AMP epoch in fp16, one in bf16
# Every check that asserts prints "<check>: OK". A failing section is reported and the next one runs (a GPU
# lease is short: one run should show every failure); the script exits 1 if any section failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mkdir -p "${WORK:-/tmp/gpu_check}" && mktemp -d "${WORK:-/tmp/gpu_check}/run-XXXX")
WORKERS=$(( $(nproc) - 2 ))
failed=()

section() {  # section NAME COMMAND...: run it, time it, remember a failure and go on
  local name=$1 start=$SECONDS; shift
  echo "== $name"
  "$@" || { echo "$name: FAILED (exit $?)"; failed+=("$name"); }
  echo "-- $name: $(( SECONDS - start )) s"
}

train_steps() {
  local row
  for row in "" "--amp-dtype bfloat16" "--amp-dtype bfloat16 --torchcompile"; do
    "$PY" -m benchmarks.bench_train_step --model deit_small_patch16_224 --input-size 224 --batch 128 --amp \
        $row --steps 10 --rounds 5 || return
  done
}

resnet_steps() {
  local row
  for row in "" "--channels-last"; do
    "$PY" -m benchmarks.bench_train_step --model resnet50 --input-size 224 --batch 128 --amp $row \
        --steps 10 --rounds 3 || return
  done
}

train_epoch() {  # train_epoch RUN_DIR EXTRA_FLAGS...: one AMP epoch of DeiT-S on the ZIP cache
  local run=$1; shift
  "$PY" -m deit.main --data-set IMNET --cache --data-path "$WORK/data/full" --model deit_small_patch16_224 \
      --batch-size 128 --epochs 1 --warmup-epochs 0 --lr 5e-4 --num_workers "$WORKERS" \
      --output_dir "$WORK/$run" --print-freq 4 "$@" > "$WORK/$run.log" 2>&1
  local rc=$?
  grep -E "input pipeline|Epoch: \[0\] Total|Test:.*Total|Acc@1|EMA|Final|rror" "$WORK/$run.log"
  [ $rc -eq 0 ] || { tail -20 "$WORK/$run.log"; return $rc; }
  test -f "$WORK/$run/checkpoint.pth"
}

ema_epoch() {
  train_epoch run --model-ema --model-ema-force-cpu || return
  "$PY" -m benchmarks.gpu_asserts ema "$WORK/run" --data-path "$WORK/data/full" --cache
}

gpu_decode_epoch() {  # fp16, then bf16 with another seed: torchvision's CUDA decoder once corrupted memory there
  train_epoch run_gpu_decode --gpu-decode --device-aug || return
  train_epoch run_gpu_decode_bf16 --gpu-decode --device-aug --amp-dtype bfloat16 --seed 1 && echo "gpu-decode trainer: OK"
}

"$PY" -c 'import torch, timm, PIL; assert torch.cuda.is_available(), "no CUDA device";
print("torch", torch.__version__, "timm", timm.__version__, "PIL", PIL.__version__, "|", torch.cuda.get_device_name())' \
    || exit 1
section "1. AMP train steps: DeiT-S, batch 128, MaxSup vs CE" train_steps
section "1b. ResNet-50, batch 128: fp16 vs fp16 + channels-last" resnet_steps
section "2. fused MaxSup under fp16 autocast vs the fp32 reference" \
    "$PY" -m benchmarks.gpu_asserts maxsup-amp --device cuda
section "3. input pipeline -> GPU" \
    "$PY" -m benchmarks.bench_input_pipeline --gpu --images 1024 --loader-batches 48 --workdir "$WORK/data"
section "3b. --gpu-decode: nvJPEG on the GPU vs the same code on the CPU" \
    "$PY" -m benchmarks.gpu_asserts gpu-decode "$WORK/data/full" --device cuda
section "4. trainer: 1 AMP epoch + EMA on the CPU, evaluated on the GPU after the last epoch" ema_epoch
section "5. trainer with --gpu-decode --device-aug: 1 AMP epoch, JPEGs decoded on the GPU" gpu_decode_epoch
if [ ${#failed[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${failed[@]}"; exit 1; fi
echo "gpu_check: all sections OK"
