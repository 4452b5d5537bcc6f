#!/usr/bin/env bash
# Set up fastsam3d on a fresh Debian machine with Python 3.11 (no torch needed beforehand).
#   bash scripts/setup.sh          the package and its CLI (CPU torch)
#   bash scripts/setup.sh --dev    everything for the tests: all extras + Debian packages for Xvfb
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--dev" ]; then
  # napari's 3D canvas needs a real X server (Xvfb) and GL; offscreen Qt cannot draw it.
  debs="xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
libxcb-cursor0 libdbus-1-3 libfontconfig1"
  missing=""
  for p in $debs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
  fi
  extras="[all]"
else
  extras=""
fi

# The CPU wheel first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".$extras"
