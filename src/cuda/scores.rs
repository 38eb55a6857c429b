//! Launcher for kernels/scores.cu: the fused RoPE·QKᵀ·ALiBi score matrix.

use super::checked::{max_abs, widen, CheckReport, Tolerance};
use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{to_i32, RopeArgs, ScoresParams, SinkArgs};
use super::{SCORES_HEAD_DIMS, SUPPORTED_HEAD_DIMS};
use crate::attention::AttentionParams;
use crate::error::{Error, Result};
use crate::reference;
use cudarc::driver::{sys::CUfunction_attribute, CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Sizes of a score computation: Q `[nq, Hq, d]`, K `[nk, Hkv, d]` (row strides in elements),
/// queries at positions `q_offset..q_offset+nq`, keys at `0..nk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoresShape {
    /// Query rows.
    pub nq: usize,
    /// Key rows.
    pub nk: usize,
    /// Elements between consecutive query rows (>= Hq * d).
    pub q_row_stride: usize,
    /// Elements between consecutive key rows (>= Hkv * d).
    pub k_row_stride: usize,
    /// Position of query row 0 (decode offset).
    pub q_offset: usize,
}

impl ScoresShape {
    /// Validate a score computation's buffer lengths (elements) and parameters.
    pub fn check(&self, p: &AttentionParams, q_len: usize, k_len: usize, out_len: usize) -> Result<()> {
        let d = p.head_dim;
        if !SCORES_HEAD_DIMS.contains(&d) {
            return Err(Error::UnsupportedHeadDim { head_dim: d, supported: SCORES_HEAD_DIMS });
        }
        common(p)?;
        check_rows("q", q_len, self.nq, self.q_row_stride, p.num_q_heads, d)?;
        check_rows("k", k_len, self.nk, self.k_row_stride, p.num_kv_heads, d)?;
        let needed = p.num_q_heads * self.nq * self.nk;
        if out_len < needed {
            return Err(Error::BufferTooSmall { what: "scores out", needed, got: out_len });
        }
        to_i32("q_offset + nq", self.q_offset + self.nq)?;
        to_i32("nk", self.nk)?;
        let bm = 32; // the smaller (f32) tile bounds the grid
        if self.nq.div_ceil(bm) > 65535 || p.num_q_heads > 65535 {
            return Err(Error::Shape { what: "scores grid", expected: "nq/32 and heads <= 65535".into(), got: format!("{} x {}", self.nq, p.num_q_heads) });
        }
        Ok(())
    }

    /// Dense Q and K for the heads of `p`.
    pub fn contiguous(p: &AttentionParams, nq: usize, nk: usize, q_offset: usize) -> Self {
        ScoresShape { nq, nk, q_row_stride: p.num_q_heads * p.head_dim, k_row_stride: p.num_kv_heads * p.head_dim, q_offset }
    }
}

/// Elements a `[rows, heads, d]` tensor with a row stride spans.
pub(crate) fn span(rows: usize, stride: usize, heads: usize, d: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * stride + heads * d
    }
}

/// Checks shared by every attention-like launcher: head dim instantiated, strides, buffer sizes.
pub(crate) fn check_rows(what: &'static str, len: usize, rows: usize, stride: usize, heads: usize, d: usize) -> Result<()> {
    if stride < heads * d {
        return Err(Error::Stride { what, stride, min: heads * d });
    }
    let needed = span(rows, stride, heads, d);
    if len < needed {
        return Err(Error::BufferTooSmall { what, needed, got: len });
    }
    Ok(())
}

pub(crate) fn check_head_dim(d: usize) -> Result<()> {
    if !SUPPORTED_HEAD_DIMS.contains(&d) {
        return Err(Error::UnsupportedHeadDim { head_dim: d, supported: SUPPORTED_HEAD_DIMS });
    }
    Ok(())
}

/// Position-encoding and mask fields shared by the score and attention kernels.
pub(crate) struct Common {
    pub rope: RopeArgs,
    pub causal: i32,
    pub window: i32,
    pub sinks: i32,
    /// Chunked attention's C (0: none).
    pub chunk: i32,
    pub alibi_total_heads: i32,
    pub alibi_head_offset: i32,
    pub scale: f32,
    pub sink: SinkArgs,
    /// Soft-capping: scale / cap (0: none) and cap, natural units (the log2 kernels scale it).
    pub cap_in: f32,
    pub cap: f32,
}

pub(crate) fn common(p: &AttentionParams) -> Result<Common> {
    p.validate()?;
    check_head_dim(p.head_dim)?;
    // Head dim 512's prefill kernel splits the head over two warps and has no room for
    // ReRoPE's far copies of the tiles.
    if p.head_dim > 256 && p.rope.is_some() && p.relative != crate::attention::Relative::None {
        return Err(Error::Parameter { name: "relative", value: p.head_dim as f64, reason: "ReRoPE and Leaky ReRoPE take head_dim up to 256" });
    }
    let (total, offset) = p.alibi.map_or((0, 0), |a| (a.total_heads, a.head_offset));
    let mut rope = RopeArgs::new(p.rope.as_ref(), p.relative, p.head_dim)?;
    if let Some(t) = p.query_temperature {
        // Query-side only: the rope kernel (K pre-rotation, rope_into) never gets it.
        rope.temp_floor = to_i32("floor_scale", t.floor_scale)?;
        rope.temp_scale = t.attn_scale as f32;
        rope.temp_offset = t.offset as i32;
    }
    Ok(Common {
        rope,
        causal: p.mask.causal as i32,
        window: to_i32("window", p.mask.window.unwrap_or(0))?,
        sinks: to_i32("sinks", p.mask.sinks)?,
        chunk: to_i32("chunk", p.mask.chunk.unwrap_or(0))?,
        alibi_total_heads: to_i32("alibi total_heads", total)?,
        alibi_head_offset: to_i32("alibi head_offset", offset)?,
        scale: p.softmax_scale() as f32,
        sink: SinkArgs::new(p)?,
        cap_in: p.softcap.map_or(0.0, |cap| (p.softmax_scale() / cap) as f32),
        cap: p.softcap.unwrap_or(0.0) as f32,
    })
}

impl Common {
    /// The log2-domain kernels' soft-cap output factor, cap·log2(e).
    pub(crate) fn cap_out_log2(&self) -> f32 {
        (self.cap as f64 * std::f64::consts::LOG2_E) as f32
    }
}

/// Opt a kernel into more than 48 KB of dynamic shared memory when it needs it.
pub(crate) fn set_smem(func: &cudarc::driver::CudaFunction, bytes: usize) -> Result<()> {
    if bytes > 48 * 1024 {
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
    }
    Ok(())
}

/// Scores `[Hq, nq, nk]` (f32) of unrotated Q and K, RoPE / ReRoPE / ALiBi / masks as `p` says;
/// masked entries are `-inf`.
pub fn scores<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<f32>,
    shape: &ScoresShape,
    p: &AttentionParams,
) -> Result<()> {
    let be = OnStream::new(gpu, stream)?;
    shape.check(p, q.len(), k.len(), out.len())?;
    let (qp, _g1) = q.device_ptr(stream);
    let (kp, _g2) = k.device_ptr(stream);
    let (op, _g3) = out.device_ptr_mut(stream);
    launch_scores::<T, _>(&be, [qp, kp, op], shape, p)
}

/// Plan and run a scores launch on buffers `[q, k, out]` that [`ScoresShape::check`] accepted.
pub(crate) fn launch_scores<T: Dtype, B: Backend>(be: &B, [q, k, out]: [u64; 3], shape: &ScoresShape, p: &AttentionParams) -> Result<()> {
    let c = common(p)?;
    let d = p.head_dim;
    if p.num_q_heads * shape.nq * shape.nk == 0 {
        return Ok(());
    }
    let bm = if T::NAME == "f32" { 32 } else { 64 };
    let pitch = if T::NAME == "f32" { d + 1 } else { d + 8 };
    let params = ScoresParams {
        rope: c.rope,
        q,
        k,
        out,
        q_row_stride: shape.q_row_stride as i64,
        k_row_stride: shape.k_row_stride as i64,
        nq: to_i32("nq", shape.nq)?,
        nk: to_i32("nk", shape.nk)?,
        q_heads: to_i32("num_q_heads", p.num_q_heads)?,
        kv_heads: to_i32("num_kv_heads", p.num_kv_heads)?,
        head_dim: d as i32,
        q_offset: to_i32("q_offset", shape.q_offset)?,
        causal: c.causal,
        window: c.window,
        sinks: c.sinks,
        chunk: c.chunk,
        alibi_total_heads: c.alibi_total_heads,
        alibi_head_offset: c.alibi_head_offset,
        scale: c.scale,
        cap_in: c.cap_in,
        cap_out: c.cap,
    };
    be.run(&Launch {
        module: Module::Scores,
        name: format!("scores_{}", T::NAME),
        grid: (shape.nk.div_ceil(bm) as u32, shape.nq.div_ceil(bm) as u32, p.num_q_heads as u32),
        threads: 128,
        smem: 2 * bm * pitch * std::mem::size_of::<T>(),
        params,
    })
}

/// [`scores`], then compare with [`reference::scores`] on the same (copied back) inputs.
pub fn scores_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    out: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    shape: &ScoresShape,
    p: &AttentionParams,
) -> Result<CheckReport> {
    scores(gpu, stream, q, k, out, shape, p)?;
    let got: Vec<f64> = stream.clone_dtoh(out)?.iter().map(|&x| x as f64).collect();
    compare_scores::<T>(&widen(&stream.clone_dtoh(q)?), &widen(&stream.clone_dtoh(k)?), &got, shape, p)
}

/// Checked mode's comparison on host copies (shared with the emulator).
pub(crate) fn compare_scores<T: Dtype>(q: &[f64], k: &[f64], got: &[f64], shape: &ScoresShape, p: &AttentionParams) -> Result<CheckReport> {
    let d = p.head_dim;
    let qh = gather_rows(q, shape.nq, shape.q_row_stride, p.num_q_heads * d);
    let kh = gather_rows(k, shape.nk, shape.k_row_stride, p.num_kv_heads * d);
    let q_pos: Vec<i64> = (0..shape.nq).map(|i| (shape.q_offset + i) as i64).collect();
    let k_pos: Vec<i64> = (0..shape.nk as i64).collect();
    let want = reference::scores(&qh, &kh, &q_pos, &k_pos, p)?;
    let got = &got[..want.len()];
    let qmax = max_abs(&qh) * p.query_scale_bound((shape.q_offset + shape.nq) as i64 - 1);
    CheckReport::compare("scores", got, &want, Tolerance::scores::<T>(p, qmax, max_abs(&kh))).ensure()
}

/// Dense `[rows, width]` from rows `stride` apart.
pub(crate) fn gather_rows(x: &[f64], rows: usize, stride: usize, width: usize) -> Vec<f64> {
    (0..rows).flat_map(|r| x[r * stride..r * stride + width].iter().copied()).collect()
}
