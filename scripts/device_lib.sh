# Shell functions the device scripts share (sourced by device_study.sh and device_distill.sh).
# Runs live in /tmp/NAME (log.csv, val.csv, state.json, stdout.txt); what comes back goes to $OUT.

pack_runs() {  # RUN...: the runs' logs as $OUT/runs.tar.gz
  tar czf "$OUT/runs.tar.gz" -C /tmp $(for r in "$@"; do echo "$r/log.csv $r/val.csv $r/state.json $r/stdout.txt"; done)
}

fetch() {  # RUN/NAME...: int8 copies in 15 MiB parts (the tool returns files up to 16 MiB and
  # 64 MiB a call: two int8 models); rejoin with `cat RUN_NAME_part_* > RUN_NAME.safetensors`
  for w in "$@"; do
    python3 -m fastsam3d convert "/tmp/$w.safetensors" "/tmp/${w/\//_}.int8.safetensors" --dtype int8 \
      && split -b 15m "/tmp/${w/\//_}.int8.safetensors" "$OUT/${w/\//_}_part_"
  done
  ls -la "$OUT"
}
