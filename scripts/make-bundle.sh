#!/usr/bin/env bash
# Packs what a GPU machine with torch but no Rust needs into bundle/: the ulysses binary
# (stripped), the MPICH runtime it was linked against, and run-gpu.sh. Plain files only, so the
# folder survives any copy. Run after `cargo build` (or `cargo build --release`, then pass release).
#   bash scripts/make-bundle.sh [debug|release]      (default debug: the dev profile is optimised)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${1:-debug}"
BIN="$ROOT/target/$PROFILE/ulysses"
VENV="$(readlink -f "$ROOT/.venv")"
OUT="$ROOT/bundle"
LIMIT_MIB=64

[ -x "$BIN" ] || { echo "no $BIN: run \`source scripts/env.sh && cargo build\` first" >&2; exit 1; }
[ -x "$VENV/bin/mpiexec.hydra" ] || { echo "no MPICH in $VENV: run scripts/setup.sh" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/mpich/bin" "$OUT/mpich/lib"
cp "$BIN" "$OUT/ulysses"
strip "$OUT/ulysses"
# The MPICH wheel's runtime: the hydra launcher and its proxy (found next to mpirun), libmpi and
# the libfabric/UCX copies it loads from $ORIGIN/mpich (its RUNPATH).
cp "$VENV/bin/mpiexec.hydra" "$OUT/mpich/bin/mpirun"
cp "$VENV/bin/hydra_pmi_proxy" "$OUT/mpich/bin/"
cp "$VENV/lib/libmpi.so.12" "$OUT/mpich/lib/"
cp -rL "$VENV/lib/mpich" "$OUT/mpich/lib/mpich"
cp "$ROOT/scripts/run-gpu.sh" "$OUT/"
# The GPU tests bundled as test binaries (#[ignore]d on machines without CUDA), run by
# tests/gpu/run.sh: the activation store's side-stream copies (tests/store.rs), the masked
# attention kernels (tests/masked_attention.rs), LoRA's dropout masks on CUDA
# (tests/lora_step.rs), the LM head and loss by hand against autograd (tests/head_loss.rs) and the
# fused elementwise kernels (tests/fused_elementwise.rs); the newest build of each.
mkdir -p "$OUT/tests"
for TEST in store masked_attention lora_step head_loss fused_elementwise; do
  TEST_BIN="$(ls -t "$ROOT/target/$PROFILE"/deps/$TEST-* 2>/dev/null | grep -v '\.d$' | head -1)"
  [ -n "$TEST_BIN" ] || { echo "no $TEST test binary: run \`cargo build --tests\` first" >&2; exit 1; }
  cp "$TEST_BIN" "$OUT/tests/$TEST"
  strip "$OUT/tests/$TEST"
  chmod +x "$OUT/tests/$TEST"
done
chmod +x "$OUT/ulysses" "$OUT/run-gpu.sh" "$OUT"/mpich/bin/*

links="$(find "$OUT" ! -type f ! -type d)"
[ -z "$links" ] || { echo "bundle holds non-plain files:"$'\n'"$links" >&2; exit 1; }
bytes="$(du -sb "$OUT" | cut -f1)"
mib=$(( (bytes + 1048575) / 1048576 ))
echo "bundle: $OUT, $mib MiB ($PROFILE build)"
[ "$mib" -le "$LIMIT_MIB" ] || { echo "bundle is $mib MiB, over the $LIMIT_MIB MiB a device call carries" >&2; exit 1; }
