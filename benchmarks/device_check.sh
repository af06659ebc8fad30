#!/usr/bin/env bash
# The GPU measurements in one prepared command, for a session that is lent a device machine.
#
# Before (on the development machine; see ../shared/device/README.md):
#   echo /.devbundle/ >> .git/info/exclude && WITH_WEIGHTS=1 bash ../shared/device/make-bundle.sh
# Then run `bash benchmarks/device_check.sh` there, carrying .devbundle. It unpacks the bundle (Ray,
# FAISS, the default model's weights) and measures:
#   - embedding throughput, the Ray Data pipeline vs a plain loop (benchmarks/embed.py);
#   - activation images/s on the GPU and recall@1 passive vs activated (benchmarks/activate.py).
# Logs and JSON go to $OUT (the device tool's folder that comes back), else bench-out/device.
# QUICK=1 runs a few-minute version; it also runs on a CPU, which is how the script is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .devbundle/site.tar.xz ] && [ ! -d .site ]; then
    mkdir -p .site && tar xJf .devbundle/site.tar.xz -C .site
fi
if [ -d .site ]; then export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
OUT="${OUT:-bench-out/device}"
mkdir -p "$OUT"

if [ "${QUICK:-0}" = 1 ]; then
    EMBED=(--images 200 --repeats 1) ACT=(--references 40 --background 300 --activate 8)
else
    EMBED=(--images 5000 --repeats 3) ACT=(--references 200 --background 2500 --activate 100)
fi

python - > "$OUT/machine.txt" <<'PY'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; {os.cpu_count()} CPUs; python {platform.python_version()}; torch {torch.__version__}")
PY
cat "$OUT/machine.txt"
date -u +%Y-%m-%d >> "$OUT/machine.txt"

python benchmarks/embed.py "${EMBED[@]}" --batch-size 128 --threads "$(nproc)" 2>&1 | tee "$OUT/embed.log"
python benchmarks/activate.py "${ACT[@]}" --workdir "$OUT/activate-work" --json "$OUT/activate.json" \
    --variants "paper:;rank:loss=rank,lr=0.5,augment=3" 2>&1 | grep -v "^WARNING clustering" | tee "$OUT/activate.log"
# The activated images are not needed back: keep what the device tool returns small.
rm -rf "$OUT/activate-work"
