//! The ops on candle [`Tensor`]s (feature `candle`): RoPE in place or out of place (with the QK
//! norm before it, or the norm alone; from Qwen3-Next's gated query: [`qk_norm_rope_gated`]), fused
//! attention prefill (causal, GQA, sliding window and sinks, ALiBi, ReRoPE), paged decode and
//! chunked prefill over a paged cache, each also with the output gate fused
//! ([`attention_prefill_gated`] and its twins: Qwen3-Next, Qwen3.5, LFM3).
//!
//! CUDA tensors (feature `candle-cuda`) run our kernels on the tensor's own device and on the
//! stream candle uses for it, so they order with candle's own ops and nothing syncs the host.
//! CPU tensors run the f64 reference ([`reference`](crate::reference)), rounded once to the
//! tensor's dtype: exact, slow, meant for tests and for checking a model on a machine without
//! a GPU. Both paths validate with the kernels' own checks ([`RopeShape::check`],
//! [`AttentionBatch::check`], [`DecodeBatch::check`]), so a call that CPU tensors accept is one
//! the kernels accept (pointer alignment excepted: only a device allocation has one).
//!
//! # Layouts
//! Token-major, as FlashAttention's varlen API and candle-nn's `rope_thd`:
//! * Q `[tokens, Hq, d]`, K and V `[tokens, Hkv, d]`. Heads and components must be contiguous
//!   (strides `[s, d, 1]`); rows may be `s >= H·d` apart, so narrow views of a packed QKV
//!   projection work without a copy. A `[b, h, t, d]` tensor becomes
//!   `x.transpose(1, 2)?.reshape((b * t, h, d))?`; anything else is an [`Error::Shape`].
//! * A batch of sequences is packed along `tokens`, with host-side lengths (`seqlens_q`,
//!   `seqlens_k`). Query m of a sequence sits at position `seqlen_k - seqlen_q + m` and key j
//!   at j (causal masks are bottom-right aligned: chunked prefill works).
//! * Paged KV caches: K and V `[num_pages, page_size, Hkv, d]`, contiguous, unrotated keys
//!   (decode rotates them at their positions). They may be two views of one
//!   `[2, num_pages, page_size, Hkv, d]` tensor (vLLM's layout). Block table `[batch, max_pages]`,
//!   context lengths `[batch]`, slots `[tokens]` (`page * page_size + offset`).
//! * Integer tensors (positions, block table, lengths, slots): U32, I32 or I64, contiguous, on
//!   the same device as the rest; the kernels read them as i32 (I64 costs a cast on CUDA).
//!   Positions are `0 ..= i32::MAX`: CPU tensors are checked, CUDA ones cannot be without a sync.
//! * Float tensors: F32, F16 or BF16 (the kernels' types), all of one call in the same dtype.
//!   Outputs have that dtype; log-sum-exps are F32 `[Hq, tokens]`, natural log, `-inf` for a
//!   query that sees no key (its output row is 0).
//!
//! # From a server
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use rope_attn::{candle as ra, AttentionParams, Layout, RopeConfig, Rotary};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu; // or Device::new_cuda(0)? with the `candle-cuda` feature
//! let cfg = RopeConfig::new(10000.0, 64)?; // or RopeConfig::from_hf_config_json(&config_json)?
//! let mut p = AttentionParams::new(8, 2, 64); // Hq, Hkv, d: causal, 1/sqrt(d)
//! p.rope = Some(Rotary::from_schedule(&cfg.schedule(None)?, Layout::Half));
//! // Prefill two prompts (5 and 3 tokens) packed along the token axis; K, V stay unrotated.
//! let q = Tensor::randn(0f32, 1.0, (8, 8, 64), &dev)?;
//! let (k, v) = (Tensor::randn(0f32, 1.0, (8, 2, 64), &dev)?, Tensor::randn(0f32, 1.0, (8, 2, 64), &dev)?);
//! let (out, _lse) = ra::attention_prefill(&q, &k, &v, &p, &[5, 3], &[5, 3])?;
//! // Keep K, V in a paged cache (16 pages of 4 tokens): prompt 0 in pages 0-1, prompt 1 in page 2.
//! let (kc, vc) = (Tensor::zeros((16, 4, 2, 64), DType::F32, &dev)?, Tensor::zeros((16, 4, 2, 64), DType::F32, &dev)?);
//! let slots = Tensor::new(&[0u32, 1, 2, 3, 4, 8, 9, 10], &dev)?;
//! ra::paged_append(&k, &v, &kc, &vc, &slots)?;
//! // Decode one new token per sequence: append it, then attend over the cache.
//! let (q1, k1, v1) = (q.narrow(0, 0, 2)?, k.narrow(0, 0, 2)?, v.narrow(0, 0, 2)?); // stand-ins
//! ra::paged_append(&k1, &v1, &kc, &vc, &Tensor::new(&[5u32, 11], &dev)?)?;
//! let table = Tensor::new(&[[0u32, 1], [2, 3]], &dev)?;
//! let lens = Tensor::new(&[6u32, 4], &dev)?;
//! let (out1, _) = ra::attention_decode(&q1, &kc, &vc, &table, &lens, 8, &p)?;
//! assert_eq!((out.dims(), out1.dims()), (&[8, 8, 64][..], &[2, 8, 64][..]));
//! # Ok(()) }
//! ```
//!
//! Errors are [`crate::Error`]s (shape, dtype, stride, device); `?` turns them into a
//! `candle_core::Error` inside candle code (`From` is implemented).

mod cpu;
mod gated;
#[cfg(feature = "candle-cuda")]
mod gpu;
mod output_gate;

pub use gated::qk_norm_rope_gated;
pub use output_gate::{attention_decode_gated, attention_prefill_gated, attention_prefill_paged_gated};

use crate::attention::{AttentionParams, Rotary};
use crate::config::MRope;
use crate::cuda::{
    attention_fwd_workspace_len, AttentionBatch, DecodeBatch, DecodeLens, FwdLens, PagedFwdLens, PagedKvCache, PagedPrefillBatch, RopeShape,
};
use crate::error::{Error, Result};
use crate::qk_norm::QkNorm;
use candle_core::{DType, Device, Tensor};

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Geometry of a `[rows, heads, head_dim]` tensor whose heads and components are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rows {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Element offset of row 0 in the storage.
    pub offset: usize,
    /// Elements between rows (>= heads * head_dim).
    pub stride: usize,
}

impl Rows {
    /// Elements from the first to one past the last element used.
    pub fn span(&self) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * self.stride + self.heads * self.head_dim
        }
    }

    /// Storage index of head `h` of row `r`.
    pub fn at(&self, r: usize, h: usize) -> usize {
        self.offset + r * self.stride + h * self.head_dim
    }
}

fn dims_str(t: &Tensor) -> String {
    format!("{:?}", t.dims())
}

/// The row geometry of `t` or an error saying what layout is expected.
pub(crate) fn rows(what: &'static str, t: &Tensor) -> Result<Rows> {
    let &[n, h, d] = t.dims() else {
        return Err(Error::Shape { what, expected: "[tokens, heads, head_dim]".into(), got: dims_str(t) });
    };
    let st = t.layout().stride();
    if (d > 1 && st[2] != 1) || (h > 1 && st[1] != d) {
        return Err(Error::Shape {
            what,
            expected: format!("heads and components contiguous, strides [s, {d}, 1] (call .contiguous())"),
            got: format!("strides {st:?}"),
        });
    }
    let stride = if n <= 1 { h * d } else { st[0] };
    if stride < h * d {
        return Err(Error::Stride { what, stride, min: h * d });
    }
    Ok(Rows { rows: n, heads: h, head_dim: d, offset: t.layout().start_offset(), stride })
}

/// F32, F16 or BF16.
fn float_dtype(what: &'static str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        d @ (DType::F32 | DType::F16 | DType::BF16) => Ok(d),
        d => {
            let _ = what; // Error::DtypeMismatch names the dtypes, not the tensor
            Err(Error::DtypeMismatch { expected: "f32, f16 or bf16", got: d.as_str() })
        }
    }
}

fn same_dtype(first: &Tensor, t: &Tensor) -> Result<()> {
    if t.dtype() != first.dtype() {
        return Err(Error::DtypeMismatch { expected: first.dtype().as_str(), got: t.dtype().as_str() });
    }
    Ok(())
}

fn same_device(first: &Tensor, what: &'static str, t: &Tensor) -> Result<()> {
    if !first.device().same_device(t.device()) {
        return Err(Error::Device {
            what,
            expected: format!("a tensor on {:?} (the device of the first argument)", first.device().location()),
            got: format!("one on {:?}", t.device().location()),
        });
    }
    Ok(())
}

/// An integer tensor of the given dims.
fn int_tensor(what: &'static str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if !matches!(t.dtype(), DType::U32 | DType::I32 | DType::I64) {
        return Err(Error::DtypeMismatch { expected: "u32, i32 or i64", got: t.dtype().as_str() });
    }
    if t.dims() != dims {
        return Err(Error::Shape { what, expected: format!("{dims:?}"), got: dims_str(t) });
    }
    if !t.is_contiguous() {
        return Err(Error::Shape { what, expected: "a contiguous tensor".into(), got: format!("strides {:?}", t.layout().stride()) });
    }
    Ok(())
}

/// Whether two tensors are views of one storage. Each read lock is released before the next
/// is taken (holding two on one lock can deadlock against a waiting writer).
pub(crate) fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let addr = |t: &Tensor| {
        let (s, _) = t.storage_and_layout();
        &*s as *const candle_core::Storage as usize
    };
    addr(a) == addr(b)
}

/// Which implementation a device gets.
enum On {
    Cpu,
    #[cfg(feature = "candle-cuda")]
    Cuda,
}

fn on(t: &Tensor) -> Result<On> {
    match t.device() {
        Device::Cpu => Ok(On::Cpu),
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(_) => Ok(On::Cuda),
        #[cfg(not(feature = "candle-cuda"))]
        Device::Cuda(_) => Err(Error::NoDevice("rope-attn was built without the `candle-cuda` feature, which CUDA tensors need".into())),
        Device::Metal(_) => Err(Error::NoDevice("Metal tensors are not supported (CPU and CUDA only)".into())),
    }
}

/// Errors from candle itself (our own come back typed through the ops' error slot).
pub(crate) fn candle_error(e: candle_core::Error) -> Error {
    Error::Candle(e.to_string())
}

/// Run `$body` with `$T` the kernel element type of a candle dtype.
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err($crate::error::Error::DtypeMismatch { expected: "f32, f16 or bf16", got: other.as_str() }),
        }
    };
}
#[cfg(feature = "candle-cuda")]
pub(crate) use with_dtype;

/// A host copy of an integer tensor (any device; a CUDA tensor is copied back, which syncs).
fn host_ints(t: &Tensor) -> Result<Vec<i64>> {
    t.to_dtype(DType::I64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<i64>()).map_err(candle_error)
}

/// Positions must fit the kernels' i32 and be non-negative (the reference rotates from 0 up).
fn check_positions(pos: &[i64]) -> Result<()> {
    for &p in pos {
        if !(0..=i32::MAX as i64).contains(&p) {
            return Err(Error::Position { what: "position", value: p, limit: i32::MAX as i64 });
        }
    }
    Ok(())
}

/// Validated operands of a rope call.
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
struct RopeCall {
    q: Rows,
    k: Rows,
    shape: RopeShape,
}

fn rope_call(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary) -> Result<RopeCall> {
    rope_call_with(q, k, positions, rot, None)
}

/// [`rope_call`] for plain positions (`[tokens]`) or M-RoPE rows (`[3, tokens]`).
fn rope_call_with(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, mrope: Option<&MRope>) -> Result<RopeCall> {
    let RopeCall { q: qr, k: kr, shape } = qk_rows(q, k)?;
    same_device(q, "positions", positions)?;
    match mrope {
        None => int_tensor("positions", positions, &[qr.rows])?,
        Some(_) => int_tensor("positions", positions, &[3, qr.rows])?,
    }
    match mrope {
        None => shape.check(qr.span(), kr.span(), qr.rows, rot)?,
        Some(m) => shape.check_mrope(qr.span(), kr.span(), 3 * qr.rows, qr.rows, rot, m)?,
    }
    Ok(RopeCall { q: qr, k: kr, shape })
}

/// Q and K of one dtype and device, with as many tokens and the same head_dim, as one rope
/// kernel geometry (not yet checked against a rotation or a norm).
fn qk_rows(q: &Tensor, k: &Tensor) -> Result<RopeCall> {
    float_dtype("q", q)?;
    same_dtype(q, k)?;
    same_device(q, "k", k)?;
    let (qr, kr) = (rows("q", q)?, rows("k", k)?);
    if kr.rows != qr.rows || kr.head_dim != qr.head_dim {
        return Err(Error::Shape {
            what: "k",
            expected: format!("[{}, Hk, {}] (as q)", qr.rows, qr.head_dim),
            got: dims_str(k),
        });
    }
    let shape = RopeShape {
        tokens: qr.rows,
        q_heads: qr.heads,
        k_heads: kr.heads,
        head_dim: qr.head_dim,
        q_row_stride: qr.stride,
        k_row_stride: kr.stride,
    };
    Ok(RopeCall { q: qr, k: kr, shape })
}

/// Validate a QK-norm call: Q and K, the weights (F32, one dimension, contiguous, on Q's
/// device) and the norm as the kernel takes it ([`RopeShape::check_norm`]).
fn norm_call(q: &Tensor, k: &Tensor, norm: &QkNorm<&Tensor>) -> Result<RopeCall> {
    let call = qk_rows(q, k)?;
    norm_weights(q, norm)?;
    call.shape.check_norm(call.q.span(), call.k.span(), norm, |w| w.elem_count())?;
    Ok(call)
}

/// The norm's weights: F32, one dimension, contiguous, on `q`'s device (lengths: the kernel's checks).
fn norm_weights(q: &Tensor, norm: &QkNorm<&Tensor>) -> Result<()> {
    for (what, w) in [("qk_norm q_weight", norm.q_weight), ("qk_norm k_weight", norm.k_weight)] {
        let Some(w) = w else { continue };
        if w.dtype() != DType::F32 {
            return Err(Error::DtypeMismatch { expected: "f32 (norm weights; Gemma's 1 + w added already)", got: w.dtype().as_str() });
        }
        if w.rank() != 1 || !w.is_contiguous() {
            return Err(Error::Shape { what, expected: "a contiguous 1-D tensor".into(), got: dims_str(w) });
        }
        same_device(q, what, w)?;
    }
    Ok(())
}

/// The QK norm ([`QkNorm`]: Qwen3, Gemma 3, OLMo 2, Llama 4) on Q `[tokens, Hq, d]` and K
/// `[tokens, Hk, d]` in place: each head (or, [`NormScope::Heads`](crate::NormScope::Heads),
/// each token's heads together) over its root mean square, times its weight: F32 tensors of
/// `d` (per head) or `H·d` (all heads), on Q's device; `None` for ones. Before the attention
/// calls, which rotate (K before [`paged_append`]). CPU tensors: the f64 reference.
pub fn qk_norm_inplace(q: &Tensor, k: &Tensor, norm: &QkNorm<&Tensor>) -> Result<()> {
    let call = norm_call(q, k, norm)?;
    normed_in_place(q, k, None, norm, &call)
}

/// The QK norm, then RoPE ([`rope_inplace`]), in place in one pass: for a pre-rotated cache.
pub fn rope_normed_inplace(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, norm: &QkNorm<&Tensor>) -> Result<()> {
    let call = rope_call(q, k, positions, rot)?;
    norm_call(q, k, norm)?;
    normed_in_place(q, k, Some((positions, rot)), norm, &call)
}

fn normed_in_place(q: &Tensor, k: &Tensor, rotation: Option<(&Tensor, &Rotary)>, norm: &QkNorm<&Tensor>, call: &RopeCall) -> Result<()> {
    match on(q)? {
        On::Cpu => {
            let pos = match rotation {
                Some((p, _)) => host_ints(p)?,
                None => Vec::new(),
            };
            check_positions(&pos)?;
            let host = |w: Option<&Tensor>| w.map(|w| w.to_vec1::<f32>()).transpose().map_err(candle_error);
            let (qw, kw) = (host(norm.q_weight)?, host(norm.k_weight)?);
            let rot = rotation.map(|(_, r)| r);
            cpu::normed_inplace(q, call.q, &pos, rot, None, &QkNorm { eps: norm.eps, scope: norm.scope, q_weight: qw.as_deref(), k_weight: None })?;
            cpu::normed_inplace(k, call.k, &pos, rot, None, &QkNorm { eps: norm.eps, scope: norm.scope, q_weight: kw.as_deref(), k_weight: None })
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::normed_inplace(q, k, rotation, norm, call),
    }
}

/// Rotate Q `[tokens, Hq, d]` and K `[tokens, Hk, d]`, token t to `positions[t]`, into new dense
/// tensors (inputs untouched; pass-through components copied; rotated ones times the attention
/// factor). The rotation's [`Layout`](crate::Layout) decides half (NeoX) or interleaved (GPT-J) pairs.
pub fn rope(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary) -> Result<(Tensor, Tensor)> {
    let _call = rope_call(q, k, positions, rot)?;
    match on(q)? {
        On::Cpu => {
            let pos = host_ints(positions)?;
            check_positions(&pos)?;
            cpu::rope(q, k, &pos, rot)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::rope(q, k, positions, rot, &_call.shape),
    }
}

/// [`rope`] in place: Q and K (which may be views of one packed QKV tensor) are overwritten.
/// What a server does after the QKV projection: no allocation, one launch per tensor.
pub fn rope_inplace(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary) -> Result<()> {
    rotate_in_place(q, k, positions, rot, None)
}

/// Multimodal RoPE ([`MRope`]: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) in place: `positions`
/// is `[3, tokens]` (time, height and width rows, transformers' `position_ids` without its
/// batch axis), and pair `i` of token `t` is rotated to `positions[mrope.component(i), t]`.
/// Then attend with `rope: None`; text tokens (three equal positions) rotate as [`rope_inplace`].
pub fn rope_mrope_inplace(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, mrope: &MRope) -> Result<()> {
    rotate_in_place(q, k, positions, rot, Some(mrope))
}

/// [`rope_inplace`] (positions `[tokens]`) or [`rope_mrope_inplace`] (`[3, tokens]`).
fn rotate_in_place(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, mrope: Option<&MRope>) -> Result<()> {
    let call = rope_call_with(q, k, positions, rot, mrope)?;
    match on(q)? {
        On::Cpu => {
            let pos = host_ints(positions)?;
            check_positions(&pos)?;
            cpu::rotate_inplace(q, call.q, &pos, rot, mrope)?;
            cpu::rotate_inplace(k, call.k, &pos, rot, mrope)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::rope_inplace(q, k, positions, rot, mrope, &call),
    }
}

/// Validated operands of a prefill call.
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
struct PrefillCall {
    batch: AttentionBatch,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
}

fn prefix_sums(s: &[usize]) -> Vec<usize> {
    std::iter::once(0).chain(s.iter().scan(0, |a, &x| {
        *a += x;
        Some(*a)
    }))
    .collect()
}

fn heads_match(what: &'static str, r: &Rows, heads: usize, p: &AttentionParams) -> Result<()> {
    if r.heads != heads || r.head_dim != p.head_dim {
        return Err(Error::Shape {
            what,
            expected: format!("[_, {heads}, {}] (from the AttentionParams)", p.head_dim),
            got: format!("[{}, {}, {}]", r.rows, r.heads, r.head_dim),
        });
    }
    Ok(())
}

fn prefill_call(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams, seqlens_q: &[usize], seqlens_k: &[usize]) -> Result<PrefillCall> {
    p.validate()?;
    let dt = float_dtype("q", q)?;
    for (what, t) in [("k", k), ("v", v)] {
        same_dtype(q, t)?;
        same_device(q, what, t)?;
    }
    let (qr, kr, vr) = (rows("q", q)?, rows("k", k)?, rows("v", v)?);
    heads_match("q", &qr, p.num_q_heads, p)?;
    heads_match("k", &kr, p.num_kv_heads, p)?;
    heads_match("v", &vr, p.num_kv_heads, p)?;
    if seqlens_q.len() != seqlens_k.len() {
        return Err(Error::Shape {
            what: "seqlens_k",
            expected: format!("{} sequences (as seqlens_q)", seqlens_q.len()),
            got: seqlens_k.len().to_string(),
        });
    }
    let (cu_q, cu_k) = (prefix_sums(seqlens_q), prefix_sums(seqlens_k));
    let (tq, tk) = (cu_q[seqlens_q.len()], cu_k[seqlens_k.len()]);
    for (what, total, rows) in [("seqlens_q", tq, qr.rows), ("seqlens_k", tk, kr.rows), ("seqlens_k", tk, vr.rows)] {
        if total != rows {
            return Err(Error::Shape { what, expected: format!("lengths summing to {rows} (the tensor's tokens)"), got: total.to_string() });
        }
    }
    let batch = AttentionBatch {
        batch: seqlens_q.len(),
        max_seqlen_q: seqlens_q.iter().copied().max().unwrap_or(0),
        total_q: tq,
        total_k: tk,
        q_row_stride: qr.stride,
        k_row_stride: kr.stride,
        v_row_stride: vr.stride,
        o_row_stride: p.num_q_heads * p.head_dim,
    };
    let lens = FwdLens {
        q: qr.span(),
        k: kr.span(),
        v: vr.span(),
        out: tq * p.num_q_heads * p.head_dim,
        lse: p.num_q_heads * tq,
        cu_seqlens_q: cu_q.len(),
        cu_seqlens_k: cu_k.len(),
        workspace: Some(attention_fwd_workspace_len(p, tk)),
    };
    with_dtype!(dt, T => batch.check::<T>(p, &lens))?;
    Ok(PrefillCall { batch, cu_q, cu_k })
}

/// Prefill attention over a packed batch of sequences: Q `[total_q, Hq, d]`, K and V
/// `[total_k, Hkv, d]` (all unrotated: RoPE, ReRoPE and ALiBi come from `p`), sequence b owning
/// `seqlens_q[b]` query rows and `seqlens_k[b]` key rows. Returns the output `[total_q, Hq, d]`
/// and the log-sum-exp `[Hq, total_q]` (F32).
pub fn attention_prefill(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttentionParams,
    seqlens_q: &[usize],
    seqlens_k: &[usize],
) -> Result<(Tensor, Tensor)> {
    prefill(q, k, v, None, p, seqlens_q, seqlens_k)
}

/// [`attention_prefill`], gated or not.
fn prefill(q: &Tensor, k: &Tensor, v: &Tensor, gate: Option<&Tensor>, p: &AttentionParams, seqlens_q: &[usize], seqlens_k: &[usize]) -> Result<(Tensor, Tensor)> {
    let call = prefill_call(q, k, v, p, seqlens_q, seqlens_k)?;
    let gate = gate.map(|g| output_gate::gate_of(g, q, call.batch.total_q, p)).transpose()?;
    match on(q)? {
        On::Cpu => cpu::attention_prefill(q, k, v, gate.as_ref(), p, &call.cu_q, &call.cu_k),
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::attention_prefill(q, k, v, gate.as_ref(), p, &call.batch, &call.cu_q, &call.cu_k),
    }
}

/// A paged cache tensor's geometry `[num_pages, page_size, Hkv, d]` (contiguous).
fn cache_of(what: &'static str, t: &Tensor) -> Result<PagedKvCache> {
    let &[num_pages, page_size, kv_heads, head_dim] = t.dims() else {
        return Err(Error::Shape { what, expected: "[num_pages, page_size, kv_heads, head_dim]".into(), got: dims_str(t) });
    };
    if !t.is_contiguous() {
        return Err(Error::Shape {
            what,
            expected: "a contiguous cache".into(),
            got: format!("strides {:?}", t.layout().stride()),
        });
    }
    Ok(PagedKvCache { num_pages, page_size, kv_heads, head_dim })
}

fn caches(k_cache: &Tensor, v_cache: &Tensor) -> Result<PagedKvCache> {
    let cache = cache_of("k_cache", k_cache)?;
    if cache_of("v_cache", v_cache)? != cache {
        return Err(Error::Shape { what: "v_cache", expected: format!("{:?} (as k_cache)", k_cache.dims()), got: dims_str(v_cache) });
    }
    same_dtype(k_cache, v_cache)?;
    same_device(k_cache, "v_cache", v_cache)?;
    Ok(cache)
}

/// The operands every paged call shares, validated: Q's rows, the caches, and the block table's
/// `[batch, max_pages]`.
struct PagedOperands {
    q: Rows,
    cache: PagedKvCache,
    batch: usize,
    max_pages: usize,
}

fn paged_operands(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    p: &AttentionParams,
) -> Result<PagedOperands> {
    p.validate()?;
    float_dtype("q", q)?;
    let qr = rows("q", q)?;
    heads_match("q", &qr, p.num_q_heads, p)?;
    let cache = caches(k_cache, v_cache)?;
    same_dtype(q, k_cache)?;
    for (what, t) in [("k_cache", k_cache), ("block_table", block_table), ("context_lens", context_lens)] {
        same_device(q, what, t)?;
    }
    let &[batch, max_pages] = block_table.dims() else {
        return Err(Error::Shape { what: "block_table", expected: "[batch, max_pages]".into(), got: dims_str(block_table) });
    };
    int_tensor("block_table", block_table, &[batch, max_pages])?;
    int_tensor("context_lens", context_lens, &[batch])?;
    Ok(PagedOperands { q: qr, cache, batch, max_pages })
}

/// Validated operands of a decode call.
struct DecodeCall {
    batch: DecodeBatch,
    cache: PagedKvCache,
}

fn decode_call(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    max_context: usize,
    p: &AttentionParams,
) -> Result<DecodeCall> {
    let PagedOperands { q: qr, cache, batch: b, max_pages } = paged_operands(q, k_cache, v_cache, block_table, context_lens, p)?;
    if b == 0 || qr.rows % b != 0 {
        return Err(Error::Shape {
            what: "q",
            expected: format!("[batch * queries, Hq, d] with batch = {b} (the block table's rows)"),
            got: dims_str(q),
        });
    }
    let batch = DecodeBatch {
        batch: b,
        queries: qr.rows / b,
        max_pages,
        max_context,
        q_row_stride: qr.stride,
        o_row_stride: p.num_q_heads * p.head_dim,
    };
    let lens = DecodeLens {
        q: qr.span(),
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: b * max_pages,
        context_lens: b,
        out: qr.rows * p.num_q_heads * p.head_dim,
        lse: p.num_q_heads * qr.rows,
        workspace: None,
    };
    batch.check(p, &cache, &lens, 1)?;
    Ok(DecodeCall { batch, cache })
}

/// Paged decode: each of the `batch` sequences (rows of `block_table`) has `queries` new
/// tokens (`q` is `[batch * queries, Hq, d]`, already appended to the cache with
/// [`paged_append`]), sitting at positions `context_lens[b] - queries ..`; keys are read
/// through the block table and rotated at their positions. `max_context` bounds every
/// `context_lens[b]` (known on the host: it sizes the kernel's key splits without a sync).
/// Returns the output `[batch * queries, Hq, d]` and log-sum-exp `[Hq, batch * queries]` (F32).
pub fn attention_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    max_context: usize,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    decode(q, k_cache, v_cache, block_table, context_lens, None, max_context, p)
}

/// [`attention_decode`], gated or not.
#[allow(clippy::too_many_arguments)]
fn decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: Option<&Tensor>,
    max_context: usize,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let call = decode_call(q, k_cache, v_cache, block_table, context_lens, max_context, p)?;
    let b = &call.batch;
    let gate = gate.map(|g| output_gate::gate_of(g, q, b.tokens(), p)).transpose()?;
    match on(q)? {
        On::Cpu => {
            let cu_q: Vec<usize> = (0..=b.batch).map(|i| i * b.queries).collect();
            let (table, lens) = (host_ints(block_table)?, host_ints(context_lens)?);
            cpu::attention_paged(q, k_cache, v_cache, gate.as_ref(), &table, &lens, &cu_q, b.max_pages, b.max_context, &call.cache, p)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::attention_decode(q, k_cache, v_cache, block_table, context_lens, gate.as_ref(), b, &call.cache, p),
    }
}

/// Validated operands of a paged prefill call.
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
struct PagedPrefillCall {
    batch: PagedPrefillBatch,
    cache: PagedKvCache,
    cu_q: Vec<usize>,
}

#[allow(clippy::too_many_arguments)]
fn paged_prefill_call(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    seqlens_q: &[usize],
    total_context: Option<usize>,
    p: &AttentionParams,
) -> Result<PagedPrefillCall> {
    let PagedOperands { q: qr, cache, batch: b, max_pages } = paged_operands(q, k_cache, v_cache, block_table, context_lens, p)?;
    if seqlens_q.len() != b {
        return Err(Error::Shape {
            what: "seqlens_q",
            expected: format!("{b} sequences (the block table's rows)"),
            got: seqlens_q.len().to_string(),
        });
    }
    let cu_q = prefix_sums(seqlens_q);
    if cu_q[b] != qr.rows {
        return Err(Error::Shape { what: "seqlens_q", expected: format!("lengths summing to {} (q's tokens)", qr.rows), got: cu_q[b].to_string() });
    }
    let batch = PagedPrefillBatch {
        batch: b,
        max_seqlen_q: seqlens_q.iter().copied().max().unwrap_or(0),
        total_q: qr.rows,
        max_pages,
        total_context,
        q_row_stride: qr.stride,
        o_row_stride: p.num_q_heads * p.head_dim,
    };
    let lens = PagedFwdLens {
        q: qr.span(),
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: b * max_pages,
        context_lens: b,
        cu_seqlens_q: b + 1,
        out: qr.rows * p.num_q_heads * p.head_dim,
        lse: p.num_q_heads * qr.rows,
        workspace: None,
        gather: None,
    };
    // One split here; the CUDA path plans its splits (and their workspace) for the device.
    with_dtype!(q.dtype(), T => batch.check::<T>(p, &cache, &lens, 1))?;
    Ok(PagedPrefillCall { batch, cache, cu_q })
}

/// Chunked prefill over a paged cache: sequence b's `seqlens_q[b]` new query rows (packed in
/// `q` `[total_q, Hq, d]`, their K/V already appended with [`paged_append`]) are the last of
/// its `context_lens[b]` cached tokens, and attend to all of them through the block table (on
/// CUDA, chunks longer than one query tile gather the context's keys, rotated once, and values
/// into a workspace first: `cuda::attention_fwd_paged`'s gathered path). Query m sits at
/// position `context_lens[b] - seqlens_q[b] + m`.
/// `total_context` bounds the context lengths added up (known on the host, like decode's
/// `max_context`): it sizes the CUDA path's gather workspace, which holds the sequences' keys
/// packed. `None` sizes it for every slot of the block table (`batch · max_pages · page_size`),
/// far more than needed when the table is as wide as the model's longest context. A bound below
/// the real sum is an error on the CPU; on CUDA (checked without a sync, so not checked) the
/// sequences past the bound would see fewer keys, never memory outside the workspace.
/// F16 and BF16 (the kernel runs on tensor cores; CPU tensors are held to the same rule).
/// Returns the output `[total_q, Hq, d]` and log-sum-exp `[Hq, total_q]` (F32).
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    seqlens_q: &[usize],
    total_context: Option<usize>,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    prefill_paged(q, k_cache, v_cache, block_table, context_lens, None, seqlens_q, total_context, p)
}

/// [`attention_prefill_paged`], gated or not.
#[allow(clippy::too_many_arguments)]
fn prefill_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: Option<&Tensor>,
    seqlens_q: &[usize],
    total_context: Option<usize>,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let call = paged_prefill_call(q, k_cache, v_cache, block_table, context_lens, seqlens_q, total_context, p)?;
    let gate = gate.map(|g| output_gate::gate_of(g, q, call.batch.total_q, p)).transpose()?;
    match on(q)? {
        On::Cpu => {
            let (b, c) = (&call.batch, &call.cache);
            let (table, lens) = (host_ints(block_table)?, host_ints(context_lens)?);
            if let Some(total) = total_context {
                let sum: i64 = lens.iter().map(|&n| n.max(0)).sum();
                if sum > total as i64 {
                    return Err(Error::Position { what: "context_lens (added up, against total_context)", value: sum, limit: total as i64 });
                }
            }
            cpu::attention_paged(q, k_cache, v_cache, gate.as_ref(), &table, &lens, &call.cu_q, b.max_pages, b.max_pages * c.page_size, c, p)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::attention_prefill_paged(q, k_cache, v_cache, block_table, context_lens, gate.as_ref(), &call.batch, &call.cache, &call.cu_q, p),
    }
}

/// Write new unrotated K and V rows `[tokens, Hkv, d]` into the paged caches at `slots[t]`
/// (`page * page_size + offset`, vLLM's slot mapping). Slots that are negative or past the pool
/// are skipped, as the kernel does (padding tokens). The caches are modified in place; they may
/// be views of one tensor, but not of the storage `k` or `v` live in.
pub fn paged_append(k: &Tensor, v: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slots: &Tensor) -> Result<()> {
    append(k, v, k_cache, v_cache, slots, None)
}

/// [`paged_append`] with Gemma 3n's and Gemma 4's V norm fused (`HfLayer::v_norm`): each V head
/// is cached RMS-normalised without weights (`v / sqrt(mean(v²) + eps)`; on CUDA in f32 in the
/// append kernel, on the CPU in f64), rounded once; K is cached as it is.
pub fn paged_append_v_normed(k: &Tensor, v: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slots: &Tensor, v_norm_eps: f64) -> Result<()> {
    append(k, v, k_cache, v_cache, slots, Some(v_norm_eps))
}

fn append(k: &Tensor, v: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slots: &Tensor, v_norm_eps: Option<f64>) -> Result<()> {
    crate::cuda::append::check_v_norm_eps(v_norm_eps)?;
    let cache = caches(k_cache, v_cache)?;
    float_dtype("k_cache", k_cache)?;
    for (what, t) in [("k", k), ("v", v)] {
        same_dtype(k_cache, t)?;
        same_device(k_cache, what, t)?;
    }
    same_device(k_cache, "slots", slots)?;
    let (kr, vr) = (rows("k", k)?, rows("v", v)?);
    for (what, r) in [("k", &kr), ("v", &vr)] {
        if r.heads != cache.kv_heads || r.head_dim != cache.head_dim || r.rows != kr.rows {
            return Err(Error::Shape {
                what,
                expected: format!("[{}, {}, {}] (tokens as k, heads and dim as the cache)", kr.rows, cache.kv_heads, cache.head_dim),
                got: format!("[{}, {}, {}]", r.rows, r.heads, r.head_dim),
            });
        }
    }
    int_tensor("slots", slots, &[kr.rows])?;
    for (what, t) in [("k", k), ("v", v)] {
        if same_storage(t, k_cache) || same_storage(t, v_cache) {
            return Err(Error::Shape { what, expected: "new rows outside the caches' storage".into(), got: "a view of a cache".into() });
        }
    }
    if same_storage(k_cache, v_cache) {
        let (a, b) = (k_cache.layout().start_offset(), v_cache.layout().start_offset());
        if a.abs_diff(b) < cache.len() {
            return Err(Error::Shape { what: "v_cache", expected: "a view disjoint from k_cache".into(), got: format!("offsets {a} and {b}, {} elements each", cache.len()) });
        }
    }
    let slots_max = cache.num_pages * cache.page_size;
    if i32::try_from(slots_max).is_err() {
        return Err(Error::Position { what: "num_pages * page_size", value: slots_max as i64, limit: i32::MAX as i64 });
    }
    if kr.rows == 0 {
        return Ok(());
    }
    match on(k_cache)? {
        On::Cpu => {
            let slots = host_ints(slots)?;
            cpu::paged_append(k, v, k_cache, v_cache, kr, vr, &slots, &cache, v_norm_eps)
        }
        #[cfg(feature = "candle-cuda")]
        On::Cuda => gpu::paged_append(k, v, k_cache, v_cache, kr, vr, slots, &cache, v_norm_eps),
    }
}

/// Dense `[rows, heads, head_dim]` f64 values of a tensor (any layout, any float dtype).
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()).map_err(candle_error)
}

/// The tensor of `dims` holding `x` rounded once to `dtype`.
fn from_f64(x: Vec<f64>, dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(x, dims, device).and_then(|t| t.to_dtype(dtype)).map_err(candle_error)
}

/// For the ops' error slot: the first typed error raised inside candle's op machinery.
#[derive(Default)]
pub(crate) struct ErrSlot(std::cell::RefCell<Option<Error>>);

impl ErrSlot {
    /// Keep `e` and give candle an error that says what it was.
    pub fn keep(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        self.0.borrow_mut().get_or_insert(e);
        candle_core::Error::Msg(msg)
    }

    /// The kept error if there is one, else candle's.
    pub fn or(&self, e: candle_core::Error) -> Error {
        self.0.borrow_mut().take().unwrap_or_else(|| candle_error(e))
    }
}

/// Element types with kernels, as candle sees them.
#[cfg(feature = "candle-cuda")]
pub(crate) trait Elem: crate::cuda::Dtype + candle_core::WithDType + candle_core::cuda_backend::CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: crate::cuda::Dtype + candle_core::WithDType + candle_core::cuda_backend::CudaDType> Elem for T {}
