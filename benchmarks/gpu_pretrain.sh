#!/usr/bin/env bash
# The one-GPU session that trains the shipped CT priors, the leave-one-out priors of the benchmark
# and the capacity rows (docs/RESULTS.md), all at once: one process per run, sharing the GPU.
#
#   bash benchmarks/gpu_pretrain.sh OUT DATA MINUTES
#
# OUT: where each run writes its prior_x{r}.pt/.json and log; DATA: the folder holding the shared
# CT volumes (../shared/data/ct); MINUTES: training time per run. Priors are then copied into the
# package with benchmarks/pretrain.py's outputs as they are (icmd_auto/priors/).
set -uo pipefail
OUT=${1:?OUT}
DATA=${2:?DATA}
MINUTES=${3:-5}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
pretrain() {  # name, then pretrain.py arguments
    local name=$1
    shift
    python benchmarks/pretrain.py --data "$DATA" --minutes "$MINUTES" --planes 64 --patch 96 \
        --validate_every_s 20 --out "$OUT/$name" "$@" >"$OUT/logs/$name.log" 2>&1 &
}
# the shipped priors: every factor, all volumes
for r in 2 3 4 5 6; do pretrain "full_x$r" --factors "$r"; done
# leave-one-out: trained without volume V, tested on V (x2, x4); and with the z-axis pairs switch
for v in chest_1.5mm abdomen_3mm dicom_2mm; do
    pretrain "loo_${v}_x2" --factors 2 --leave_out "$v"
    pretrain "loo_${v}_x4" --factors 4 --leave_out "$v"
    pretrain "loo_zpairs_${v}_x4" --factors 4 --leave_out "$v" --zpairs
done
# capacity: bigger presets, the same pairs and time (chest left out, x4)
pretrain capacity_medium_x4 --factors 4 --leave_out chest_1.5mm --preset medium
pretrain capacity_paper_x4 --factors 4 --leave_out chest_1.5mm --preset paper
wait
grep -h "best validation" "$OUT"/logs/*.log
