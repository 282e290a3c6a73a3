#!/usr/bin/env bash
# Installs everything the build and the tests need, idempotently, on a fresh Debian 12 machine:
#   - Debian packages: libclang (bindgen for rsmpi), g++ and make
#   - a Python venv with requirements.txt (torch = the libtorch tch links, MPICH, CMake >= 3.26,
#     transformers/h5py for the tests). It lives in a cache keyed by requirements.txt's hash
#     ($ULYSSES_CACHE, default ~/.cache/ulysses) and .venv links to it, so a second checkout on the
#     same machine reuses it; delete the cache folder to start over.
# Then `source scripts/env.sh` gives cargo what it needs (the Makefile does that for you).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ULYSSES_CACHE:-$HOME/.cache/ulysses}"

need_apt=()
[ -e /usr/lib/llvm-14/lib/libclang.so ] || need_apt+=(libclang-dev)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

key="$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)"
venv="$CACHE/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating Python venv $venv (torch wheel with CUDA libraries: about 5 GB, a few minutes)"
  rm -rf "$venv"
  mkdir -p "$CACHE"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$ROOT/requirements.txt"
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$ROOT/.venv"
echo "setup: ok (.venv -> $venv)"
