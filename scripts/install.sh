#!/usr/bin/env bash
# `make install`: puts `ulysses` and the MPICH `mpirun` it was built with on your PATH, as two small
# wrapper scripts in PREFIX/bin (default ~/.local/bin) that run this checkout's binary and its
# venv's launcher (hydra finds its proxy next to itself, so it is run in place, not copied). The
# launcher is installed as `ulysses-mpirun`, never as `mpirun`: ~/.local/bin comes early on PATH,
# and a cluster's own MPI (its `mpirun`, what its other programs were built with) must stay first.
#   bash scripts/install.sh [PREFIX] [BINARY]     (BINARY: default target/debug/ulysses)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${1:-$HOME/.local}"
BINARY="$(readlink -f "${2:-$ROOT/target/debug/ulysses}")"
MPIRUN="$(readlink -f "$ROOT/.venv")/bin/mpirun"
[ -x "$BINARY" ] || { echo "install: no $BINARY; build it first (make build)" >&2; exit 1; }
[ -x "$MPIRUN" ] || { echo "install: no $MPIRUN; run scripts/setup.sh (make setup) first" >&2; exit 1; }
mkdir -p "$PREFIX/bin"
for pair in "ulysses:$BINARY" "ulysses-mpirun:$MPIRUN"; do
  name="${pair%%:*}" target="${pair#*:}"
  printf '#!/bin/sh\n# Installed by %s/scripts/install.sh\nexec "%s" "$@"\n' "$ROOT" "$target" > "$PREFIX/bin/$name"
  chmod +x "$PREFIX/bin/$name"
  echo "install: $PREFIX/bin/$name -> $target"
done
case ":$PATH:" in
  *":$PREFIX/bin:"*) echo "install: $PREFIX/bin is on your PATH: run \`ulysses --help\` and \`ulysses-mpirun -n 4 ulysses train experiments/tiny.toml\`" ;;
  *) echo "install: $PREFIX/bin is not on your PATH; add it (e.g. to ~/.bashrc):"
     echo "  export PATH=\"$PREFIX/bin:\$PATH\"" ;;
esac
echo "install: the launcher is \`ulysses-mpirun\` (MPICH of this build), so it does not hide another \`mpirun\` on your PATH"
