#!/usr/bin/env bash
# The GPU path in one device call (at most ~8 minutes on one H200): install from carried wheels,
# then, one after another (never side by side: each part sets its own threads),
#   1. the planner's probe against the training it plans: plan -> train -> predict on the shared
#      chest at x4 with a 3-minute budget (benchmarks/probe.py --score): planned vs measured seconds
#      per iteration, the share of the budget trained, samples/s, the gain over linear;
#   2. prediction speed (benchmarks/speed.py --zero_shot): `icmd_auto predict` with the shipped prior
#      on 512x512x100 and x300 phantoms at x4, whole command and per stage (read, checks, model load,
#      synthesis, write), .nii.gz output.
# Each part writes its table under $OUT (the device tool brings $OUT back); nothing here writes docs/.
#
# Set-up, on the machine that calls the device tool (wheels for Python 3.12, see
# /work/.library/device/README.md; the shared CT does not travel, so a copy goes in an ignored folder):
#   mkdir -p .devdata && cp ../shared/data/ct/totalseg_chest_1.5mm.nii.gz .devdata/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 pytorch-ignite==0.5.5 PyWavelets==1.9.0 \
#     fire==0.7.1 termcolor==3.3.0
#   (both folders listed in .git/info/exclude), then the device call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".devdata"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ICMD_CT_DATA=$PWD/.devdata
CORES=$(nproc)
echo "machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"

# the carried wheels beside the image's torch; this checkout importable as it is (the package layout
# pyproject.toml maps, as a link: benchmarks/gpu_pretrain.sh does the same)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import icmd_auto.template" 2>/dev/null || ln -sfn ../bundle icmd_auto/bundle_template
PY=python3
$PY -c "import torch, monai, icmd_auto.template; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)" || exit 1

part() {  # name, seconds, command...: one part, its own log, a time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    OMP_NUM_THREADS=$CORES timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    grep -E '^\|' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}

part probe 300 $PY benchmarks/probe.py --factors 4 --budget_min 3 --score --out "$OUT/probe.md" --json "$OUT/probe.json"
part speed 200 $PY benchmarks/speed.py --zero_shot --slices 100 300 --out "$OUT/speed.md" --json "$OUT/speed.json"
echo "== done"
