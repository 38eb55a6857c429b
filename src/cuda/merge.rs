//! Launcher for kernels/merge.cu: combine (O, LSE) pairs over disjoint key sets exactly.

use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::params::{to_i32, MergeParams};
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// `out, lse_out = merge((o1, lse1), (o2, lse2))` for O `[tokens, heads, d]` (dense) and LSE
/// `[heads, tokens]` (f32, natural log): attention over the union of two disjoint key sets. The
/// split-K combine, cascade (shared prefix) and ring attention are built from it.
/// `out` may not alias the inputs (Rust's borrows already forbid it).
#[allow(clippy::too_many_arguments)]
pub fn merge_states<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    o1: &impl DevicePtr<T>,
    lse1: &impl DevicePtr<f32>,
    o2: &impl DevicePtr<T>,
    lse2: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<T>,
    lse_out: &mut impl DevicePtrMut<f32>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    gpu.check_stream(stream)?;
    let (on, ln) = (tokens * heads * head_dim, tokens * heads);
    for (what, got, needed) in [
        ("o1", o1.len(), on),
        ("o2", o2.len(), on),
        ("out", out.len(), on),
        ("lse1", lse1.len(), ln),
        ("lse2", lse2.len(), ln),
        ("lse_out", lse_out.len(), ln),
    ] {
        if got < needed {
            return Err(Error::BufferTooSmall { what, needed, got });
        }
    }
    to_i32("tokens", tokens)?;
    if heads > 65535 {
        return Err(Error::Shape { what: "merge heads", expected: "<= 65535".into(), got: heads.to_string() });
    }
    if on == 0 {
        return Ok(());
    }
    let (a, _g1) = o1.device_ptr(stream);
    let (la, _g2) = lse1.device_ptr(stream);
    let (b, _g3) = o2.device_ptr(stream);
    let (lb, _g4) = lse2.device_ptr(stream);
    let (o, _g5) = out.device_ptr_mut(stream);
    let (lo, _g6) = lse_out.device_ptr_mut(stream);
    let params = MergeParams {
        o1: a,
        lse1: la,
        o2: b,
        lse2: lb,
        out: o,
        lse_out: lo,
        tokens: tokens as i32,
        heads: heads as i32,
        head_dim: to_i32("head_dim", head_dim)?,
        pad_: 0,
    };
    let func = gpu.function(Module::Merge, &format!("merge_{}", T::NAME))?;
    let cfg = LaunchConfig { grid_dim: (tokens as u32, heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut bld = stream.launch_builder(&func);
    bld.arg(&params);
    // SAFETY: MergeParams mirrors ra::MergeParams; all six buffers were checked to hold tokens x heads rows.
    unsafe { bld.launch(cfg) }?;
    Ok(())
}
