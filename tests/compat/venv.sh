#!/usr/bin/env bash
# A Python venv with an older transformers for the compatibility tests; prints its python.
#   bash tests/compat/venv.sh tests/compat/transformers-4.46.txt
# It installs only the list's packages (about 15 MB, no torch): torch, numpy and safetensors come
# from the test venv (.venv) through a .pth file, after this venv's own packages. Cached like
# scripts/setup.sh's venv: in $ULYSSES_CACHE (default ~/.cache/ulysses), keyed by the list and the
# test venv it extends.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LIST="$(readlink -f "$1")"
BASE="$(readlink -f "$ROOT/.venv")"
[ -x "$BASE/bin/python" ] || { echo "compat venv: no $ROOT/.venv; run scripts/setup.sh first" >&2; exit 1; }
CACHE="${ULYSSES_CACHE:-$HOME/.cache/ulysses}"
key="$( (cat "$LIST"; echo "$BASE") | sha256sum | cut -c1-16)"
venv="$CACHE/compat-$(basename "$LIST" .txt)-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "compat venv: creating $venv from $LIST" >&2
  rm -rf "$venv"
  mkdir -p "$CACHE"
  "$BASE/bin/python" -m venv "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/ulysses-test-venv.pth"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$LIST" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
