#!/usr/bin/env bash
# The default model's training run on a lent GPU (the device tool), resumable across calls.
#   here:    fastsam3d train --out /tmp/prep --data DIR --save-cases .device_carry/real_train.safetensors --steps 0
#   device:  bash scripts/device_train.sh TOTAL_MIN SCHEDULE_MIN [int8|fp16]   (carry .device_carry)
#            EXTRA="..." adds options, e.g. EXTRA="--set crop_spacing_mm=1.0 --real-scale 0.67,1.5"
# Each call trains until TOTAL_MIN minutes of the run have passed (resuming RUN, default
# /tmp/run, which a warm machine keeps between calls), then leaves log.csv and the weights, split
# into 15 MiB parts (the tool returns files up to 16 MiB), in $OUT: `cat part_* > model.safetensors`.
. "$(dirname "$0")/device_lib.sh"
RUN=${RUN:-/tmp/run}
gpu_info
python3 -m fastsam3d train --out "$RUN" --resume --cases .device_carry/real_train.safetensors \
  --set embed_dim=384 --set num_heads=6 --steps 1000000 --batch-size 16 --targets 4 --pool 768 \
  --lr 5e-4 --rounds 5 --box-prob 0.2 --real-fraction 0.25 --seed 0 --save-every 400 \
  --synthetic planes=0.5 --synthetic structures=24 --synthetic min_radius=1.5 \
  --max-minutes "$1" --schedule-minutes "$2" ${EXTRA:-} > "$RUN.stdout" 2>&1
echo "train exit code $?"; tail -c 1500 "$RUN.stdout" | tr '\r' '\n' | tail -8
cp "$RUN/log.csv" "$OUT/log.csv"; tail -3 "$RUN/log.csv"
# send converts beside the run, not in a shared /tmp file: runs side by side (RUN=/tmp/a
# OUT=$OUT/a ... & RUN=/tmp/b OUT=$OUT/b ...) would otherwise return whichever finished last.
send "$RUN/model.safetensors" "" "${3:-int8}"
ls -la "$OUT"
