#!/usr/bin/env bash
# Prior pretraining across GPU leases: one process on the GPU at a time, each run continuing its
# checkpoint (icmd_auto pretrain --resume), so that each lease (15 minutes of device time, one
# command of at most 10) continues the last until the runs' schedules are done.
#
#   bash benchmarks/gpu_pretrain.sh wheels WHEELS
#       here, with a package index: download into WHEELS the packages the GPU machine lacks
#       (monai, pytorch-ignite, pywavelets, nibabel, pydicom, fire), the versions of this
#       environment, for its Python 3.12 on x86-64
#   bash benchmarks/gpu_pretrain.sh lease RUNS DATA WHEELS LEASE_MIN TOTAL_MIN [GROUP ...]
#       on the GPU machine, in the repository root: install WHEELS, then train each GROUP's runs
#       one after another, LEASE_MIN minutes in all (split evenly over the runs' factors), each on
#       a cosine schedule of TOTAL_MIN minutes per factor summed over leases; tests/test_pretrain.py
#       runs first (on CUDA it also checks that a step never waits for the GPU)
#
# GROUP (default: shipped):
#   shipped   RUNS/full_x{2..6}: the shipped priors, all volumes (one process, the factors in turn)
#   loo       RUNS/loo_<V>_x{2,4}: trained without volume V, for benchmarks/loo.py (one process per V)
#   nothin    RUNS/loo_nothin_<V>_x4: the same at x4 without thin supervision (--nothin)
#   capacity  RUNS/capacity_{medium,paper}_x4: bigger presets, the chest left out
#   throughput  RUNS/throughput_p{32,256,1024}_x4: fresh 45-second runs at x4 with 32, 256 and 1024
#             planes per step, for the throughput table of docs/PERFORMANCE.md (about 3 minutes on
#             top of LEASE_MIN)
# DATA: the folder of the shared CT volumes (../shared/data/ct copied into an ignored folder of
# the repository, e.g. .gpu_data/ct). Extra arguments for every run: PRETRAIN_ARGS, e.g.
# PRETRAIN_ARGS="--data_dir .gpu_data/more". Each lease's console output: RUNS/logs/<run>.log.
#
# With $OUT set (the device tool), RUNS is packed into $OUT as runs.tar.part-aa, -ab, ... (pieces
# of 15 MB, under the tool's file size limit). Bring it back into RUNS here and carry RUNS, DATA
# and WHEELS to the next lease (folders listed in .git/info/exclude, named in the tool's carry):
#   mkdir -p RUNS && cat <files_at>/runs.tar.part-* | tar -x -C RUNS
# A lease: status says how much device time is left; the machine's start and the transfers take
# 1-2 minutes, so an 8-minute command fits: LEASE_MIN 6 leaves time for the processes' starts,
# validations and checkpoints.
set -uo pipefail
MODE=${1:?"wheels WHEELS | lease RUNS DATA WHEELS LEASE_MIN TOTAL_MIN [GROUP ...]"}
shift
PACKAGES="monai pytorch-ignite PyWavelets nibabel pydicom fire termcolor"  # termcolor: fire's

if [ "$MODE" = wheels ]; then
    WHEELS=${1:?WHEELS}
    mkdir -p "$WHEELS"
    for name in $PACKAGES; do
        version=$(python -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$name==$version" || exit 1
    done
    ls -l "$WHEELS"
    exit 0
fi
[ "$MODE" = lease ] || { echo "unknown mode $MODE" >&2; exit 2; }

RUNS=${1:?RUNS}
DATA=${2:?DATA}
WHEELS=${3:?WHEELS}
LEASE_MIN=${4:?LEASE_MIN}
TOTAL_MIN=${5:?TOTAL_MIN}
shift 5
GROUPS_=("$@")
[ ${#GROUPS_[@]} -gt 0 ] || GROUPS_=(shipped)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import icmd_auto.template" 2>/dev/null; then
    # a copy of the tree, not installed: the package layout pyproject.toml maps, as a link
    ln -sfn ../bundle icmd_auto/bundle_template
fi
# the crops' equivalence, resume, and on CUDA that a step never waits for the GPU (a few seconds)
python3 -m pytest -q -p no:cacheprovider tests/test_pretrain.py 2>&1 | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "tests/test_pretrain.py failed on this machine (training goes on)"
VOLUMES=(totalseg_chest_1.5mm totalseg_example_ct_3mm totalseg_dicom_series)

# the runs of the groups: "name|factors|icmd_auto pretrain arguments", one process per factor
runs=()
for group in "${GROUPS_[@]}"; do
    case $group in
        shipped) runs+=("full|2 3 4 5 6|") ;;
        loo) for v in "${VOLUMES[@]}"; do runs+=("loo_$v|2 4|--leave_out $v"); done ;;
        nothin) for v in "${VOLUMES[@]}"; do runs+=("loo_nothin_$v|4|--leave_out $v --nothin"); done ;;
        capacity) runs+=("capacity_medium|4|--leave_out totalseg_chest_1.5mm --preset medium"
                         "capacity_paper|4|--leave_out totalseg_chest_1.5mm --preset paper") ;;
        throughput) for p in 32 256 1024; do
                runs+=("throughput_p$p|4|--planes $p --lease_minutes 0.75 --hours 0.0125 fresh")
            done ;;
        *) echo "unknown group $group" >&2; exit 2 ;;
    esac
done
factor_runs=0
for run in "${runs[@]}"; do
    IFS='|' read -r _ factors extra <<<"$run"
    [[ $extra == *fresh ]] || factor_runs=$((factor_runs + $(wc -w <<<"$factors")))
done
[ "$factor_runs" -gt 0 ] || factor_runs=1
MINUTES=$(python3 -c "print(round($LEASE_MIN / $factor_runs, 3))")
echo "lease: ${#runs[@]} processes, $factor_runs factor runs of $MINUTES min each (schedule: $TOTAL_MIN min)"
mkdir -p "$RUNS/logs"
status=0
for run in "${runs[@]}"; do
    IFS='|' read -r name factors extra <<<"$run"
    if [[ $extra == *fresh ]]; then  # a measurement: a fresh run on its own time, not a lease's share
        extra=${extra% fresh}
        rm -rf "$RUNS/${name}_x4"
    fi
    for factor in $factors; do
        # shellcheck disable=SC2086  # the extra arguments are words
        python3 -m icmd_auto pretrain --data_dir "$DATA" --factor "$factor" --out "$RUNS/${name}_x$factor" \
            --lease_minutes "$MINUTES" --hours "$(python3 -c "print($TOTAL_MIN / 60)")" --resume $extra \
            ${PRETRAIN_ARGS:-} 2>&1 | tee -a "$RUNS/logs/$name.log" | grep --line-buffered -E "lease|schedule|error"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$name x$factor failed: $RUNS/logs/$name.log"; status=1; }
    done
done
if [ -n "${OUT:-}" ]; then
    tar -c -C "$RUNS" . | split -b 15m - "$OUT/runs.tar.part-"
    ls -l "$OUT"
fi
exit $status
