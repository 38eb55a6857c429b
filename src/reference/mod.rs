//! The exact CPU twin of every kernel: f64 throughout, written from the definitions in
//! SPEC.md rather than from the kernels' tricks, so that it is an independent yardstick.
//!
//! Tensor layouts match the kernels: Q `[Nq, Hq, d]`, K and V `[Nk, Hkv, d]` (token-major),
//! scores `[Hq, Nq, Nk]`, output `[Nq, Hq, d]`, log-sum-exp `[Hq, Nq]` (natural log).

mod attention;
mod gate;
mod merge;
mod qk_norm;
mod rotate;
mod scores;
mod sinusoidal;

pub use attention::{attention, attention_varlen, AttentionOutput};
pub use gate::output_gate;
pub use merge::merge;
pub use qk_norm::qk_norm_row;
pub use rotate::{rotate, rotate_head, rotate_head_mrope, rotate_mrope};
pub use scores::scores;
pub use sinusoidal::sinusoidal;

use crate::error::{Error, Result};

/// `got == expected` or a [`Error::Shape`] naming `what`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Shape { what, expected: format!("{expected} elements"), got: format!("{got}") });
    }
    Ok(())
}
