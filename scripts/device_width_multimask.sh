#!/usr/bin/env bash
# Session 14 on one lent GPU (the device tool), in two or three calls on one warm machine:
#   here:    bash scripts/prepare_device_data.sh    (carry .device_carry)
#   call 1:  bash scripts/device_width_multimask.sh start MIN   issue 8's refinement profile,
#            alone on the GPU (benchmarks/profile_refine_gpu.py), then four runs for MIN minutes
#            side by side, all on 1.0 mm real crops (the default's crop spacing):
#            ft_mm          the default fine-tuned with --multimask (whole model, lr 3e-5)
#            ft_mm_frozen   the same with the image encoder frozen, lr 1e-4
#            w768 / w384    the student from scratch at full width (768) and at the shipped width
#                           (384), same recipe and minutes: which width pays per device-minute,
#                           and whether int8 holds at full width (checked in call 3)
#   (or all in one call: bash scripts/device_width_multimask.sh solo MIN   the profile, then ft_mm
#            alone on the GPU for MIN minutes; returns its logs and best weights)
#   (or: bash scripts/device_width_multimask.sh width MIN   w768 and w384 alone, side by side for
#            MIN minutes, then scored as in finish; one call)
#   (call 2: bash scripts/device_width_multimask.sh watch    progress after SLEEP seconds, 480 by
#            default; SLEEP also sets how long start waits, 400 by default)
#   last:    bash scripts/device_width_multimask.sh finish   waits for the runs; scores w768 and
#            w384 in fp32, fp16 and int8 on the selection set; returns the logs,
#            ft_mm's best (int8; its last if the best is step 0) and ft_mm_frozen's decoder
#   here:    bash scripts/eval45.sh MODEL runs/eval_NAME   (decoder-only files: merge them with the
#            default's image encoder first, `python scripts/merge_decoder.py PART OUT`)
RUNS="ft_mm ft_mm_frozen w768 w384"
. "$(dirname "$0")/device_lib.sh"
pick() {  # RUN: RUN/best, or RUN/model when the best checkpoint is the starting one (step 0)
  python3 -c "import json; s=json.load(open('/tmp/$1/state.json')); print('$1/' + ('best' if s['best']['step'] else 'model'))"
}
profile() {  # SECONDS: issue 8's refinement profile, alone on the GPU, into $OUT
  timeout "$1" python3 benchmarks/profile_refine_gpu.py --repeats 200 2>&1 | tee "$OUT/refine_profile.txt"
}
score_widths() {  # w768 and w384 (their best, or their last when the best is step 0: pick) in
  # fp32, fp16 and int8 on the selection set
  python3 - <<'PY' | tee "$OUT/width_dtypes.jsonl"
import json, subprocess
from fastsam3d.registry import build_model
from fastsam3d.training.data import load_cases
from fastsam3d.training.validate import CropValidator
cases = load_cases(".device_carry/val_select.safetensors")
for run in ("w768", "w384"):
    best = json.load(open(f"/tmp/{run}/state.json"))["best"]["step"]
    src = f"/tmp/{run}/{'best' if best else 'model'}.safetensors"  # as pick()
    for dtype in ("fp32", "fp16", "int8"):
        path = src
        if dtype != "fp32":
            path = f"/tmp/{run}_{dtype}.safetensors"
            subprocess.run(["python3", "-m", "fastsam3d", "convert", src, path, "--dtype", dtype], check=True)
        model = build_model(checkpoint=path).cuda()
        val = CropValidator(cases, size=model.config.img_size, spacing=model.config.crop_spacing_mm)
        print(json.dumps({"run": run, "weights": src, "dtype": dtype, **val(model)}), flush=True)
PY
}
FT=(finetune --from fastsam3d/weights/default.safetensors --multimask --val-every 60)
W768=(train --set crop_spacing_mm=1.0 --lr 5e-4)
W384=("${W768[@]}" --set embed_dim=384 --set num_heads=6)
case $1 in
start)
  MIN=$2; gpu_info; profile 150
  v5_recipe "$MIN"
  launch ft_mm "${FT[@]}" --lr 3e-5
  launch ft_mm_frozen "${FT[@]}" --freeze-encoder --lr 1e-4
  launch w768 "${W768[@]}"
  launch w384 "${W384[@]}"
  sleep "${SLEEP:-400}"; progress ;;
watch)
  sleep "${SLEEP:-480}"; progress ;;
width)  # one call: w768 and w384 side by side for MIN minutes, then scored as in finish
  MIN=$2 RUNS="w768 w384"; gpu_info
  v5_recipe "$MIN"
  launch w768 "${W768[@]}"
  launch w384 "${W384[@]}"
  wait_runs; progress; score_widths
  pack_runs $RUNS ;;
profile)  # the refinement profile alone (2-4 minutes)
  gpu_info; profile 240 ;;
solo)  # one call: the refinement profile, then ft_mm alone for MIN minutes; returns its best
  MIN=$2 RUNS=ft_mm; gpu_info; profile 150
  v5_recipe "$MIN"
  launch ft_mm "${FT[@]}" --lr 3e-5
  wait_runs; progress
  pack_runs ft_mm
  fetch "$(pick ft_mm)" ;;
finish)
  wait_runs; progress; score_widths
  pack_runs $RUNS
  fetch "$(pick ft_mm)"
  fetch_decoder "$(pick ft_mm_frozen)" ;;
esac
