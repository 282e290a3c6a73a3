//! Compiles shim/*.cpp (what tch 0.24 does not expose) against libtorch's headers and sets the
//! link flags that make the binary run with no environment set up by the user.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.cpp");
    println!("cargo:rerun-if-changed=shim/cuda_shim.cpp");
    println!("cargo:rerun-if-changed=shim/attention.cpp");
    println!("cargo:rerun-if-changed=shim/transfer.cpp");
    println!("cargo:rerun-if-changed=shim/profiler.cpp");
    println!("cargo:rerun-if-changed=shim/elementwise.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=ULYSSES_RPATH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    // torch-sys (links = "tch") exports DEP_TCH_LIBTORCH_LIB = <libtorch>/lib to direct dependents.
    let libtorch_lib = env::var("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|_| env::var("LIBTORCH").map(|l| PathBuf::from(l).join("lib")))
        .expect("LIBTORCH is not set: run `make setup` (scripts/setup.sh) and `source scripts/env.sh`");
    let root = libtorch_lib.parent().expect("libtorch lib dir has a parent").to_path_buf();
    // Recorded in metrics.h5 and checkpoints; the pip wheel says it in torch/version.py.
    let version = std::fs::read_to_string(root.join("version.py")).unwrap_or_default();
    if let Some(v) = version.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
        println!("cargo:rustc-env=ULYSSES_LIBTORCH_VERSION={}", v.trim_matches(['\'', '"']));
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("shim/shim.cpp")
        .file("shim/cuda_shim.cpp")
        .file("shim/attention.cpp")
        .file("shim/transfer.cpp")
        .file("shim/profiler.cpp")
        .file("shim/elementwise.cpp")
        .compile("ulysses_shim");
    // rustc links with --as-needed, which drops libtorch_cuda.so (no Rust symbol references it)
    // and torch then silently reports no CUDA. The `-as-needed` link modifier is nightly-only.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
    println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
    // RUNPATH (not RPATH, so LD_LIBRARY_PATH still wins on GPU nodes) to the build machine's torch
    // and MPI, so `target/*/ulysses` runs without exporting anything. ULYSSES_RPATH adds more.
    let mut rpath = vec![libtorch_lib.display().to_string()];
    if let Ok(venv) = env::var("VIRTUAL_ENV") {
        rpath.push(format!("{venv}/lib"));
        // The tests launch multi-rank jobs with the MPICH that the binary was linked against.
        println!("cargo:rustc-env=ULYSSES_MPIRUN={venv}/bin/mpirun");
        println!("cargo:rustc-env=ULYSSES_PYTHON={venv}/bin/python3");
    }
    if let Ok(extra) = env::var("ULYSSES_RPATH") {
        rpath.extend(extra.split(':').filter(|s| !s.is_empty()).map(String::from));
    }
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}", rpath.join(":"));
}
