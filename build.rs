//! With the `cuda` feature, compiles each op family's .cu file under src/kernels to PTX with
//! the nvcc that candle's kernels are built with (CUDA_HOME/bin or PATH), for CUDA_COMPUTE_CAP
//! (default 90: H100), then the PTX to a fat binary holding the machine code for that capability
//! and the PTX (what the binary embeds: `kernels::launch::Module`; the driver then compiles
//! nothing at run time on that architecture). The tiling constants come from
//! src/kernels/tiling.rs as `-D` defines, so kernels and launchers share one definition.
//! flash_sm90.cu (wgmma) is compiled only for 90, with sm_90a; for other caps its PTX and fat
//! binary are empty and the launcher never picks it.

mod tiling {
    #![allow(dead_code)]
    include!("src/kernels/tiling.rs");
}

/// Each .cu file and the PTX it becomes in OUT_DIR (its fat binary: the same name with
/// `.fatbin`; src/kernels/launch.rs, `module!`), for every compute capability.
const SOURCES: [(&str, &str); 7] = [
    ("src/kernels/attention/attention.cu", "attention.ptx"),
    ("src/kernels/attention/flash.cu", "flash.ptx"),
    ("src/kernels/conv/conv.cu", "conv.ptx"),
    ("src/kernels/fp8/fp8.cu", "fp8.ptx"),
    ("src/kernels/linear/linear.cu", "linear.ptx"),
    ("src/kernels/norm/norm.cu", "norm.ptx"),
    ("src/kernels/step/step.cu", "step.ptx"),
];

/// The Hopper-only file (wgmma needs the architecture-specific sm_90a target).
const SM90_SOURCE: (&str, &str) = ("src/kernels/attention/flash_sm90.cu", "flash_sm90.ptx");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/kernels/tiling.rs");
    println!("cargo:rerun-if-changed=src/kernels/common.cuh");
    println!("cargo:rerun-if-changed=src/kernels/mma.cuh");
    println!("cargo:rerun-if-changed=src/kernels/attention/softmax.cuh");
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
    println!("cargo:rerun-if-changed={}", SM90_SOURCE.0);
    let sm90 = cap == "90";
    let sm90_ptx = out_dir.join(SM90_SOURCE.1);
    if !sm90 {
        for empty in [sm90_ptx.clone(), sm90_ptx.with_extension("fatbin")] {
            std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{}: {e}", empty.display()));
        }
    }
    let sources: Vec<_> = SOURCES
        .iter()
        .map(|&(src, ptx)| (src, ptx, cap.clone()))
        .chain(sm90.then(|| (SM90_SOURCE.0, SM90_SOURCE.1, "90a".to_string())))
        .collect();
    // The files are independent: compile them side by side.
    let jobs: Vec<_> = sources
        .iter()
        .map(|(src, ptx, arch)| {
            println!("cargo:rerun-if-changed={src}");
            let child = std::process::Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch=sm_{arch}"))
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
    wait_all(jobs);
    // Machine code and PTX for the capability, from the PTX (ptxas only: the C++ is not
    // compiled twice).
    let jobs: Vec<_> = sources
        .iter()
        .map(|(src, ptx, arch)| {
            let ptx = out_dir.join(ptx);
            let child = std::process::Command::new(&nvcc)
                .arg("--fatbin")
                .arg(format!(
                    "-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
                ))
                .arg(&ptx)
                .arg("-o")
                .arg(ptx.with_extension("fatbin"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            (src, child)
        })
        .collect();
    wait_all(jobs);
    check_flash_head_dims(&out_dir.join("flash.ptx"));
    if sm90 {
        check_flash90_head_dims(&sm90_ptx);
    }
}

/// Waits for every nvcc run; a failed one fails the build, naming its source.
fn wait_all(jobs: Vec<(&&str, std::process::Child)>) {
    for (src, mut child) in jobs {
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("nvcc on {src}: {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}

/// flash_sm90.cu instantiates a kernel per padded head dim up to ATT90_MAX_HDP and variant of
/// ATT90_VARIANTS by hand, as flash.cu; fail the build when its list differs from tiling.rs.
fn check_flash90_head_dims(ptx: &std::path::Path) {
    let text = std::fs::read_to_string(ptx).unwrap_or_else(|e| panic!("{}: {e}", ptx.display()));
    let hdps: Vec<usize> = tiling::ATT_HEAD_DIMS
        .into_iter()
        .filter(|&h| h <= tiling::ATT90_MAX_HDP)
        .collect();
    for &hdp in &hdps {
        for variant in tiling::ATT90_VARIANTS {
            for dtype in ["bf16", "f16"] {
                let entry = format!(".entry attention90_{hdp}_{}_{dtype}(", variant.name());
                assert!(
                    text.contains(&entry),
                    "flash_sm90.cu lacks {entry} (tiling.rs ATT_HEAD_DIMS, ATT90_VARIANTS)"
                );
            }
        }
    }
    assert_eq!(
        text.matches(".entry attention90_").count(),
        2 * tiling::ATT90_VARIANTS.len() * hdps.len(),
        "flash_sm90.cu has head dims or variants tiling.rs lacks"
    );
}

/// flash.cu instantiates its kernel per padded head dim by hand; the launcher picks among
/// tiling.rs's ATT_HEAD_DIMS. Fail the build when the two lists differ.
fn check_flash_head_dims(ptx: &std::path::Path) {
    let text = std::fs::read_to_string(ptx).unwrap_or_else(|e| panic!("{}: {e}", ptx.display()));
    for hdp in tiling::ATT_HEAD_DIMS {
        let tiling = if hdp <= tiling::ATT_B_MAX_HDP {
            "b"
        } else {
            "a"
        };
        // Tiling "b" comes with its small-grid twin "s".
        let names: &[&str] = if tiling == "b" { &["b", "s"] } else { &["a"] };
        for name in names {
            for dtype in ["bf16", "f16"] {
                let entry = format!(".entry attention_{hdp}{name}_{dtype}(");
                assert!(
                    text.contains(&entry),
                    "flash.cu lacks {entry} (tiling.rs ATT_HEAD_DIMS)"
                );
            }
        }
    }
    let small = tiling::ATT_HEAD_DIMS
        .into_iter()
        .filter(|&h| h <= tiling::ATT_B_MAX_HDP)
        .count();
    let entries = text.matches(".entry attention_").count();
    assert_eq!(
        entries,
        2 * (tiling::ATT_HEAD_DIMS.len() + small),
        "flash.cu has head dims tiling.rs lacks"
    );
}
