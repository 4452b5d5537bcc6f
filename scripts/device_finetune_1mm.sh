#!/usr/bin/env bash
# Session 17 on one lent GPU (the device tool), three calls on one warm machine: the default
# fine-tuned on 1.0 mm real crops (its crop spacing; v5 was trained on 1.5 mm ones) three ways
# side by side, every snapshot and its mean with the start scored on the 45-label evaluation on
# the device while the runs go on, and the two best by the 23 selection labels returned.
#   here:    bash scripts/prepare_device_data.sh
#            carry .device_carry/real_train.safetensors and .device_carry/eval45.safetensors
#            (with the selection crops too a call would pass its 64 MiB)
#   call 1:  bash scripts/device_finetune_1mm.sh start MIN   three runs for MIN minutes:
#            ft          finetune --from default, lr 1e-4 (v5's recipe on 1.0 mm crops)
#            ft_zoom     the same, real crops zoomed 0.67-1.5x about their click (--real-scale):
#                        each real object at spacings of 0.67-1.5 mm, for four training volumes
#            ft_zoom_mm  ft_zoom with --multimask (SAM's multimask first click)
#            and the evaluator (scripts/eval_prepared.py, in the background)
#   call 2:  bash scripts/device_finetune_1mm.sh watch
#   call 3:  bash scripts/device_finetune_1mm.sh finish   waits for the runs, scores what is
#            left (the last weights first, for at most EVAL_S seconds), prints the table, returns the logs, every results.csv and the two best
#            weights (int8, 15 MiB parts: `cat NAME_part_* > NAME.safetensors`)
#   here:    python scripts/paired_eval.py evals/A evals/B; bash scripts/eval45.sh on the CPU
RUNS="ft ft_zoom ft_zoom_mm"
. "$(dirname "$0")/device_lib.sh"
EVALS=/tmp/evals

eval_pass() {  # score every snapshot (and its mean with the run's start) not scored yet, the
  # runs' last weights first, on the CPU, EVAL_JOBS at a time with 2 threads each
  local todo=() f run step soup
  mkdir -p "$EVALS" /tmp/soups
  for f in $(ls /tmp/{ft,ft_zoom,ft_zoom_mm}/snapshots/step_*.safetensors 2>/dev/null | sort -t/ -k5 -r); do
    run=$(basename "$(dirname "$(dirname "$f")")") step=$(basename "$f" .safetensors)
    if [ "$step" = step_000000 ]; then  # the start: v5 (with copied multimask heads in _mm)
      [ "$run" = ft ] && [ ! -f "$EVALS/${run}_$step/results.csv" ] && todo+=("$f")
      continue
    fi
    [ -f "$EVALS/${run}_$step/results.csv" ] || todo+=("$f")
    soup=/tmp/soups/${run}_${step}_mean0.safetensors
    [ -f "$soup" ] || python3 -m fastsam3d convert "$f" "$soup" --overwrite \
      --mean-with "/tmp/$run/snapshots/step_000000.safetensors" > /dev/null
    [ -f "$EVALS/$(basename "$soup" .safetensors)/results.csv" ] || todo+=("$soup")
  done
  [ ${#todo[@]} -gt 0 ] || return 1
  printf '%s\n' "${todo[@]}" | OMP_NUM_THREADS=2 xargs -P "${EVAL_JOBS:-4}" -I{} \
    python3 scripts/eval_prepared.py --device cpu --out "$EVALS" {} >> /tmp/evals.jsonl 2>> /tmp/evals.err
}

table() {  # the scores so far, best first by the selection labels (mean over all 11 steps)
  python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/evals.jsonl")]
def score(r, g):
    return sum(r[g].values()) / len(r[g])
print(f"{'name':34s} {'sel':>6s} {'other':>6s} | all: 1 / 3 / 5 clicks, box, box+5")
for r in sorted(rows, key=lambda r: -score(r, "selection")):
    a = r["all"]
    print(f"{r['name']:34s} {score(r, 'selection'):6.4f} {score(r, 'other'):6.4f} | "
          f"{a['clicks/1']:.3f} {a['clicks/3']:.3f} {a['clicks/5']:.3f} "
          f"{a['box+clicks/1']:.3f} {a['box+clicks/6']:.3f}")
PY
}

case $1 in
start)
  MIN=$2; gpu_info
  v5_recipe "$MIN"
  FT=(finetune --from fastsam3d/weights/default.safetensors --lr 1e-4 --keep-every 300)
  launch ft "${FT[@]}"
  launch ft_zoom "${FT[@]}" --real-scale 0.67,1.5
  launch ft_zoom_mm "${FT[@]}" --real-scale 0.67,1.5 --multimask
  setsid bash "$0" loop > /tmp/evaluator.log 2>&1 < /dev/null &
  echo $! > /tmp/evaluator.pid
  sleep "${SLEEP:-540}"; progress; table; tail -3 /tmp/evals.err ;;
loop)  # the background evaluator
  while true; do eval_pass || sleep 10; done ;;
pass)
  eval_pass ;;
watch)
  sleep "${SLEEP:-560}"; progress; table ;;
finish)
  wait_runs; progress
  for r in $RUNS; do cp "/tmp/$r/model.safetensors" "/tmp/$r/snapshots/step_final.safetensors"; done
  kill -- -"$(cat /tmp/evaluator.pid)"; sleep 1
  setsid bash "$0" pass & pid=$!  # for EVAL_S seconds at most (session 17's unbounded pass
  (sleep "${EVAL_S:-240}"; kill -- -"$pid") > /dev/null 2>&1 & timer=$!  # ran out of device time)
  wait "$pid"; kill "$timer" 2> /dev/null; table | tee "$OUT/table.txt"
  pack_runs $RUNS
  cp /tmp/evals.jsonl "$OUT/"; tar czf "$OUT/evals.tar.gz" -C /tmp evals
  for name in $(python3 -c "
import json
rows = [json.loads(l) for l in open('/tmp/evals.jsonl')]
rows.sort(key=lambda r: -sum(r['selection'].values()))
print(' '.join(r['name'] for r in rows[:2]))"); do
    src=/tmp/soups/$name.safetensors
    [ -f "$src" ] || src=/tmp/${name%%_step_*}/snapshots/step_${name#*_step_}.safetensors
    send "$src" "${name}_"
  done
  ls -la "$OUT" ;;
esac
