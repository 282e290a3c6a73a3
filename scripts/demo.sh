#!/usr/bin/env bash
# The README demo: synthetic passkey data (made once), then a tiny Llama trained on CPU with
# sp = 2 × dp = 2 under mpirun; metrics and the final model land in runs/tiny-demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
BIN=target/debug/ulysses
if [ ! -e data/passkey-tiny ]; then
  "$BIN" data synth --task passkey --seq-len 1024 --num 256 --seed 7 --out data/passkey-tiny
fi
"$BIN" check experiments/tiny.toml --world-size 4
mpirun -n 4 "$BIN" experiments/tiny.toml
