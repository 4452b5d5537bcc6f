# Shell functions the device scripts share (sourced by device_train.sh, device_study.sh,
# device_distill.sh, device_multimask.sh and the others). Runs live in /tmp/NAME (log.csv,
# val.csv, state.json, stdout.txt); what comes back goes to $OUT. $RUNS names the script's runs.

set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

gpu_info() { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; }

v5_recipe() {  # MIN: COMMON = v5's data and click recipe (real cases, synthetic settings, batch
  # 16 x 4 targets, 5 rounds, box 0.2) for MIN minutes, with validation on the selection set
  # when it was carried
  COMMON=(--cases .device_carry/real_train.safetensors --steps 1000000 --batch-size 16
    --targets 4 --pool 384 --rounds 5 --box-prob 0.2 --real-fraction 0.25 --seed 0
    --save-every 400 --synthetic planes=0.5 --synthetic structures=24 --synthetic min_radius=1.5
    --max-minutes "$1")
  if [ -f .device_carry/val_select.safetensors ]; then
    COMMON+=(--val-cases .device_carry/val_select.safetensors --val-every 150)
  fi
}

launch() {  # NAME COMMAND ARGS...: `fastsam3d COMMAND ${COMMON[@]} ARGS --out /tmp/NAME --overwrite`,
  # detached (setsid: it goes on between device calls; still this shell's child, so `wait` works);
  # ARGS come after COMMON, so a run's own option overrides the recipe's
  local name=$1 cmd=$2; shift 2
  setsid python3 -m fastsam3d "$cmd" "${COMMON[@]}" "$@" --out "/tmp/$name" --overwrite \
    > "/tmp/$name.stdout" 2>&1 < /dev/null &
}

progress() {  # the last progress line and validation rows of each run
  for r in $RUNS; do
    echo "== $r $(tail -c 400 "/tmp/$r.stdout" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"
    tail -2 "/tmp/$r/val.csv" 2>/dev/null
  done
}

wait_runs() {  # until every training process has ended
  while pgrep -f "fastsam3d (train|finetune|distill)" > /dev/null; do sleep 5; done
}

pack_runs() {  # RUN...: the runs' logs (and console output) as $OUT/runs.tar.gz
  for r in "$@"; do cp "/tmp/$r.stdout" "/tmp/$r/stdout.txt" 2>/dev/null; done
  tar czf "$OUT/runs.tar.gz" -C /tmp $(for r in "$@"; do for f in log.csv val.csv state.json stdout.txt; do
    [ -f "/tmp/$r/$f" ] && echo "$r/$f"; done; done)
}

send() {  # WEIGHTS PREFIX [DTYPE]: WEIGHTS converted to DTYPE (int8) beside itself and split into
  # 15 MiB parts $OUT/PREFIXpart_* (the tool returns files up to 16 MiB and 64 MiB a call: two
  # int8 models); rejoin with `cat PREFIXpart_* > NAME.safetensors`
  local dtype=${3:-int8}
  local out="${1%.safetensors}.$dtype.safetensors"
  python3 -m fastsam3d convert "$1" "$out" --dtype "$dtype" --overwrite && split -b 15m "$out" "$OUT/${2}part_"
}

fetch() {  # RUN/NAME...: int8 copies as $OUT/RUN_NAME_part_*
  for w in "$@"; do send "/tmp/$w.safetensors" "${w/\//_}_"; done
  ls -la "$OUT"
}

fetch_decoder() {  # RUN/NAME...: the prompt encoder + mask decoder only, fp16 (~15 MB each), of
  # runs whose image encoder stayed frozen; `python scripts/merge_decoder.py` makes a model again
  for w in "$@"; do
    python3 - "/tmp/$w.safetensors" "$OUT/${w/\//_}.decoder.safetensors" <<'PY'
import sys
from safetensors import safe_open
from safetensors.torch import save_file
with safe_open(sys.argv[1], "pt") as f:
    keep = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("image_encoder.")}
    meta = f.metadata()
save_file({k: v.half() if v.is_floating_point() else v for k, v in keep.items()}, sys.argv[2], meta)
PY
  done
  ls -la "$OUT"
}
