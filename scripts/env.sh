# Build environment for cargo; `source scripts/env.sh` after scripts/setup.sh.
_U_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$(readlink -f "$_U_ROOT/.venv")"
export PATH="$VIRTUAL_ENV/bin:$PATH"            # mpicc/mpirun (MPICH wheel), cmake >= 3.26
_U_SP="$(echo "$VIRTUAL_ENV"/lib/python3*/site-packages)"
export LIBTORCH="$_U_SP/torch"                   # the pip torch 2.11.0 wheel is libtorch
export LIBTORCH_CXX11_ABI=1
# NVRTC (src/ffi/cross_entropy.rs compiles its kernel with it; libnvrtc then opens its builtins by
# name), from the CUDA wheels beside torch, as bundle/run-gpu.sh puts them on GPU machines.
for _U_NV in "$_U_SP"/nvidia/*/lib; do
  [ -e "$_U_NV/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$_U_NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LIBCLANG_PATH=/usr/lib/llvm-14/lib        # bindgen (mpi-sys)
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export HDF5_USE_FILE_LOCKING=FALSE
unset _U_ROOT _U_SP _U_NV
