# Build environment for cargo; `source scripts/env.sh` after scripts/setup.sh.
_U_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$(readlink -f "$_U_ROOT/.venv")"
export PATH="$VIRTUAL_ENV/bin:$PATH"            # mpicc/mpirun (MPICH wheel), cmake >= 3.26
_U_SP="$(echo "$VIRTUAL_ENV"/lib/python3*/site-packages)"
export LIBTORCH="$_U_SP/torch"                   # the pip torch 2.11.0 wheel is libtorch
export LIBTORCH_CXX11_ABI=1
export LIBCLANG_PATH=/usr/lib/llvm-14/lib        # bindgen (mpi-sys)
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export HDF5_USE_FILE_LOCKING=FALSE
unset _U_ROOT _U_SP
