//! Launcher for kernels/merge.cu: combine (O, LSE) pairs over disjoint key sets exactly.

use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{to_i32, GateArgs, MergeParams};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
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
    merge(gpu, stream, o1, lse1, o2, lse2, None::<(&CudaSlice<T>, &OutputGate)>, out, lse_out, tokens, heads, head_dim)
}

/// [`merge_states`] with the output gate fused into the merged rows (the last merge of a
/// cascade: shared prefix, then each sequence's own keys), as
/// [`attention_fwd_gated`](super::attention_fwd_gated) takes it: row `t` of `out` reads the gates
/// of row `t`. `lse_out` is the merged attention's, ungated; gate only the last merge.
#[allow(clippy::too_many_arguments)]
pub fn merge_states_gated<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    o1: &impl DevicePtr<T>,
    lse1: &impl DevicePtr<f32>,
    o2: &impl DevicePtr<T>,
    lse2: &impl DevicePtr<f32>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut impl DevicePtrMut<T>,
    lse_out: &mut impl DevicePtrMut<f32>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    merge(gpu, stream, o1, lse1, o2, lse2, Some((gate, layout)), out, lse_out, tokens, heads, head_dim)
}

#[allow(clippy::too_many_arguments)]
fn merge<T: Dtype, G: DevicePtr<T>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    o1: &impl DevicePtr<T>,
    lse1: &impl DevicePtr<f32>,
    o2: &impl DevicePtr<T>,
    lse2: &impl DevicePtr<f32>,
    gate: Option<(&G, &OutputGate)>,
    out: &mut impl DevicePtrMut<T>,
    lse_out: &mut impl DevicePtrMut<f32>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    let be = OnStream::new(gpu, stream)?;
    let shape = MergeShape { tokens, heads, head_dim };
    shape.check([o1.len(), lse1.len(), o2.len(), lse2.len(), out.len(), lse_out.len()])?;
    let out_len = out.len();
    let (a, _g1) = o1.device_ptr(stream);
    let (la, _g2) = lse1.device_ptr(stream);
    let (b, _g3) = o2.device_ptr(stream);
    let (lb, _g4) = lse2.device_ptr(stream);
    let (o, _g5) = out.device_ptr_mut(stream);
    let (lo, _g6) = lse_out.device_ptr_mut(stream);
    let (gate, _g7) = GateArgs::on_stream::<T, _>(gate, (tokens, heads, head_dim), stream, o, out_len)?;
    launch_merge::<T, _>(&be, [a, la, b, lb, o, lo], gate, &shape)
}

/// `[tokens, heads, head_dim]` states to merge.
pub(crate) struct MergeShape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl MergeShape {
    /// Validate lengths `[o1, lse1, o2, lse2, out, lse_out]` (elements).
    pub(crate) fn check(&self, lens: [usize; 6]) -> Result<()> {
        let (on, ln) = (self.tokens * self.heads * self.head_dim, self.tokens * self.heads);
        let names = ["o1", "lse1", "o2", "lse2", "out", "lse_out"];
        for (i, (what, got)) in names.into_iter().zip(lens).enumerate() {
            let needed = if i % 2 == 0 { on } else { ln };
            if got < needed {
                return Err(Error::BufferTooSmall { what, needed, got });
            }
        }
        to_i32("tokens", self.tokens)?;
        to_i32("head_dim", self.head_dim)?;
        if self.heads > 65535 {
            return Err(Error::Shape { what: "merge heads", expected: "<= 65535".into(), got: self.heads.to_string() });
        }
        Ok(())
    }
}

/// Plan and run a merge on buffers `[o1, lse1, o2, lse2, out, lse_out]` that [`MergeShape::check`] accepted.
pub(crate) fn launch_merge<T: Dtype, B: Backend>(be: &B, [o1, lse1, o2, lse2, out, lse_out]: [u64; 6], gate: GateArgs, s: &MergeShape) -> Result<()> {
    if s.tokens * s.heads * s.head_dim == 0 {
        return Ok(());
    }
    let params = MergeParams {
        o1,
        lse1,
        o2,
        lse2,
        out,
        lse_out,
        tokens: s.tokens as i32,
        heads: s.heads as i32,
        head_dim: s.head_dim as i32,
        pad_: 0,
        gate,
    };
    // All six buffers were checked to hold tokens x heads rows.
    let name = format!("merge_{}", T::NAME);
    be.run(&Launch { module: Module::Merge, name, grid: (s.tokens as u32, s.heads as u32, 1), threads: 128, smem: 0, params })
}
