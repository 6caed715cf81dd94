//! `bench kernels`: every fused kernel against its unfused candle version on seeded random
//! inputs (`kernels::reference::check_all`); exits non-zero if any case is over tolerance.

use candle_core::DType;
use clap::Args;

use crate::config::{device_name, DeviceSpec, Precision};
use crate::kernels::reference::{check_all, check_fp8};

#[derive(Debug, Args)]
pub struct KernelsArgs {
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Dtypes to check (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "f32,bf16,f16,fp8"
    )]
    pub dtypes: Vec<Precision>,
}

pub fn run(a: KernelsArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    println!(
        "| fused op ({}) | dtype | rel err vs unfused f32 | ok |",
        device_name(&device)
    );
    println!("|---|---|---|---|");
    let mut failed = 0;
    for &precision in &a.dtypes {
        let dtype = DType::from(precision);
        // f32: the kernels differ from candle's ops only in summation order and fast exp;
        // half types: one rounding of the output. fp8: the FP8 layers, each case with its own.
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let cases = match precision {
            Precision::Fp8 => check_fp8(&device)?,
            _ => check_all(&device, dtype)?
                .into_iter()
                .map(|c| (c, tol))
                .collect(),
        };
        for (case, tol) in cases {
            let ok = case.rel_err <= tol;
            failed += usize::from(!ok);
            println!(
                "| {} | {precision} | {:.2e} | {} |",
                case.name,
                case.rel_err,
                if ok { "yes" } else { "NO" }
            );
        }
    }
    anyhow::ensure!(failed == 0, "{failed} fused kernel case(s) over tolerance");
    Ok(())
}
