//! Kernels of ulysses' own: CUDA C sources compiled at run time by NVRTC (through cudarc) for the
//! GPU's compute capability, loaded into torch's primary context and launched on torch's current
//! stream, so they are ordered with libtorch's kernels around them.
//!
//! Why NVRTC and not nvcc: the build machines have no CUDA toolkit, while every GPU machine with
//! libtorch has NVRTC (libtorch compiles its own run-time kernels with it).
use cudarc::driver::{result, sys};
use std::ffi::{c_void, CString};
use std::sync::Mutex;

/// What every kernel's source starts with: bf16 as its bits (NVRTC has no CUDA headers here), the
/// conversions rounding as c10::BFloat16 does, and −inf.
const PRELUDE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float bf16_to_float(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
  unsigned int x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);                       // round to nearest, ties to even
  return (unsigned short)(x >> 16);
}
"#;

/// One kernel: its CUDA C source (after `PRELUDE`) and its `extern "C"` entry.
pub struct Kernel {
    pub source: &'static str,
    pub entry: &'static str,
}

/// A loaded kernel (a driver handle, valid for the process).
#[derive(Clone, Copy)]
pub struct Function(sys::CUfunction);
// SAFETY: a CUfunction belongs to the process-wide primary context and is usable from any thread
// that has that context current (torch's threads do).
unsafe impl Send for Function {}

/// Per (entry, GPU ordinal): the loaded kernel, or why it could not be built (tried once).
static LOADED: Mutex<Vec<(&'static str, usize, Result<Function, String>)>> = Mutex::new(Vec::new());

impl Kernel {
    /// The kernel on GPU `gpu`, built on first use; a failure is logged once and returned again.
    pub fn function(&self, gpu: usize) -> Result<Function, String> {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, f)) = loaded.iter().find(|(e, g, _)| *e == self.entry && *g == gpu) {
            return f.clone();
        }
        let built = self.load(gpu);
        if let Err(e) = &built {
            log::warn!("kernel {} is unavailable on GPU {gpu} ({e}); the op-by-op form runs instead", self.entry);
        }
        loaded.push((self.entry, gpu, built.clone()));
        built
    }

    /// NVRTC -> PTX for the GPU's compute capability -> a module in the current (torch's
    /// primary) context.
    fn load(&self, gpu: usize) -> Result<Function, String> {
        super::cuda::current_context(gpu)?;
        let device = result::device::get(gpu as i32).map_err(|e| format!("cuDeviceGet: {e}"))?;
        // SAFETY: `device` came from cuDeviceGet.
        let attr =
            |a| unsafe { result::device::get_attribute(device, a) }.map_err(|e| format!("cuDeviceGetAttribute: {e}"));
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let ptx = self.compile(&format!("compute_{major}{minor}"))?;
        let name = CString::new(self.entry).map_err(|e| e.to_string())?;
        // SAFETY: `ptx` is NUL-terminated PTX; the module lives as long as the process.
        unsafe {
            let module = result::module::load_data(ptx.as_ptr() as *const c_void)
                .map_err(|e| format!("cuModuleLoadData: {e}"))?;
            let f = result::module::get_function(module, name).map_err(|e| format!("cuModuleGetFunction: {e}"))?;
            Ok(Function(f))
        }
    }

    /// The PTX for a virtual architecture (`compute_90`), NUL-terminated as cuModuleLoadData
    /// wants it. Needs NVRTC only, no GPU.
    pub fn compile(&self, arch: &str) -> Result<Vec<u8>, String> {
        // cudarc panics when it cannot dlopen a library: ask first.
        // SAFETY: only tries to dlopen NVRTC's names and closes what it opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("cannot load NVRTC (libnvrtc.so.13, shipped with libtorch's CUDA wheels)".into());
        }
        let options = vec![format!("--gpu-architecture={arch}")];
        let opts = cudarc::nvrtc::CompileOptions { options, ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{PRELUDE}{}", self.source), opts)
            .map_err(|e| format!("NVRTC: {e:?}"))?;
        let mut text = ptx.as_bytes().ok_or("NVRTC returned no PTX")?.to_vec();
        if text.last() != Some(&0) {
            text.push(0);
        }
        Ok(text)
    }
}

impl Function {
    /// Queues the kernel on torch's current stream of GPU `gpu`.
    ///
    /// # Safety
    /// `args` must point at values of the kernel's parameter types, in order, and every pointer
    /// among them at live device memory of the sizes the kernel reads and writes.
    pub unsafe fn launch(&self, gpu: usize, grid: u32, block: u32, args: &mut [*mut c_void]) -> Result<(), String> {
        let stream = super::cuda::current_stream(gpu).ok_or("CUDA is unavailable")?;
        // SAFETY: as the caller promises; the stream is torch's, of this context.
        unsafe { result::launch_kernel(self.0, (grid, 1, 1), (block, 1, 1), 0, stream as sys::CUstream, args) }
            .map_err(|e| format!("cuLaunchKernel: {e}"))
    }
}

/// `&mut value` as a kernel argument.
pub fn arg<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}
