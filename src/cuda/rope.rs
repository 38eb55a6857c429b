//! Launcher for kernels/rope.cu: rotate Q and K in place (or into other buffers) in one launch.

use super::checked::{max_abs, widen, CheckReport, Tolerance};
use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{check_rotation_fits, to_i32, RopeArgs, RopeParams, MAX_ROT_PAIRS};
use super::scores::span;
use crate::attention::{Relative, Rotary};
use crate::config::MRope;
use crate::qk_norm::{NormScope, QkNorm};
use crate::error::{Error, Result};
use crate::reference;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Largest rotary dimension the kernels take: 256, or 512 with every pair past the first 128 of
/// frequency 0 (proportional RoPE; a typed error otherwise). Components past it pass through.
pub const ROPE_MAX_HEAD_DIM: usize = 2 * MAX_ROT_PAIRS;

/// Geometry of Q and K for the rope kernel: `[tokens, heads, head_dim]` with a row stride
/// (elements from one token to the next) per tensor, so views into a packed QKV work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// Tokens (rows).
    pub tokens: usize,
    /// Query heads per token.
    pub q_heads: usize,
    /// Key heads per token (0: rotate Q only).
    pub k_heads: usize,
    /// Components per head.
    pub head_dim: usize,
    /// Elements between consecutive tokens of Q (>= q_heads * head_dim).
    pub q_row_stride: usize,
    /// Elements between consecutive tokens of K (>= k_heads * head_dim).
    pub k_row_stride: usize,
}

impl RopeShape {
    /// Dense `[tokens, heads, head_dim]` tensors.
    pub fn contiguous(tokens: usize, q_heads: usize, k_heads: usize, head_dim: usize) -> Self {
        RopeShape { tokens, q_heads, k_heads, head_dim, q_row_stride: q_heads * head_dim, k_row_stride: k_heads * head_dim }
    }

    /// Elements a buffer must hold for `heads` heads at `stride`.
    fn needed(&self, heads: usize, stride: usize) -> usize {
        if heads == 0 {
            0
        } else {
            span(self.tokens, stride, heads, self.head_dim)
        }
    }

    /// Validate buffer lengths (elements) and the rotation, as every launcher does before a launch.
    pub fn check(&self, q_len: usize, k_len: usize, pos_len: usize, rot: &Rotary) -> Result<()> {
        rot.validate(self.head_dim)?;
        check_rotation_fits(rot, self.head_dim)?;
        self.check_buffers(q_len, k_len)?;
        if pos_len < self.tokens {
            return Err(Error::BufferTooSmall { what: "positions", needed: self.tokens, got: pos_len });
        }
        Ok(())
    }

    /// Validate a QK-norm call: Q and K as [`check`](Self::check) takes them (no rotation, no
    /// positions), and the norm's eps, head count and weight lengths (`w_len` of each).
    pub fn check_norm<W>(&self, q_len: usize, k_len: usize, norm: &QkNorm<W>, w_len: impl Fn(&W) -> usize) -> Result<()> {
        self.check_buffers(q_len, k_len)?;
        norm.validate(self.q_heads, self.k_heads, self.head_dim, w_len)
    }

    /// Strides, alignment and lengths of Q and K, and the sizes the kernel takes as i32.
    fn check_buffers(&self, q_len: usize, k_len: usize) -> Result<()> {
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Shape { what: "head_dim", expected: "even".into(), got: self.head_dim.to_string() });
        }
        for (what, heads, stride, len) in
            [("q", self.q_heads, self.q_row_stride, q_len), ("k", self.k_heads, self.k_row_stride, k_len)]
        {
            if heads > 0 && stride < heads * self.head_dim {
                return Err(Error::Stride { what, stride, min: heads * self.head_dim });
            }
            // Pairs are loaded two elements at a time: every row must start on an even element.
            if heads > 0 && stride % 2 != 0 {
                return Err(Error::Stride { what, stride, min: stride + 1 });
            }
            let needed = self.needed(heads, stride);
            if len < needed {
                return Err(Error::BufferTooSmall { what, needed, got: len });
            }
        }
        to_i32("tokens", self.tokens)?;
        to_i32("q_row_stride", self.q_row_stride)?;
        to_i32("k_row_stride", self.k_row_stride)?;
        Ok(())
    }

    /// Validate an M-RoPE call: Q and K as [`check`](Self::check) does, the sections against
    /// the rotary dim, and positions of three rows of `stride` (>= tokens) ints.
    pub fn check_mrope(&self, q_len: usize, k_len: usize, pos_len: usize, stride: usize, rot: &Rotary, m: &MRope) -> Result<()> {
        self.check(q_len, k_len, self.tokens, rot)?;
        m.validate(rot.rotary_dim / 2)?;
        if stride < self.tokens {
            return Err(Error::Stride { what: "mrope positions", stride, min: self.tokens });
        }
        let needed = 2 * stride + self.tokens;
        if self.tokens > 0 && pos_len < needed {
            return Err(Error::BufferTooSmall { what: "positions", needed, got: pos_len });
        }
        to_i32("mrope positions stride", stride)?;
        to_i32("mrope positions", needed)?;
        Ok(())
    }
}

impl RopeShape {
    /// Validate a `rope_into` call (lengths `[q, k, q_out, k_out, positions]`): the dense output
    /// shape and the kernel's rotation arguments.
    pub(crate) fn check_into(&self, [q, k, q_out, k_out, pos]: [usize; 5], rot: &Rotary) -> Result<(RopeShape, RopeArgs)> {
        self.check(q, k, pos, rot)?;
        let dense = RopeShape::contiguous(self.tokens, self.q_heads, self.k_heads, self.head_dim);
        dense.check(q_out, k_out, pos, rot)?;
        Ok((dense, RopeArgs::new(Some(rot), Relative::None, self.head_dim)?))
    }
}

/// Raw device addresses of one rope launch.
pub(crate) struct RopePtrs {
    pub q_in: u64,
    pub q_out: u64,
    pub k_in: u64,
    pub k_out: u64,
    pub q_out_stride: usize,
    pub k_out_stride: usize,
}

impl RopePtrs {
    /// Q and K rotated where they lie (outputs are the inputs, with their row strides).
    pub(crate) fn in_place(q: u64, k: u64, shape: &RopeShape) -> Self {
        RopePtrs { q_in: q, q_out: q, k_in: k, k_out: k, q_out_stride: shape.q_row_stride, k_out_stride: shape.k_row_stride }
    }
}

/// Where the positions come from: an explicit array, or "index within the sequence" from
/// cumulative sequence offsets (for pre-rotating a variable-length batch of keys).
pub(crate) enum Positions {
    Explicit(u64),
    /// Token t of sequence b sits at `t - cu_seqlens[b] + starts[b * stride]` (starts 0 = none).
    FromCuSeqlens { cu_seqlens: u64, batch: usize, starts: u64, stride: usize },
    /// Gather from a paged cache (`k_in` / `v_in` are the K and V caches, no Q): key j of
    /// sequence b, at position j, to row `start_b + j` of `k_out` / `v_out`, packed (`start_b`
    /// the earlier sequences' context lengths added up; rows < `rows`).
    Paged(PagedGather),
    /// M-RoPE: rows of time, height and width positions at `positions + c * stride` (ints).
    Sections { positions: u64, stride: usize, mrope: MRope },
}

/// A gather's paged source (kernels/rope.cu, RopeParams): the block table and context lengths,
/// the V cache beside the K cache, and where the gathered values go (all 0: no gather).
#[derive(Clone, Copy, Default)]
pub(crate) struct PagedGather {
    pub block_table: u64,
    pub context_lens: u64,
    pub v_in: u64,
    pub v_out: u64,
    pub batch: usize,
    pub page_size: usize,
    pub max_pages: usize,
    pub num_pages: usize,
    /// Rows of the output, all sequences' (kernels/paged.cuh, gathered_span).
    pub rows: usize,
}

/// Blocks of a gather, shared out over the sequences (at least 16 each, at most one per key):
/// each block strides over its sequence's keys, so a block table sized for long contexts
/// launches no idle block per unused slot, while the grid is still about one full wave of
/// 128-thread blocks on a large GPU (an H100 holds ~2100), however few the sequences.
const GATHER_BLOCKS: usize = 2048;
const GATHER_MIN_PER_SEQ: usize = 16;

/// A launch's QK norm as the kernel takes it (RopeParams: norm, norm_eps, q_norm_w, k_norm_w);
/// the default is none.
#[derive(Clone, Copy, Default)]
pub(crate) struct NormArgs {
    mode: i32,
    eps: f32,
    q_weight: u64,
    k_weight: u64,
    /// Elements between Q's input heads (RopeParams::q_in_hstride); 0: head_dim, dense.
    pub(crate) q_head_stride: usize,
}

impl NormArgs {
    /// A validated norm whose weights sit at these addresses (0: none).
    pub(crate) fn new<W>(norm: &QkNorm<W>, q_weight: u64, k_weight: u64) -> Self {
        let mode = match norm.scope {
            NormScope::Head => 1,
            NormScope::Heads => 2,
            NormScope::HeadCentred => 3,
        };
        NormArgs { mode, eps: norm.eps as f32, q_weight, k_weight, q_head_stride: 0 }
    }
}

/// The one launch path every rope call goes through (validated by the caller).
pub(crate) fn launch<T: Dtype, B: Backend>(
    be: &B,
    ptrs: RopePtrs,
    shape: &RopeShape,
    args: RopeArgs,
    positions: Positions,
    use_leak_freq: bool,
) -> Result<()> {
    launch_normed::<T, B>(be, ptrs, shape, args, positions, use_leak_freq, NormArgs::default())
}

/// [`launch`] with a QK norm before the rotation (`args.rotary_dim` 0: the norm alone).
pub(crate) fn launch_normed<T: Dtype, B: Backend>(
    be: &B,
    ptrs: RopePtrs,
    shape: &RopeShape,
    args: RopeArgs,
    positions: Positions,
    use_leak_freq: bool,
    norm: NormArgs,
) -> Result<()> {
    if shape.tokens == 0 || shape.q_heads + shape.k_heads == 0 {
        return Ok(());
    }
    // A gated query's heads (2 * head_dim apart) are read by the normed kernels alone.
    let q_head_stride = if norm.q_head_stride == 0 { shape.head_dim } else { norm.q_head_stride };
    assert!(norm.mode != 0 || q_head_stride == shape.head_dim, "a head stride without the QK norm");
    let elem = std::mem::size_of::<T>() as u64;
    // Pairs move two elements at a time (strides and head_dim are even by validation): the
    // buffers must start on a two-element boundary, or the loads would fault.
    if [ptrs.q_in, ptrs.q_out, ptrs.k_in, ptrs.k_out].iter().any(|p| p % (2 * elem) != 0) {
        return Err(Error::Shape { what: "q/k pointers", expected: format!("{}-byte aligned", 2 * elem), got: "an odd element offset".into() });
    }
    // Pairs per thread (kernels/rope.cu): as many as 16-byte accesses carry when every row
    // start is 16-byte aligned and the rotary half divides into them (rotate_half: 16 / elem
    // pairs, one access per half; interleaved: half that, both components in one access), else
    // two when row starts are 4-element aligned, else one. Fewer, wider accesses: fewer
    // instructions per byte for a kernel that only moves memory.
    let aligned = |n: u64| {
        [ptrs.q_in, ptrs.q_out, ptrs.k_in, ptrs.k_out].iter().all(|p| p % (n * elem) == 0)
            && [shape.q_row_stride, shape.k_row_stride, ptrs.q_out_stride, ptrs.k_out_stride, shape.head_dim, q_head_stride]
                .iter()
                .all(|s| s % n as usize == 0)
    };
    let interleaved = args.interleaved != 0;
    let half = args.rotary_dim as u64 / 2;
    let wide = if interleaved { 8 / elem } else { 16 / elem };
    let pairs = if wide > 2 && aligned(16 / elem) && half.is_multiple_of(wide) {
        wide
    } else if aligned(4) && half.is_multiple_of(2) {
        2
    } else {
        1
    };
    let layout = if interleaved { "inter" } else { "half" };
    let name = format!("rope_{}{layout}_v{pairs}_{}", if norm.mode != 0 { "norm_" } else { "" }, T::NAME);
    let none = PagedGather::default();
    let mut sections = (0, [0; 3], 0);  // (mode, sections, stride) of M-RoPE
    let (pos_ptr, cu, batch, starts, stride, gather) = match positions {
        Positions::Explicit(p) => (p, 0, 0, 0, 0, none),
        Positions::FromCuSeqlens { cu_seqlens, batch, starts, stride } => (0, cu_seqlens, batch, starts, stride, none),
        Positions::Paged(g) => (0, 0, g.batch, 0, 0, g),
        Positions::Sections { positions, stride, mrope } => {
            sections = (1 + mrope.interleaved as i32, mrope.sections, stride);
            (positions, 0, 0, 0, 0, none)
        }
    };
    let params = RopeParams {
        rope: args,
        q_in: ptrs.q_in,
        q_out: ptrs.q_out,
        k_in: ptrs.k_in,
        k_out: ptrs.k_out,
        positions: pos_ptr,
        cu_seqlens: cu,
        seq_starts: starts,
        q_in_stride: shape.q_row_stride as i64,
        q_out_stride: ptrs.q_out_stride as i64,
        k_in_stride: shape.k_row_stride as i64,
        k_out_stride: ptrs.k_out_stride as i64,
        tokens: to_i32("tokens", shape.tokens)?,
        q_heads: to_i32("q_heads", shape.q_heads)?,
        k_heads: to_i32("k_heads", shape.k_heads)?,
        head_dim: to_i32("head_dim", shape.head_dim)?,
        batch: to_i32("batch", batch)?,
        starts_stride: stride as i32,
        use_leak_freq: use_leak_freq as i32,
        block_table: gather.block_table,
        context_lens: gather.context_lens,
        v_in: gather.v_in,
        v_out: gather.v_out,
        page_size: to_i32("page_size", gather.page_size)?,
        max_pages: to_i32("max_pages", gather.max_pages)?,
        num_pages: to_i32("num_pages", gather.num_pages)?,
        gather_rows: to_i32("gather rows", gather.rows)?,
        mrope: sections.0,
        mrope_h: to_i32("mrope_section", sections.1[1])?,
        mrope_w: to_i32("mrope_section", sections.1[2])?,
        mrope_stride: to_i32("mrope positions stride", sections.2)?,
        norm: norm.mode,
        norm_eps: norm.eps,
        q_norm_w: norm.q_weight,
        k_norm_w: norm.k_weight,
        q_in_hstride: to_i32("q head stride", q_head_stride)?,
    };
    let grid = match gather.block_table {
        0 => (shape.tokens as u32, 1, 1),
        _ => {
            let per_seq = gather.rows.min(gather.max_pages * gather.page_size);  // a sequence's most keys
            (per_seq.min((GATHER_BLOCKS / gather.batch.max(1)).max(GATHER_MIN_PER_SEQ)) as u32, gather.batch as u32, 1)
        }
    };
    // Every pointer was checked by the caller to cover the rows the kernel touches.
    be.run(&Launch { module: Module::Rope, name, grid, threads: 128, smem: 0, params })
}

/// Rotate Q `[tokens, q_heads, head_dim]` and K `[tokens, k_heads, head_dim]` in place, token
/// `t` to `positions[t]` (any i32: negative positions rotate backwards).
pub fn rope_inplace<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<i32>,
    shape: &RopeShape,
    rot: &Rotary,
) -> Result<()> {
    shape.check(q.len(), k.len(), positions.len(), rot)?;
    let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
    let (qp, _gq) = q.device_ptr_mut(stream);
    let (kp, _gk) = k.device_ptr_mut(stream);
    let (pp, _gp) = positions.device_ptr(stream);
    let ptrs = RopePtrs::in_place(qp, kp, shape);
    launch::<T, _>(&OnStream::new(gpu, stream)?, ptrs, shape, args, Positions::Explicit(pp), false)
}

/// Rotate into other buffers: outputs are dense `[tokens, heads, head_dim]` (pass-through
/// components copied), inputs untouched.
#[allow(clippy::too_many_arguments)]
pub fn rope_into<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    q_out: &mut impl DevicePtrMut<T>,
    k_out: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<i32>,
    shape: &RopeShape,
    rot: &Rotary,
) -> Result<()> {
    let (dense, args) = shape.check_into([q.len(), k.len(), q_out.len(), k_out.len(), positions.len()], rot)?;
    let (qi, _g1) = q.device_ptr(stream);
    let (ki, _g2) = k.device_ptr(stream);
    let (qo, _g3) = q_out.device_ptr_mut(stream);
    let (ko, _g4) = k_out.device_ptr_mut(stream);
    let (pp, _g5) = positions.device_ptr(stream);
    let ptrs = RopePtrs { q_in: qi, q_out: qo, k_in: ki, k_out: ko, q_out_stride: dense.q_row_stride, k_out_stride: dense.k_row_stride };
    launch::<T, _>(&OnStream::new(gpu, stream)?, ptrs, shape, args, Positions::Explicit(pp), false)
}

/// Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; [`MRope`]) in place: `positions` holds
/// three rows of `stride` (>= tokens) ints, the tokens' time, height and width positions
/// (`[3, stride]`, as transformers' `position_ids` of shape `[3, 1, tokens]`), and pair `i` is
/// rotated to the row `mrope.component(i)` names. Then attend with `rope: None` (for decode:
/// `paged_append` the rotated keys, a pre-rotated cache).
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_mrope<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<i32>,
    stride: usize,
    shape: &RopeShape,
    rot: &Rotary,
    mrope: &MRope,
) -> Result<()> {
    shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
    let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
    let (qp, _gq) = q.device_ptr_mut(stream);
    let (kp, _gk) = k.device_ptr_mut(stream);
    let (pp, _gp) = positions.device_ptr(stream);
    let ptrs = RopePtrs::in_place(qp, kp, shape);
    let pos = Positions::Sections { positions: pp, stride, mrope: *mrope };
    launch::<T, _>(&OnStream::new(gpu, stream)?, ptrs, shape, args, pos, false)
}

/// [`rope_inplace_mrope`], then compare with [`reference::rotate_head_mrope`] on the same
/// inputs, as [`rope_inplace_checked`] does. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_mrope_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    positions: &impl DevicePtr<i32>,
    stride: usize,
    shape: &RopeShape,
    rot: &Rotary,
    mrope: &MRope,
) -> Result<CheckReport> {
    shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
    let before = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    let pos = stream.clone_dtoh(positions)?;
    rope_inplace_mrope(gpu, stream, q, k, positions, stride, shape, rot, mrope)?;
    let after = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    compare_rope_mrope::<T>(&before, &after, &pos, stride, shape, rot, mrope)
}

/// [`rope_inplace`], then copy everything back and compare with [`reference::rotate`] on the
/// same inputs. Synchronizes the stream (it is the one call here that does).
pub fn rope_inplace_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    positions: &impl DevicePtr<i32>,
    shape: &RopeShape,
    rot: &Rotary,
) -> Result<CheckReport> {
    shape.check(q.len(), k.len(), positions.len(), rot)?;
    let before = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    let pos = stream.clone_dtoh(positions)?;
    rope_inplace(gpu, stream, q, k, positions, shape, rot)?;
    let after = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    compare_rope::<T>(&before, &after, &pos, shape, rot)
}

/// The QK norm ([`QkNorm`]: Qwen3, Gemma 3, OLMo 2, Llama 4) and then RoPE, in place and in one
/// pass: each head of Q and K (or each tensor's heads together, [`NormScope::Heads`]) over its
/// root mean square, times its weight, then rotated as [`rope_inplace`] rotates it. For a
/// pre-rotated KV cache; with an unrotated one (the attention kernels rotate), normalise with
/// [`qk_norm_inplace`] instead. M-RoPE after the norm (Qwen3-VL): [`rope_inplace_mrope_normed`].
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_normed<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<i32>,
    shape: &RopeShape,
    rot: &Rotary,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<()> {
    shape.check(q.len(), k.len(), positions.len(), rot)?;
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
    let (pp, _gp) = positions.device_ptr(stream);
    normed(gpu, stream, q, k, shape, args, Positions::Explicit(pp), norm)
}

/// The QK norm, then multimodal RoPE ([`rope_inplace_mrope`]'s positions and sections), in
/// place and in one pass: Qwen3-VL's text model normalises Q and K per head before its M-RoPE.
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_mrope_normed<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<i32>,
    stride: usize,
    shape: &RopeShape,
    rot: &Rotary,
    mrope: &MRope,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<()> {
    shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
    let (pp, _gp) = positions.device_ptr(stream);
    normed(gpu, stream, q, k, shape, args, Positions::Sections { positions: pp, stride, mrope: *mrope }, norm)
}

/// The QK norm alone, in place ([`rope_inplace_normed`] without the rotation): Q before an
/// attention kernel rotates it, K before [`paged_append`](super::paged_append) puts it in an
/// unrotated cache.
pub fn qk_norm_inplace<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    shape: &RopeShape,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<()> {
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    normed(gpu, stream, q, k, shape, RopeArgs::none(), Positions::Explicit(0), norm)
}

/// The launch of both normed calls (validated), with the weights' device addresses.
#[allow(clippy::too_many_arguments)]
fn normed<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut impl DevicePtrMut<T>,
    k: &mut impl DevicePtrMut<T>,
    shape: &RopeShape,
    args: RopeArgs,
    positions: Positions,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<()> {
    let (qp, _gq) = q.device_ptr_mut(stream);
    let (kp, _gk) = k.device_ptr_mut(stream);
    let qw = norm.q_weight.map(|w| w.device_ptr(stream));
    let kw = norm.k_weight.map(|w| w.device_ptr(stream));
    let na = NormArgs::new(norm, qw.as_ref().map_or(0, |g| g.0), kw.as_ref().map_or(0, |g| g.0));
    let ptrs = RopePtrs::in_place(qp, kp, shape);
    launch_normed::<T, _>(&OnStream::new(gpu, stream)?, ptrs, shape, args, positions, false, na)
}

/// [`rope_inplace_normed`], then compare with [`reference::qk_norm_row`] and
/// [`reference::rotate_head`] on the same inputs. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_normed_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    positions: &impl DevicePtr<i32>,
    shape: &RopeShape,
    rot: &Rotary,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<CheckReport> {
    shape.check(q.len(), k.len(), positions.len(), rot)?;
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    let before = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    let pos = stream.clone_dtoh(positions)?;
    let host = host_weights(stream, norm)?;
    rope_inplace_normed(gpu, stream, q, k, positions, shape, rot, norm)?;
    let after = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    compare_normed::<T>(&before, &after, NormedRotation::Rope(&pos, rot), shape, &host.map(|w| w.as_slice()))
}

/// [`rope_inplace_mrope_normed`], then compare with [`reference::qk_norm_row`] and
/// [`reference::rotate_head_mrope`] on the same inputs. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn rope_inplace_mrope_normed_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    positions: &impl DevicePtr<i32>,
    stride: usize,
    shape: &RopeShape,
    rot: &Rotary,
    mrope: &MRope,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<CheckReport> {
    shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    let before = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    let pos = stream.clone_dtoh(positions)?;
    let host = host_weights(stream, norm)?;
    rope_inplace_mrope_normed(gpu, stream, q, k, positions, stride, shape, rot, mrope, norm)?;
    let after = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    compare_normed::<T>(&before, &after, NormedRotation::Mrope(&pos, stride, rot, mrope), shape, &host.map(|w| w.as_slice()))
}

/// [`qk_norm_inplace`], then compare with [`reference::qk_norm_row`]. Synchronizes the stream.
pub fn qk_norm_inplace_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    k: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    shape: &RopeShape,
    norm: &QkNorm<&impl DevicePtr<f32>>,
) -> Result<CheckReport> {
    shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
    let before = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    let host = host_weights(stream, norm)?;
    qk_norm_inplace(gpu, stream, q, k, shape, norm)?;
    let after = [widen(&stream.clone_dtoh(q)?), widen(&stream.clone_dtoh(k)?)];
    compare_normed::<T>(&before, &after, NormedRotation::None, shape, &host.map(|w| w.as_slice()))
}

/// The norm with host copies of its weights (checked mode).
pub(crate) fn host_weights(stream: &Arc<CudaStream>, norm: &QkNorm<&impl DevicePtr<f32>>) -> Result<QkNorm<Vec<f32>>> {
    let copy = |w: Option<&&_>| w.map(|w| stream.clone_dtoh(*w)).transpose();
    Ok(QkNorm { eps: norm.eps, scope: norm.scope, q_weight: copy(norm.q_weight.as_ref())?, k_weight: copy(norm.k_weight.as_ref())? })
}

/// What follows the norm in a normed call: nothing, RoPE at `positions`, or M-RoPE at three
/// rows of `stride` positions.
pub(crate) enum NormedRotation<'a> {
    None,
    Rope(&'a [i32], &'a Rotary),
    Mrope(&'a [i32], usize, &'a Rotary, &'a MRope),
}

/// Checked mode's comparison for the normed calls (shared with the emulator): each token's
/// heads of `before` normalised, then rotated as `rotation` says.
pub(crate) fn compare_normed<T: Dtype>(
    before: &[Vec<f64>; 2],
    after: &[Vec<f64>; 2],
    rotation: NormedRotation,
    shape: &RopeShape,
    norm: &QkNorm<&[f32]>,
) -> Result<CheckReport> {
    compare_rotated::<T>(before, after, shape, Some(norm), |t, x| match rotation {
        NormedRotation::None => {}
        NormedRotation::Rope(positions, rot) => reference::rotate_head(x, positions[t] as f64, rot),
        NormedRotation::Mrope(positions, stride, rot, m) => {
            reference::rotate_head_mrope(x, [0, 1, 2].map(|c| positions[c * stride + t] as f64), rot, m)
        }
    })
}

/// Checked mode's comparison, on host copies of Q and K (`[q, k]`) before and after rotating
/// them in place (shared with the emulator).
pub(crate) fn compare_rope<T: Dtype>(
    before: &[Vec<f64>; 2],
    after: &[Vec<f64>; 2],
    positions: &[i32],
    shape: &RopeShape,
    rot: &Rotary,
) -> Result<CheckReport> {
    // Negative positions rotate backwards on the GPU; the reference takes them as f64 too.
    compare_rotated::<T>(before, after, shape, None, |t, x| reference::rotate_head(x, positions[t] as f64, rot))
}

/// [`compare_rope`] for M-RoPE positions (three rows of `stride`).
pub(crate) fn compare_rope_mrope<T: Dtype>(
    before: &[Vec<f64>; 2],
    after: &[Vec<f64>; 2],
    positions: &[i32],
    stride: usize,
    shape: &RopeShape,
    rot: &Rotary,
    m: &MRope,
) -> Result<CheckReport> {
    compare_rotated::<T>(before, after, shape, None, |t, x| {
        let pos = [0, 1, 2].map(|c| positions[c * stride + t] as f64);
        reference::rotate_head_mrope(x, pos, rot, m)
    })
}

/// Each head of token `t` of `before`, normalised by `norm` if any, then rotated by
/// `rotate(t, head)`, against `after`. The norm's f32 arithmetic (a sum of squares, a
/// reciprocal square root) is far inside the tolerance's 1e-5 relative.
fn compare_rotated<T: Dtype>(
    before: &[Vec<f64>; 2],
    after: &[Vec<f64>; 2],
    shape: &RopeShape,
    norm: Option<&QkNorm<&[f32]>>,
    rotate: impl Fn(usize, &mut [f64]),
) -> Result<CheckReport> {
    let tol = Tolerance::rope::<T>(max_abs(&after[0]).max(max_abs(&after[1])));
    let d = shape.head_dim;
    let mut reports = Vec::new();
    for (i, (heads, stride)) in [(shape.q_heads, shape.q_row_stride), (shape.k_heads, shape.k_row_stride)].into_iter().enumerate() {
        let mut want = before[i].clone();
        let tokens = if heads == 0 { 0 } else { shape.tokens };  // no rows to slice
        for t in 0..tokens {
            let row = &mut want[t * stride..t * stride + heads * d];
            if let Some(n) = norm {
                reference::qk_norm_row(row, d, n.eps, n.scope, if i == 0 { n.q_weight } else { n.k_weight })?;
            }
            for head in row.chunks_mut(d) {
                rotate(t, head);
            }
        }
        reports.push(CheckReport::compare("rope", &after[i], &want, tol));
    }
    let k_rep = reports.pop().unwrap();
    reports.pop().unwrap().worst(k_rep).ensure()
}
