"""Compiles the fused elementwise functors (ffi::elementwise::code, written by the Rust test to a
file) with NVRTC as libtorch's jiterator does, without a GPU: jiterator's options (C++17, device
code by default), its bf16 type (a struct converting to and from float, rounding to nearest even)
when the tensors are bf16, and each entry called the way jiterator's kernel calls it:
`name<float>(inputs..., outputs...)` with the inputs in the tensors' dtype and float outputs
stored back in it. NVRTC comes from the venv's CUDA wheels (torch's own).

    nvrtc_compile.py CODE_FILE STORAGE PTX_OUT name:inputs:outputs ...
Exits 0 and writes the PTX, or prints NVRTC's log and exits 1."""
import ctypes
import glob
import os
import sys
import sysconfig

code_file, storage, ptx_out, *entries = sys.argv[1:]
libs = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib", "libnvrtc.so.*")))
libs = [l for l in libs if ".alt." not in l]
if not libs:
    sys.exit("no libnvrtc.so.* under the venv's nvidia/*/lib (torch's CUDA wheels)")
lib_dir = os.path.dirname(libs[0])
# NVRTC opens its builtins by soname: load them first so it finds them without LD_LIBRARY_PATH.
for builtins in glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so.*")):
    if ".alt." not in builtins:
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
nvrtc = ctypes.CDLL(libs[0])

# jiterator's at::BFloat16 (aten/src/ATen/native/cuda/jit_utils.cpp), its sm_80+ branch.
BFLOAT16 = r"""
namespace at {
struct alignas(2) BFloat16 {
  unsigned short x;
  BFloat16() = default;
  inline __host__ __device__ BFloat16(float value) {
    asm("{  cvt.rn.bf16.f32 %0, %1;}\n" : "=h"(x) : "f"(value));
  }
  inline __host__ __device__ operator float() const {
    float val;
    asm("{ mov.b32 %0, {0,%1};}\n" : "=f"(val) : "h"(x));
    return val;
  }
};
}
"""

kernels = []
for entry in entries:
    name, n_in, n_out = entry.split(":")
    n_in, n_out = int(n_in), int(n_out)
    params = [f"const {storage}* in{i}" for i in range(n_in)] + [f"{storage}* out{i}" for i in range(n_out)]
    args = ", ".join(f"in{i}[j]" for i in range(n_in))
    temps = ", ".join(f"t{i}" for i in range(n_out))
    stores = " ".join(f"out{i}[j] = t{i};" for i in range(n_out))
    kernels.append(
        f'extern "C" __global__ void {name}_kernel(int n, {", ".join(params)}) {{\n'
        f"  int j = blockIdx.x * blockDim.x + threadIdx.x;\n"
        f"  if (j < n) {{ float {temps}; {name}<float>({args}, {temps}); {stores} }}\n}}\n"
    )
source = (BFLOAT16 if storage == "at::BFloat16" else "") + open(code_file).read() + "\n" + "".join(kernels)

program = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"fused.cu", 0, None, None) == 0
options = [b"--std=c++17", b"--gpu-architecture=compute_90", b"-default-device", b"-DNDEBUG"]
rc = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(program, log)
if rc != 0:
    print(source)
    print(log.value.decode())
    sys.exit(1)
nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(program, ptx)
with open(ptx_out, "w") as f:
    f.write(ptx.value.decode())
