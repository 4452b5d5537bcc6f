#!/usr/bin/env bash
# Issue 7's attention study and a fine-tune of the default, with issue 8's GPU benchmark, on one
# lent GPU (the device tool) in four calls on one warm machine. The runs are started detached
# (setsid), so they go on between calls; each call stays under the tool's 10-minute limit.
#   here:    bash scripts/prepare_device_data.sh    (carry .device_carry)
#   call 1:  bash scripts/device_study.sh start MIN  GPU benchmark of the shipped model (alone on
#            the GPU), the CUDA-only tests, then three runs for MIN minutes side by side:
#            attn_dense / attn_dilated  the width-384 student from scratch with global and with
#                                       3D dilated sparse attention, same recipe and seed
#            finetune                   the shipped default trained on with the same data, lr 1e-4
#   call 2:  bash scripts/device_study.sh watch      progress, returns after ~9 minutes
#   call 3:  bash scripts/device_study.sh finish     waits for the runs; returns their logs and the two
#            attention runs' best weights (int8, 15 MiB parts: `cat RUN_best_part_* > RUN.safetensors`)
#   call 4:  bash scripts/device_study.sh fetch      the fine-tune's best and last weights (a call
#            returns at most 64 MiB, two int8 models)
#   here:    bash scripts/eval45.sh NAME.safetensors runs/eval_NAME   the 45-label evaluation, on
#            the CPU: the device image has neither nibabel nor MONAI (session 10 tried it there).
# Runs sharing the GPU are compared with each other, not with runs alone.
RUNS="attn_dense attn_dilated finetune"
. "$(dirname "$0")/device_lib.sh"
case $1 in
start)
  MIN=$2; gpu_info
  timeout 240 python3 benchmarks/bench_model.py --checkpoint fastsam3d/weights/default.safetensors \
    --repeats 30 --sparse --out "$OUT/gpu_bench_default.jsonl" 2>&1 | tail -40
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_perf_paths.py -k cuda 2>&1 | tail -3
  v5_recipe "$MIN"
  STUDENT=(--set embed_dim=384 --set num_heads=6 --lr 5e-4)
  launch attn_dense train "${STUDENT[@]}" --set attention=global
  launch attn_dilated train "${STUDENT[@]}"
  launch finetune finetune --from fastsam3d/weights/default.safetensors --lr 1e-4
  sleep 90; progress ;;
watch)
  sleep 540; progress ;;
finish)
  wait_runs; progress
  pack_runs $RUNS
  fetch attn_dense/best attn_dilated/best ;;
fetch)
  fetch finetune/best finetune/model ;;
esac
