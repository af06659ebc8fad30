#!/usr/bin/env bash
# The GPU measurements in one prepared command, for a session that is lent a device machine.
#
# Before (on the development machine; see ../shared/device/README.md):
#   echo /.devbundle/ >> .git/info/exclude && WITH_WEIGHTS=1 bash ../shared/device/make-bundle.sh
#   echo /.devphotos/ >> .git/info/exclude && python benchmarks/embed.py --save-photos .devphotos --count 12
# Then run `bash benchmarks/device_check.sh` there, carrying .devbundle and .devphotos (about 57 + 3
# MB; the device machine has no Debian packages to cut photographs from). It unpacks the bundle (Ray,
# FAISS, the default model's weights) and measures, on the GPU when there is one:
#   - the fast settings' tolerances on the GPU (tests/unit/test_embed_speed.py: bf16 path vs float32);
#   - embedding throughput on the same JPEGs, small (0.3-0.5 MP) and 12 MP: the plain float32 loop,
#     raysearch's decode alone (img/s per CPU core), the model alone (bf16 and float32 at batch
#     64-512, TFLOP/s and the share of the GPU's bf16 peak), the pipeline after and before
#     (images/s per GPU) (benchmarks/embed.py);
#   - bf16's effect on recall@1 of edited copies (benchmarks/embed.py --bf16-check);
#   - the query path's latency before/after: `raysearch search` wall time, in-process embed, serve's
#     per-image embed p50 (benchmarks/query_latency.py);
#   - activation images/s before/after (benchmarks/activate_speed.py) and recall@1 passive vs
#     activated with the GPU's settings (benchmarks/activate.py, small).
# The steps are sized for the device tool's 10 minutes (estimated for an H200 with 16 CPUs: the GPU
# runs have not been timed yet), and BUDGET (570 s) cuts them short in any case. Logs and JSON go
# to $OUT (the device tool's folder that comes back), else bench-out/device.
# QUICK=1 runs a few-minute version; it also runs on a CPU, which is how the script is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .devbundle/site.tar.xz ] && [ ! -d .site ]; then
    mkdir -p .site && tar xJf .devbundle/site.tar.xz -C .site
fi
if [ -d .site ]; then export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
OUT="${OUT:-bench-out/device}"
WORK="${WORK:-/tmp/raysearch-device-check}"
mkdir -p "$OUT" "$WORK"

DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
NPROC=$(nproc)
PHOTOS=()
if [ -d .devphotos ]; then PHOTOS=(--photos .devphotos); fi
if [ "$DEVICE" = cuda ]; then BATCHES=64,128,256,512; else BATCHES=32; fi

if [ "${QUICK:-0}" = 1 ]; then
    EMBED=(--small 96 --large 8 --repeats 1 --seconds 2 --plain-seconds 10 --variants plain,decode,model,pipeline,before)
    BF16=(--small 96 --bf16-check 12) QUERY=(--references 40 --repeats 1 --calls 5)
    ACTS=(--images 2 --iterations 2 --repeats 1) ACT=(--references 40 --background 300 --activate 8)
else
    EMBED=(--small 10000 --large 500 --repeats 2 --seconds 2 --plain-seconds 8
           --variants plain,decode,model,pipeline,before)
    BF16=(--small 1000 --bf16-check 150) QUERY=(--references 200 --repeats 2 --calls 20)
    ACTS=(--images 16 --iterations 10 --repeats 2) ACT=(--references 40 --background 300 --activate 20)
fi
# Seconds the whole script may take: each step runs only with enough of it left (the most useful
# first) and is cut at the end of it, so that the device tool's 10 minutes always bring logs back.
BUDGET="${BUDGET:-570}"

python - > "$OUT/machine.txt" <<'PY'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; {os.cpu_count()} CPUs; python {platform.python_version()}; torch {torch.__version__}")
PY
cat "$OUT/machine.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/machine.txt"

# step NAME SECONDS_NEEDED COMMAND...: run COMMAND, output to $OUT/NAME.log, if that much time is left.
step() {
    local name=$1 need=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$need" ]; then
        echo "== $name skipped: ${left}s of the budget left, it needs ${need}s" | tee -a "$OUT/steps.log"
        return 0
    fi
    echo "== $name (at ${SECONDS}s)" | tee -a "$OUT/steps.log"
    timeout "$left" "$@" 2>&1 | grep -v "core_worker\|UserWarning\|warnings.warn\|^WARNING clustering" \
        | tee "$OUT/$name.log" || echo "== $name stopped (exit ${PIPESTATUS[0]})" | tee -a "$OUT/steps.log"
}

step tests 60 python -m pytest -q -p no:cacheprovider tests/unit/test_embed_speed.py
step embed 240 python benchmarks/embed.py "${EMBED[@]}" "${PHOTOS[@]}" --device "$DEVICE" --threads "$NPROC" \
    --model-batch-sizes "$BATCHES" --workdir "$WORK/embed" --json "$OUT/embed.json"
step query_latency 60 python benchmarks/query_latency.py "${QUERY[@]}" "${PHOTOS[@]}" --device "$DEVICE" \
    --threads "$NPROC" --workdir "$WORK/embed" --json "$OUT/query.json"
step activate_speed 40 python benchmarks/activate_speed.py "${ACTS[@]}" "${PHOTOS[@]}" --device "$DEVICE" \
    --threads "$NPROC" --workdir "$WORK/embed" --json "$OUT/activate_speed.json"
step bf16 40 python benchmarks/embed.py "${BF16[@]}" "${PHOTOS[@]}" --device "$DEVICE" --threads "$NPROC" \
    --workdir "$WORK/embed" --json "$OUT/bf16.json"
step activate 90 python benchmarks/activate.py "${ACT[@]}" --workdir "$WORK/activate" --json "$OUT/activate.json" \
    --variants "paper:;rank:loss=rank,lr=0.5,augment=3"
echo "== done at ${SECONDS}s" | tee -a "$OUT/steps.log"
