#!/usr/bin/env bash
# The GPU distillation study of issue 7 on one lent GPU (the device tool), in two calls on one
# warm machine (the teacher stays in /tmp between them):
#   here:    bash scripts/prepare_device_data.sh          (carry .device_carry)
#   call 1:  bash scripts/device_distill.sh teacher MIN   a ViT-B teacher (sam_med3d layout, clean
#            switches, global attention: the 8^3 token grid fits one 14^3 window anyway), alone on
#            the GPU, validated on held-out objects (--val-cases) every 150 steps. Returns its logs.
#            (Session 10 showed that training the default on beside it does not help.) The
#            teacher stays on the machine: at ~95 MB in int8 it cannot be carried back in a later
#            session (a call carries 64 MiB), so it is distilled from in call 2.
#   call 2:  bash scripts/device_distill.sh students MIN  the width-384 student distilled from the
#            teacher's best weights with each schedule (decoupled, progressive, dynamic; the
#            papers' MSE feature loss) and progressive with the relative feature loss
#            (--feature-loss relative), all four at once for the same minutes. (Session 6 ran the
#            student without a teacher in the fourth slot: behind all three schedules.)
#            Returns the best-scoring student (int8).
#   (The dense against dilated attention study is scripts/device_study.sh, run in session 10.)
# Runs in one call share the GPU, so they are compared with each other, not with runs alone.
# $OUT gets runs.tar.gz (log.csv, val.csv, state.json of every run) and weights split into
# 15 MiB parts (the tool returns files up to 16 MiB): `cat RUN_best_part_* > RUN.safetensors`.
PHASE=$1 MIN=$2
. "$(dirname "$0")/device_lib.sh"
gpu_info
v5_recipe "$MIN"
STUDENT=(--set embed_dim=384 --set num_heads=6)
TEACHER=(--arch sam_med3d --set window_size=0 --set swap_pe_axes=false --set duplicate_sine=false
  --set official_rel_pos=false --set window_pad_unmasked=false --set num_point_embeddings=4)
if [ "$PHASE" = teacher ]; then
  launch teacher train "${TEACHER[@]}" --lr 4e-4
  RUNS=teacher
else
  for s in decoupled progressive dynamic; do
    launch "student_$s" distill --teacher /tmp/teacher/best.safetensors --schedule "$s" "${STUDENT[@]}" --lr 5e-4
  done
  launch student_progressive_rel distill --teacher /tmp/teacher/best.safetensors \
    --schedule progressive --feature-loss relative "${STUDENT[@]}" --lr 5e-4
  RUNS="student_decoupled student_progressive student_dynamic student_progressive_rel"
fi
wait
progress
pack_runs $RUNS
if [ "$PHASE" != teacher ]; then  # the best student comes back (a teacher is too big for a call)
  best=$(for r in $RUNS; do python3 -c "import json,sys; print(json.load(open('/tmp/$r/state.json'))['best']['score'], '$r')"; done | sort -g | tail -1 | cut -d' ' -f2)
  echo "keeping $best"
  fetch "$best/best"
fi
