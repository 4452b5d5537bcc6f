#!/usr/bin/env bash
# Issue 7's attention study and a fine-tune of the default, with issue 8's GPU benchmark, on one
# lent GPU (the device tool) in three calls on one warm machine. The runs are started detached
# (setsid), so they go on between calls; each call stays under the tool's 10-minute limit.
#   here:    bash scripts/prepare_device_data.sh    (carry .device_carry)
#   call 1:  bash scripts/device_study.sh start MIN  GPU benchmark of the shipped model (alone on
#            the GPU), the CUDA-only tests, then three runs for MIN minutes side by side:
#            attn_dense / attn_dilated  the width-384 student from scratch with global and with
#                                       3D dilated sparse attention, same recipe and seed
#            finetune                   the shipped default trained on with the same data, lr 1e-4
#   call 2:  bash scripts/device_study.sh watch      progress, returns after ~9 minutes
#   call 3:  bash scripts/device_study.sh finish     waits for the runs, scores every run's best
#            weights and the shipped default on the 45 reported labels of ts_abdomen_ct (the
#            `fastsam3d evaluate` protocol, 5 clicks and box + 5, no baseline), returns logs,
#            scores and the best weights of the fine-tune and of the better attention run by validation score (int8, 15 MiB parts:
#            `cat NAME_part_* > NAME.safetensors`).
# Runs sharing the GPU are compared with each other, not with runs alone.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
RUNS="attn_dense attn_dilated finetune"
LABELS=${LABELS:-1,2,3,4,5,6,7,11,14,18,19,20,21,22,25,26,27,28,29,30,31,32,52,63,64,65,66,67,68,75,76,77,78,79,80,81,82,83,84,85,86,87,88,89,117}
DEVICE=${DEVICE:-cuda}
progress() {
  for r in $RUNS; do
    echo "== $r $(tail -c 400 "/tmp/$r.stdout" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"
    tail -2 "/tmp/$r/val.csv" 2>/dev/null
  done
}
case $1 in
start)
  MIN=$2
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  timeout 240 python3 benchmarks/bench_model.py --checkpoint fastsam3d/weights/default.safetensors \
    --repeats 30 --sparse --out "$OUT/gpu_bench_default.jsonl" 2>&1 | tail -40
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_perf_paths.py -k cuda 2>&1 | tail -3
  COMMON=(--cases .device_carry/real_train.safetensors --val-cases .device_carry/val_select.safetensors
    --val-every 150 --steps 1000000 --batch-size 16 --targets 4 --pool 384 --rounds 5 --box-prob 0.2
    --real-fraction 0.25 --seed 0 --save-every 400 --synthetic planes=0.5 --synthetic structures=24
    --synthetic min_radius=1.5 --max-minutes "$MIN" --overwrite)
  STUDENT=(--set embed_dim=384 --set num_heads=6 --lr 5e-4)
  setsid python3 -m fastsam3d train "${STUDENT[@]}" --set attention=global --out /tmp/attn_dense \
    "${COMMON[@]}" > /tmp/attn_dense.stdout 2>&1 < /dev/null &
  setsid python3 -m fastsam3d train "${STUDENT[@]}" --out /tmp/attn_dilated \
    "${COMMON[@]}" > /tmp/attn_dilated.stdout 2>&1 < /dev/null &
  setsid python3 -m fastsam3d finetune --from fastsam3d/weights/default.safetensors --lr 1e-4 \
    --out /tmp/finetune "${COMMON[@]}" > /tmp/finetune.stdout 2>&1 < /dev/null &
  sleep 90; progress ;;
watch)
  sleep 540; progress ;;
finish)
  while pgrep -f "fastsam3d (train|finetune)" > /dev/null; do sleep 5; done
  progress
  for r in $RUNS; do cp "/tmp/$r.stdout" "/tmp/$r/stdout.txt"; done
  tar czf "$OUT/runs.tar.gz" -C /tmp $(for r in $RUNS; do echo "$r/log.csv $r/val.csv $r/state.json $r/stdout.txt"; done)
  CT=.device_carry/ts_abdomen_ct
  for m in default:fastsam3d/weights/default.safetensors attn_dense:/tmp/attn_dense/best.safetensors \
      attn_dilated:/tmp/attn_dilated/best.safetensors finetune:/tmp/finetune/best.safetensors \
      finetune_last:/tmp/finetune/model.safetensors; do
    OMP_NUM_THREADS=3 timeout 240 python3 -m fastsam3d evaluate $CT/image.nii.gz $CT/label.nii.gz \
      -o "/tmp/eval_${m%%:*}" --labels $LABELS --clicks 5 --model "${m#*:}" --device "$DEVICE" \
      --no-baseline --overwrite > "/tmp/eval_${m%%:*}.log" 2>&1 &
  done
  wait
  for m in default attn_dense attn_dilated finetune finetune_last; do
    echo "== eval $m"; tail -3 "/tmp/eval_$m.log"; grep "^all,.*model" "/tmp/eval_$m/summary.csv" | cut -d, -f2,4,5,7
  done
  tar czf "$OUT/eval.tar.gz" -C /tmp $(for m in default attn_dense attn_dilated finetune finetune_last; do echo "eval_$m/summary.csv eval_$m/results.csv"; done)
  attn=$(for r in attn_dense attn_dilated; do python3 -c "import json; print(json.load(open('/tmp/$r/state.json'))['best']['score'], '$r')"; done | sort -g | tail -1 | cut -d' ' -f2)
  for r in finetune "$attn"; do  # 2 x 29 MB: the tool returns 64 MiB a call
    python3 -m fastsam3d convert "/tmp/$r/best.safetensors" "/tmp/$r.int8.safetensors" --dtype int8 \
      && split -b 15m "/tmp/$r.int8.safetensors" "$OUT/${r}_part_"
  done
  ls -la "$OUT" ;;
esac
