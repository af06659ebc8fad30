#!/usr/bin/env bash
# Install raysearch with FAISS for NVIDIA GPUs into the current Python environment.
#
#   bash cluster/install.sh [RAYSEARCH_SOURCE]
#
# RAYSEARCH_SOURCE: a checkout of raysearch (default: the one this script is in) or anything pip
# installs (a wheel, a git URL). Used by cluster/aws.yaml (setup_commands, on every node) and by
# cluster/Dockerfile (the image of the KubeRay manifests), so both install the same way.
set -euo pipefail

SRC="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
FAISS_GPU="${FAISS_GPU:-faiss-gpu-cu12>=1.8}"

pip install --no-cache-dir "$SRC"
# faiss-cpu (a dependency of raysearch) and faiss-gpu install the same `faiss` package: remove the
# CPU build first, then install the GPU build, never both at once (uninstalling one after the
# other was installed would delete files the other needs).
pip uninstall -y faiss-cpu
pip install --no-cache-dir "$FAISS_GPU"
python - <<'PY'
import faiss
import raysearch

print(f"raysearch {raysearch.__version__}, faiss {faiss.__version__} with {faiss.get_num_gpus()} GPU(s) visible")
PY
