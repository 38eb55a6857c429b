//! The gated query of Qwen3-Next and Qwen3.5 (and their MoE and VL text models): `q_proj`
//! emits, per token and head, the query's head_dim components and then the head's output gate
//! (transformers: `torch.chunk(q_proj(x).view(..., heads, 2 * head_dim), 2, dim=-1)`), and the
//! attention's output is multiplied by `sigmoid(gate)` before `o_proj`.
//!
//! One rope launch (kernels/rope.cu, `q_in_hstride`) reads the queries where they lie, applies
//! the QK norm and the rotation, and writes Q dense for the attention kernels, while K is
//! normalised (and rotated) in place; the gates are left untouched, for the attention kernels'
//! output gate (`attention_fwd_gated` / `attention_decode_gated` with `OutputGate::after_query`).
//! The usual route costs a pass more: copy the queries out of the projection, then rotate them.

use super::checked::{widen, CheckReport, Tolerance};
use super::device::Gpu;
use super::dtype::Dtype;
use super::launch::{Backend, OnStream};
use super::params::{to_i32, RopeArgs};
use super::rope::{compare_normed, host_weights, launch_normed, NormArgs, NormedRotation, Positions, RopePtrs, RopeShape};
use super::scores::span;
use crate::attention::{Relative, Rotary};
use crate::config::MRope;
use crate::error::{Error, Result};
use crate::qk_norm::QkNorm;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// What follows the QK norm in a gated-query call; `P` holds the positions (a device buffer
/// for [`qk_norm_rope_gated`], a host slice for the emulator's twin).
pub enum GatedRotation<'a, P: ?Sized> {
    /// The norm alone: an unrotated KV cache, the attention kernels rotate Q and K.
    None,
    /// RoPE: token `t` to `positions[t]` (Qwen3-Next).
    Rope {
        /// `[tokens]` positions.
        positions: &'a P,
        /// The rotation.
        rot: &'a Rotary,
    },
    /// Multimodal RoPE (Qwen3.5's text model, interleaved sections): three rows of `stride`
    /// (>= tokens) positions, as [`rope_inplace_mrope`](super::rope_inplace_mrope) takes them.
    Mrope {
        /// `[3, stride]` positions: time, height, width.
        positions: &'a P,
        /// Ints from one row to the next.
        stride: usize,
        /// The rotation.
        rot: &'a Rotary,
        /// The sections.
        mrope: &'a MRope,
    },
}

impl<P: ?Sized> Clone for GatedRotation<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: ?Sized> Copy for GatedRotation<'_, P> {}

impl<'a, P: ?Sized> GatedRotation<'a, P> {
    /// The positions, if the call rotates.
    pub(crate) fn positions(self) -> Option<&'a P> {
        match self {
            GatedRotation::None => None,
            GatedRotation::Rope { positions, .. } | GatedRotation::Mrope { positions, .. } => Some(positions),
        }
    }

    /// The rotation and (M-RoPE) its sections, if the call rotates (candle's CUDA path).
    #[cfg(feature = "candle")]
    pub(crate) fn rotary(self) -> Option<(&'a Rotary, Option<&'a MRope>)> {
        match self {
            GatedRotation::None => None,
            GatedRotation::Rope { rot, .. } => Some((rot, None)),
            GatedRotation::Mrope { rot, mrope, .. } => Some((rot, Some(mrope))),
        }
    }

    /// The same rotation over other positions (`f` maps them: device to host, host to address).
    pub(crate) fn map<Q: ?Sized>(self, f: impl FnOnce(&'a P) -> &'a Q) -> GatedRotation<'a, Q> {
        match self {
            GatedRotation::None => GatedRotation::None,
            GatedRotation::Rope { positions, rot } => GatedRotation::Rope { positions: f(positions), rot },
            GatedRotation::Mrope { positions, stride, rot, mrope } => GatedRotation::Mrope { positions: f(positions), stride, rot, mrope },
        }
    }
}

/// The norm alone, for callers whose rotation type cannot be inferred from `None`.
pub const GATED_NORM_ONLY: GatedRotation<'static, CudaSlice<i32>> = GatedRotation::None;

impl RopeShape {
    /// Validate a gated-query call: `self` describes the gated rows (`q_row_stride`: elements
    /// between tokens of `q_gated`, at least `q_heads * 2 * head_dim`) and K; `lens` are
    /// `[q_gated, q_out, k, positions]` (positions unused for [`GatedRotation::None`]). Returns
    /// the dense shape Q is written in (`[tokens, q_heads, head_dim]`, K as in `self`).
    pub(crate) fn check_gated<W, P: ?Sized>(
        &self,
        [q, q_out, k, pos]: [usize; 4],
        rotation: GatedRotation<'_, P>,
        norm: &QkNorm<W>,
        w_len: impl Fn(&W) -> usize,
    ) -> Result<RopeShape> {
        let d = self.head_dim;
        let dense = RopeShape { q_row_stride: self.q_heads * d, ..*self };
        match rotation {
            GatedRotation::None => {}
            GatedRotation::Rope { rot, .. } => dense.check(q_out, k, pos, rot)?,
            GatedRotation::Mrope { stride, rot, mrope, .. } => dense.check_mrope(q_out, k, pos, stride, rot, mrope)?,
        }
        dense.check_norm(q_out, k, norm, w_len)?;
        if self.q_heads > 0 {
            let width = 2 * d;  // a head's query and gate
            if self.q_row_stride < self.q_heads * width || !self.q_row_stride.is_multiple_of(2) {
                let min = self.q_heads * width;
                return Err(Error::Stride { what: "gated q", stride: self.q_row_stride, min: min.max(self.q_row_stride + 1) });
            }
            let needed = span(self.tokens, self.q_row_stride, self.q_heads, width);
            if q < needed {
                return Err(Error::BufferTooSmall { what: "gated q", needed, got: q });
            }
            to_i32("gated q row stride", self.q_row_stride)?;
            to_i32("gated q", needed)?;
        }
        Ok(dense)
    }
}

/// The kernel's rotation arguments and positions for `rotation` (`addr`: a positions buffer's
/// device address).
fn plan<P: ?Sized>(rotation: GatedRotation<'_, P>, head_dim: usize, addr: impl FnOnce(&P) -> u64) -> Result<(RopeArgs, Positions)> {
    Ok(match rotation {
        GatedRotation::None => (RopeArgs::none(), Positions::Explicit(0)),
        GatedRotation::Rope { positions, rot } => (RopeArgs::new(Some(rot), Relative::None, head_dim)?, Positions::Explicit(addr(positions))),
        GatedRotation::Mrope { positions, stride, rot, mrope } => {
            let pos = Positions::Sections { positions: addr(positions), stride, mrope: *mrope };
            (RopeArgs::new(Some(rot), Relative::None, head_dim)?, pos)
        }
    })
}

/// The one launch of a validated gated call (GPU and emulator): Q from `q_in`'s gated rows to
/// `q_out` dense, K in place at `k`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_gated<T: Dtype, B: Backend, P: ?Sized>(
    be: &B,
    [q_in, q_out, k]: [u64; 3],
    shape: &RopeShape,
    dense: &RopeShape,
    rotation: GatedRotation<'_, P>,
    addr: impl FnOnce(&P) -> u64,
    mut norm: NormArgs,
) -> Result<()> {
    let (args, positions) = plan(rotation, shape.head_dim, addr)?;
    let ptrs = RopePtrs { q_in, q_out, k_in: k, k_out: k, q_out_stride: dense.q_row_stride, k_out_stride: shape.k_row_stride };
    norm.q_head_stride = 2 * shape.head_dim;
    launch_normed::<T, B>(be, ptrs, shape, args, positions, false, norm)
}

/// The gated query's QK norm and rotation in one launch: query `h` of token `t` is read from
/// `q_gated[t * shape.q_row_stride + h * 2 * head_dim ..][..head_dim]` (its gate follows it and
/// is left alone), normalised by `norm` ([`QkNorm`]: Qwen3-Next and Qwen3.5 use per-head RMS
/// with `1 + w` weights, [`HfQkNorm::weights`](crate::HfQkNorm::weights) turns a checkpoint's
/// into ours), rotated as `rotation` says, and written to `q_out` as dense
/// `[tokens, q_heads, head_dim]`; K (`shape.k_row_stride`) is normalised and rotated in place.
/// [`GatedRotation::None`] ([`GATED_NORM_ONLY`]) normalises only, for an unrotated cache.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_gated<T: Dtype, P: DevicePtr<i32>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q_gated: &impl DevicePtr<T>,
    q_out: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    shape: &RopeShape,
    rotation: GatedRotation<'_, P>,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<()> {
    let pos_len = rotation.positions().map_or(0, |p| p.len());
    let dense = shape.check_gated([q_gated.len(), q_out.len(), k.len(), pos_len], rotation, norm, |w| w.len())?;
    let (qi, _g1) = q_gated.device_ptr(stream);
    let (qo, _g2) = q_out.device_ptr_mut(stream);
    let (kp, _g3) = k.device_ptr_mut(stream);
    let pos = rotation.positions().map(|p| p.device_ptr(stream));
    let pp = pos.as_ref().map_or(0, |g| g.0);
    let qw = norm.q_weight.map(|w| w.device_ptr(stream));
    let kw = norm.k_weight.map(|w| w.device_ptr(stream));
    let na = NormArgs::new(norm, qw.as_ref().map_or(0, |g| g.0), kw.as_ref().map_or(0, |g| g.0));
    launch_gated::<T, _, P>(&OnStream::new(gpu, stream)?, [qi, qo, kp], shape, &dense, rotation, |_| pp, na)
}

/// [`qk_norm_rope_gated`], then compare Q and K with [`reference::qk_norm_row`](crate::reference::qk_norm_row)
/// and the rotation's reference on the same inputs, and check that every gate (all of
/// `q_gated`) is unchanged. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_gated_checked<T: Dtype, P: DevicePtr<i32>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q_gated: &impl DevicePtr<T>,
    q_out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    shape: &RopeShape,
    rotation: GatedRotation<'_, P>,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<CheckReport> {
    let pos_len = rotation.positions().map_or(0, |p| p.len());
    let dense = shape.check_gated([q_gated.len(), q_out.len(), k.len(), pos_len], rotation, norm, |w| w.len())?;
    let gated = widen(&stream.clone_dtoh(q_gated)?);
    let k_before = widen(&stream.clone_dtoh(k)?);
    let positions = rotation.positions().map(|p| stream.clone_dtoh(p)).transpose()?.unwrap_or_default();
    let host = host_weights(stream, norm)?;
    qk_norm_rope_gated(gpu, stream, q_gated, q_out, k, shape, rotation, norm)?;
    let after = [widen(&stream.clone_dtoh(q_out)?), widen(&stream.clone_dtoh(k)?)];
    let gated_after = widen(&stream.clone_dtoh(q_gated)?);
    let rotation = rotation.map(|_| positions.as_slice());
    compare_gated::<T>(&gated, k_before, &after, &gated_after, rotation, shape, &dense, &host.map(|w| w.as_slice()))
}

/// Checked mode's comparison for a gated call (shared with the emulator): each token's queries
/// taken out of `gated` (the input), then as [`compare_normed`] for Q and K; and `gated_after`
/// bit for bit equal to `gated` (the kernel only reads it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare_gated<T: Dtype>(
    gated: &[f64],
    k_before: Vec<f64>,
    after: &[Vec<f64>; 2],
    gated_after: &[f64],
    rotation: GatedRotation<'_, [i32]>,
    shape: &RopeShape,
    dense: &RopeShape,
    norm: &QkNorm<&[f32]>,
) -> Result<CheckReport> {
    let d = shape.head_dim;
    let mut q = vec![0.0; dense.tokens * dense.q_row_stride];
    if shape.q_heads > 0 {
        for (t, row) in q.chunks_mut(dense.q_row_stride).enumerate() {
            for (h, head) in row.chunks_mut(d).enumerate() {
                let at = t * shape.q_row_stride + h * 2 * d;
                head.copy_from_slice(&gated[at..at + d]);
            }
        }
    }
    let rotation = match rotation {
        GatedRotation::None => NormedRotation::None,
        GatedRotation::Rope { positions, rot } => NormedRotation::Rope(positions, rot),
        GatedRotation::Mrope { positions, stride, rot, mrope } => NormedRotation::Mrope(positions, stride, rot, mrope),
    };
    // The output buffer may be longer than the dense rows; compare the rows the call writes.
    let q_after = after[0][..q.len()].to_vec();
    let report = compare_normed::<T>(&[q, k_before], &[q_after, after[1].clone()], rotation, dense, norm)?;
    let gates = CheckReport::compare("gate", gated_after, gated, Tolerance { abs: 0.0, rel: 0.0 }).ensure()?;
    Ok(report.worst(gates))
}
