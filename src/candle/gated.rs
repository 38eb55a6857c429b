//! The gated query of Qwen3-Next and Qwen3.5 on candle tensors ([`qk_norm_rope_gated`]): the
//! queries read from between their gates in q_proj's output, normalised and rotated into a new
//! dense Q, K normalised and rotated in place. CUDA tensors: the rope kernel's gated call
//! (`cuda::qk_norm_rope_gated`, one pass over the queries). CPU tensors: the f64 reference.

use super::{check_positions, dims_str, float_dtype, from_f64, host_ints, int_tensor, norm_weights, on, rows, same_device, same_dtype, to_f64, On, Rows};
use crate::attention::Rotary;
use crate::config::MRope;
use crate::cuda::{GatedRotation, RopeShape};
use crate::error::{Error, Result};
use crate::qk_norm::QkNorm;
use crate::reference;
use candle_core::Tensor;

/// Validated operands: K's rows and the kernel's geometry (head_dim d, Q's row stride the
/// gated rows').
struct GatedCall {
    k: Rows,
    shape: RopeShape,
}

fn gated_call(q_gated: &Tensor, k: &Tensor, rotation: GatedRotation<'_, Tensor>, norm: &QkNorm<&Tensor>) -> Result<GatedCall> {
    float_dtype("q_gated", q_gated)?;
    same_dtype(q_gated, k)?;
    same_device(q_gated, "k", k)?;
    let (qr, kr) = (rows("q_gated", q_gated)?, rows("k", k)?);
    let (n, d) = (kr.rows, kr.head_dim);
    if qr.rows != n || qr.head_dim != 2 * d {
        return Err(Error::Shape { what: "q_gated", expected: format!("[{n}, Hq, {}] (each head's query, then its gate)", 2 * d), got: dims_str(q_gated) });
    }
    match rotation {
        GatedRotation::None => {}
        GatedRotation::Rope { positions, .. } => {
            same_device(q_gated, "positions", positions)?;
            int_tensor("positions", positions, &[n])?;
        }
        GatedRotation::Mrope { positions, stride, .. } => {
            same_device(q_gated, "positions", positions)?;
            int_tensor("positions", positions, &[3, n])?;
            if stride != n {
                return Err(Error::Stride { what: "mrope positions", stride, min: n });
            }
        }
    }
    norm_weights(q_gated, norm)?;
    let shape = RopeShape { tokens: n, q_heads: qr.heads, k_heads: kr.heads, head_dim: d, q_row_stride: qr.stride, k_row_stride: kr.stride };
    let lens = [qr.span(), n * qr.heads * d, kr.span(), rotation.positions().map_or(0, Tensor::elem_count)];
    shape.check_gated(lens, rotation, norm, |w| w.elem_count())?;
    Ok(GatedCall { k: kr, shape })
}

/// Qwen3-Next's and Qwen3.5's gated query ([`HfLayer::gated_query`](crate::HfLayer::gated_query)):
/// `q_gated` is q_proj's output as `[tokens, Hq, 2·d]` (each head's d query components, then
/// its gate's; rows may be further apart, heads and components contiguous), K `[tokens, Hk, d]`.
/// Returns Q `[tokens, Hq, d]`, dense: the queries normalised by `norm` (per head, `1 + w`
/// weights for these models: [`HfQkNorm::weights`](crate::HfQkNorm::weights)) and rotated as
/// `rotation` says (positions `[tokens]`, or `[3, tokens]` for M-RoPE with `stride` = tokens;
/// [`GatedRotation::None`]: the norm alone, for an unrotated cache). K is normalised and rotated
/// in place; `q_gated` is untouched, so `q_gated.narrow(2, d, d)` are the gates for the caller's
/// `attn_out * sigmoid(gate)`. CUDA: one launch for the queries (read where they lie), one for K.
pub fn qk_norm_rope_gated(q_gated: &Tensor, k: &Tensor, rotation: GatedRotation<'_, Tensor>, norm: &QkNorm<&Tensor>) -> Result<Tensor> {
    let call = gated_call(q_gated, k, rotation, norm)?;
    match on(q_gated)? {
        On::Cpu => {
            let (rot, mrope) = (rotation.rotary().map(|(r, _)| r), rotation.rotary().and_then(|(_, m)| m));
            let pos = rotation.positions().map(host_ints).transpose()?.unwrap_or_default();
            check_positions(&pos)?;
            let host = |w: Option<&Tensor>| w.map(|w| w.to_vec1::<f32>()).transpose().map_err(super::candle_error);
            let (qw, kw) = (host(norm.q_weight)?, host(norm.k_weight)?);
            let q = queries_cpu(q_gated, &call, &pos, rot, mrope, &QkNorm { eps: norm.eps, scope: norm.scope, q_weight: qw.as_deref(), k_weight: None })?;
            let kn = QkNorm { eps: norm.eps, scope: norm.scope, q_weight: kw.as_deref(), k_weight: None };
            super::cpu::normed_inplace(k, call.k, &pos, rot, mrope, &kn)?;
            Ok(q)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => cuda::gated(q_gated, k, rotation, norm, &call),
    }
}

/// The reference on the CPU: each token's queries taken out of the gated rows, normalised
/// (`norm.q_weight`, the queries' weights), rotated, rounded once to the tensor's dtype.
fn queries_cpu(q_gated: &Tensor, call: &GatedCall, pos: &[i64], rot: Option<&Rotary>, mrope: Option<&MRope>, norm: &QkNorm<&[f32]>) -> Result<Tensor> {
    let (n, hq, d) = (call.shape.tokens, call.shape.q_heads, call.shape.head_dim);
    let gated = to_f64(q_gated)?; // [n, hq, 2d], logical order
    let mut q = vec![0.0; n * hq * d];
    for (t, row) in q.chunks_mut((hq * d).max(1)).enumerate().take(n) {
        for (h, head) in row.chunks_mut(d.max(1)).enumerate() {
            head.copy_from_slice(&gated[(t * hq + h) * 2 * d..][..d]);
        }
        reference::qk_norm_row(row, d, norm.eps, norm.scope, norm.q_weight)?;
        for head in row.chunks_mut(d.max(1)) {
            match (rot, mrope) {
                (None, _) => {}
                (Some(rot), None) => reference::rotate_head(head, pos[t] as f64, rot),
                (Some(rot), Some(m)) => reference::rotate_head_mrope(head, [0, 1, 2].map(|c| pos[c * n + t] as f64), rot, m),
            }
        }
    }
    from_f64(q, &[n, hq, d], q_gated.dtype(), q_gated.device())
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::super::gpu::{gpu_for, i32_view, int32_tensor, normed_rows_inplace, not_cpu, slice, stand_in};
    use super::super::{with_dtype, Elem, ErrSlot};
    use super::GatedCall;
    use crate::attention::Rotary;
    use crate::config::MRope;
    use crate::cuda::{self as rc, GatedRotation, RopeShape};
    use crate::error::Result;
    use crate::qk_norm::{NormScope, QkNorm};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout as CLayout, Shape, Tensor};

    /// The queries of the gated rows normalised and rotated into a new dense Q (the rope
    /// kernel's gated call with no K heads): inputs the gated rows, the positions and the
    /// queries' weights, each side input a stand-in when absent.
    struct GatedQueries<'a> {
        rot: Option<&'a Rotary>,
        mrope: Option<&'a MRope>,
        eps: f64,
        scope: NormScope,
        weighted: bool,
        shape: RopeShape,
        dtype: DType,
        err: ErrSlot,
    }

    impl GatedQueries<'_> {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Elem>(&self, q: &CudaStorage, ql: &CLayout, pos: &CudaStorage, pl: &CLayout, w: &CudaStorage, wl: &CLayout) -> Result<CudaStorage> {
            let dev = &q.device;
            let (stream, gpu, s) = (dev.cuda_stream(), gpu_for(dev), &self.shape);
            let qv = slice::<T>(q)?.slice(ql.start_offset()..);
            let len = self.scope.weight_len(s.q_heads, s.head_dim);
            let wv = match self.weighted {
                true => Some(slice::<f32>(w)?.slice(wl.start_offset()..wl.start_offset() + len)),
                false => None,
            };
            let norm = QkNorm { eps: self.eps, scope: self.scope, q_weight: wv.as_ref(), k_weight: None };
            let mut out = stream.alloc_zeros::<T>(s.tokens * s.q_heads * s.head_dim)?;
            let mut no_k = stream.alloc_zeros::<T>(1)?; // k_heads = 0: never touched
            match (self.rot, self.mrope) {
                (None, _) => rc::qk_norm_rope_gated(&gpu, &stream, &qv, &mut out, &mut no_k, s, rc::GATED_NORM_ONLY, &norm)?,
                (Some(rot), None) => {
                    let pv = i32_view(pos, pl, s.tokens, "positions")?;
                    rc::qk_norm_rope_gated(&gpu, &stream, &qv, &mut out, &mut no_k, s, GatedRotation::Rope { positions: &pv, rot }, &norm)?
                }
                (Some(rot), Some(mrope)) => {
                    let pv = i32_view(pos, pl, 3 * s.tokens, "positions")?;
                    let rotation = GatedRotation::Mrope { positions: &pv, stride: s.tokens, rot, mrope };
                    rc::qk_norm_rope_gated(&gpu, &stream, &qv, &mut out, &mut no_k, s, rotation, &norm)?
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }

    impl CustomOp3 for GatedQueries<'_> {
        fn name(&self) -> &'static str {
            "rope-attn qk_norm_rope_gated"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<(CpuStorage, Shape)> {
            not_cpu()
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &CLayout,
            pos: &CudaStorage,
            pl: &CLayout,
            w: &CudaStorage,
            wl: &CLayout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let s = &self.shape;
            let out = with_dtype!(self.dtype, T => self.run::<T>(q, ql, pos, pl, w, wl)).map_err(|e| self.err.keep(e))?;
            Ok((out, Shape::from((s.tokens, s.q_heads, s.head_dim))))
        }
    }

    /// Q through [`GatedQueries`], K through the normed rope in place.
    pub(super) fn gated(
        q_gated: &Tensor,
        k: &Tensor,
        rotation: GatedRotation<'_, Tensor>,
        norm: &QkNorm<&Tensor>,
        call: &GatedCall,
    ) -> Result<Tensor> {
        let s = &call.shape;
        let (positions, rotary) = (rotation.positions(), rotation.rotary());
        let q = if s.tokens == 0 {
            Tensor::zeros((0, s.q_heads, s.head_dim), q_gated.dtype(), q_gated.device()).map_err(super::super::candle_error)?
        } else {
            let pos = match positions {
                Some(p) => int32_tensor(p)?,
                None => stand_in(q_gated)?,
            };
            let (rot, mrope) = (rotary.map(|(r, _)| r), rotary.and_then(|(_, m)| m));
            let weight = match norm.q_weight {
                Some(w) => w.clone(),
                None => stand_in(q_gated)?,
            };
            let shape = RopeShape { k_heads: 0, k_row_stride: 0, ..*s };
            let op = GatedQueries {
                rot,
                mrope,
                eps: norm.eps,
                scope: norm.scope,
                weighted: norm.q_weight.is_some(),
                shape,
                dtype: q_gated.dtype(),
                err: ErrSlot::default(),
            };
            q_gated.apply_op3_no_bwd(&pos, &weight, &op).map_err(|e| op.err.or(e))?
        };
        let k_rotation = positions.zip(rotary).map(|(p, (r, m))| (p, r, m));
        normed_rows_inplace(k, call.k, k_rotation, norm.eps, norm.scope, norm.k_weight)?;
        Ok(q)
    }
}
