#!/usr/bin/env bash
# The model card's evaluation: `fastsam3d evaluate` on the 45 reported labels of ts_abdomen_ct
# (scripts/report_labels.txt), 5 simulated clicks and box + 5, on the CPU (about a minute).
#   bash scripts/eval45.sh MODEL OUT [SEED] [extra evaluate options, e.g. --baseline]
# MODEL: default, a checkpoint or an export-onnx folder. Prints the mean Dice per step.
set -euo pipefail
MODEL=$1 OUTDIR=$2 SEED=${3:-2023}
shift $(( $# < 3 ? $# : 3 ))
DATA=${DATA:-$(cd "$(dirname "$0")/../../shared/data" && pwd)}
python3 -m fastsam3d evaluate "$DATA/ts_abdomen_ct/image.nii.gz" "$DATA/ts_abdomen_ct/label.nii.gz" \
  -o "$OUTDIR" --labels "$(cat "$(dirname "$0")/report_labels.txt")" --clicks 5 --model "$MODEL" \
  --device cpu --seed "$SEED" --no-baseline --overwrite "$@" > "$OUTDIR.log" 2>&1
grep '^all,' "$OUTDIR/summary.csv" | awk -F, '{printf "%-10s %-8s %s clicks: %.4f\n", $2, $3, $5, $7}'
