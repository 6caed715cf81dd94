//! With the `cuda` feature, compiles each op family's .cu file under src/kernels to PTX with
//! the nvcc that candle's kernels are built with (CUDA_HOME/bin or PATH), for CUDA_COMPUTE_CAP
//! (default 90: H100). The tiling constants come from src/kernels/tiling.rs as `-D` defines, so
//! kernels and launchers share one definition.

mod tiling {
    #![allow(dead_code)]
    include!("src/kernels/tiling.rs");
}

/// Each .cu file and the PTX it becomes in OUT_DIR (src/kernels/launch.rs, `ptx!`).
const SOURCES: [(&str, &str); 5] = [
    ("src/kernels/attention/attention.cu", "attention.ptx"),
    ("src/kernels/attention/flash.cu", "flash.ptx"),
    ("src/kernels/conv/conv.cu", "conv.ptx"),
    ("src/kernels/linear/linear.cu", "linear.ptx"),
    ("src/kernels/norm/norm.cu", "norm.ptx"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/kernels/tiling.rs");
    println!("cargo:rerun-if-changed=src/kernels/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var("CUDA_HOME")
        .map(|home| std::path::Path::new(&home).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    // The files are independent: compile them side by side.
    let jobs: Vec<_> = SOURCES
        .iter()
        .map(|&(src, ptx)| {
            println!("cargo:rerun-if-changed={src}");
            let child = std::process::Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch=sm_{cap}"))
                .args(
                    tiling::CUDA_DEFINES
                        .iter()
                        .map(|(k, v)| format!("-D{k}={v}")),
                )
                .arg(src)
                .arg("-o")
                .arg(out_dir.join(ptx))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            (src, child)
        })
        .collect();
    for (src, mut child) in jobs {
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("nvcc on {src}: {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
