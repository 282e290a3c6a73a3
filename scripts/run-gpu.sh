#!/usr/bin/env bash
# Runs ulysses from a bundle (scripts/make-bundle.sh) on a GPU machine that has PyTorch 2.11
# (CUDA 13 wheels) but no Rust: one rank per GPU under the bundled MPICH.
#   bash bundle/run-gpu.sh comm-check --backend nccl      # NGPU ranks (default: every GPU)
#   NGPU=2 bash bundle/run-gpu.sh experiments/tiny.toml
#   bash bundle/run-gpu.sh --exec bundle/tests/store --ignored gpu_   # a bundled test binary
# TORCH_PY names the Python whose torch provides libtorch, CUDA and NCCL.
set -u
B="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${TORCH_PY:-/opt/torch/.venv/bin/python3}"

# Shared GPU hosts: NVLink multicast (NVLS) must stay off, whatever the caller exported.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

read -r TORCH_LIB GPUS TORCH_VERSION < <("$PY" -c '
import os, torch
print(os.path.dirname(torch.__file__) + "/lib", torch.cuda.device_count(), torch.__version__)') \
  || { echo "run-gpu.sh: cannot import torch with $PY (set TORCH_PY)" >&2; exit 2; }
SITE="$(dirname "$(dirname "$TORCH_LIB")")"
NGPU="${NGPU:-$(( GPUS > 0 ? GPUS : 1 ))}"

# torch's own libraries carry RPATHs to site-packages/nvidia/*/lib, but NCCL is dlopened by
# cudarc, which tries libnccl.so, libnccl.so.13, ... and never libnccl.so.2, the only name the
# nvidia-nccl wheel ships: a libnccl.so symlink to torch's copy (same file, so one NCCL in the
# process) in a private folder fixes that.
NV_LIBS=""
for d in "$SITE"/nvidia/*/lib; do [ -d "$d" ] && NV_LIBS="$NV_LIBS:$d"; done
LINKS="$(mktemp -d "${TMPDIR:-/tmp}/ulysses-libs.XXXXXX")"
trap 'rm -rf "$LINKS"' EXIT
NCCL_SO="$SITE/nvidia/nccl/lib/libnccl.so.2"
if [ -e "$NCCL_SO" ]; then ln -s "$NCCL_SO" "$LINKS/libnccl.so"; else echo "run-gpu.sh: no $NCCL_SO (the nccl backend will not load)" >&2; fi

export LD_LIBRARY_PATH="$LINKS:$TORCH_LIB$NV_LIBS:$B/mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$B/mpich/bin:$PATH"          # hydra finds hydra_pmi_proxy next to mpirun
export HYDRA_LAUNCHER=fork                # one node: no ssh
export FI_PROVIDER="${FI_PROVIDER:-tcp}"  # libfabric: don't probe HPC NICs the host lacks
export MPIR_CVAR_CH4_NETMOD="${MPIR_CVAR_CH4_NETMOD:-ofi}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

if [ "${1:-}" = "--exec" ]; then  # another bundled program (a test binary) in this environment, one process
  shift
  exec "$@"
fi
echo "== run-gpu.sh: torch $TORCH_VERSION ($TORCH_LIB), $GPUS GPU(s), $NGPU rank(s): ulysses $*"
"$B/mpich/bin/mpirun" -n "$NGPU" "$B/ulysses" "$@"
rc=$?
if [ $rc -ne 0 ]; then
  echo "== run-gpu.sh: ulysses exited with $rc; environment for the report:"
  uname -r; ldd --version | head -1
  nvidia-smi -L 2>&1 | head -8
  ldd "$B/ulysses" | awk '/not found/ || $1 ~ /^lib(torch_cuda|mpi|nccl)/'
  ls -l "$LINKS" "$SITE"/nvidia 2>&1 | head -30
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
exit $rc
