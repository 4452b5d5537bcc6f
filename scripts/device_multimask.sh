#!/usr/bin/env bash
# Issue 7, session 11: the shipped default fine-tuned with SAM's multimask first click
# (`finetune --multimask`: the 3 multimask outputs start as copies of the single one, the best
# of them learns on each first click, and a session answers a first click with whichever of the
# 4 outputs has the highest predicted IoU), on one lent GPU in four calls on one warm machine.
#   here:    bash scripts/prepare_device_data.sh    (carry .device_carry)
#   call 1:  bash scripts/device_multimask.sh start MIN   three runs for MIN minutes side by side:
#            mm_frozen      image encoder frozen (prompt encoder + decoder train), lr 1e-4
#            mm_real        the same on real crops only (--real-fraction 1.0; the session-11 CPU
#                           pilot's setting), scored every 30 steps since it over-fits early
#            mm_full        the whole model, lr 5e-5
#   call 2:  bash scripts/device_multimask.sh watch   progress, returns after ~9 minutes
#   call 3:  bash scripts/device_multimask.sh finish  waits for the runs; returns their logs and the
#            frozen runs' best and last prompt encoder + decoder (fp16, the encoder is the default's)
#   call 4:  bash scripts/device_multimask.sh fetch   mm_full's best and last weights (int8)
#   here:    bash scripts/eval45.sh MODEL runs/eval_NAME   (decoder-only files: merge them with the
#            default's image encoder first, `python scripts/merge_decoder.py PART OUT`)
RUNS="mm_frozen mm_real mm_full"
. "$(dirname "$0")/device_lib.sh"
case $1 in
start)
  MIN=$2; gpu_info
  v5_recipe "$MIN"
  FT=(finetune --from fastsam3d/weights/default.safetensors --multimask)
  launch mm_frozen "${FT[@]}" --freeze-encoder --lr 1e-4
  launch mm_real "${FT[@]}" --freeze-encoder --lr 1e-4 --real-fraction 1.0 --val-every 30
  launch mm_full "${FT[@]}" --lr 5e-5
  sleep 120; progress ;;
watch)
  sleep 540; progress ;;
finish)
  wait_runs; progress
  pack_runs $RUNS
  fetch_decoder mm_frozen/best mm_frozen/model mm_real/best mm_real/model ;;
fetch)
  fetch mm_full/best mm_full/model ;;
esac
