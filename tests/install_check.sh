#!/usr/bin/env bash
# `make install-check`: mmgrad installed as a user installs it, into a fresh venv that already
# has its own torch (2.13.0, CPU), with no flags:
#   1. `pip install <clean clone>`: pip's isolated build must not pull a second torch; the
#      cpu kernels compile on first use;
#   2. `pip install <wheel>` built from the clone (the compiled kernels cached by 1 load at once);
#   3. the wheel where no compiler is found (CXX=false): one warning, the reference backend.
# Each imports mmgrad from outside the checkout, lists the backends and trains three steps
# (tests/install_smoke.py). Prints the time of each step.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$ROOT/build/install-check}"
TORCH="${MMGRAD_CHECK_TORCH:-torch==2.13.0}"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
git clone -q "$ROOT" clone
python3 -m venv venv
venv/bin/pip install -q "$TORCH" numpy tqdm
before="$(venv/bin/python -c 'import torch; print(torch.__version__)')"
timed() { local t0=$SECONDS; "$@"; echo "install-check: '$*' took $((SECONDS - t0)) s"; }

timed venv/bin/pip install -q ./clone
after="$(venv/bin/python -c 'import torch; print(torch.__version__)')"
[ "$before" = "$after" ] || { echo "install-check: pip replaced torch $before with $after"; exit 1; }
MMGRAD_CACHE="$WORK/cache" timed venv/bin/python "$ROOT/tests/install_smoke.py" cpu

timed venv/bin/pip wheel -q --no-deps -w dist ./clone
venv/bin/pip uninstall -q -y mmgrad
timed venv/bin/pip install -q dist/mmgrad-*.whl
MMGRAD_CACHE="$WORK/cache" timed venv/bin/python "$ROOT/tests/install_smoke.py" cpu
CXX=false MMGRAD_CACHE="$WORK/cache-no-compiler" timed venv/bin/python "$ROOT/tests/install_smoke.py" reference
echo "install-check: passed (torch $after kept; from a clone and from the wheel; without a compiler)"
