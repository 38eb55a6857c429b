//! Launcher for kernels/attention_fwd.cu: prefill attention over a variable-length batch with
//! RoPE / ReRoPE / ALiBi inside the kernel.
//!
//! Two ways to get rotated keys, picked per call:
//! * **fused**: unrotated K is rotated tile by tile in shared memory as it arrives (no
//!   workspace; every query block re-rotates every K tile, which costs special-function time
//!   on long prefills);
//! * **pre-rotate**: the rope kernel rotates K once into a caller-provided workspace (one
//!   O(N·d) pass; the attention kernel then streams rotated keys). ReRoPE / Leaky ReRoPE and
//!   f32 always take this path (they need the second, far copy of the keys).

use super::checked::{max_abs, widen, CheckReport, Tolerance};
use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{to_i32, AttnParams, GateArgs};
use super::rope::{launch as launch_rope, Positions, RopePtrs, RopeShape};
use super::scores::{check_rows, common, gather_rows, Common};
use crate::attention::{AttentionParams, Relative};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use crate::reference;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Host-side description of a variable-length batch (FlashAttention's varlen convention):
/// sequence b owns query rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` and key/value rows
/// `cu_seqlens_k[b]..cu_seqlens_k[b+1]`; its query m sits at position `seqlen_k - seqlen_q + m`
/// and key j at `j` (so causal masking is bottom-right aligned, as for chunked prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionBatch {
    /// Sequences.
    pub batch: usize,
    /// Longest query sequence (sizes the grid; rows past it are not computed).
    pub max_seqlen_q: usize,
    /// Query rows in all (`cu_seqlens_q[batch]`).
    pub total_q: usize,
    /// Key rows in all (`cu_seqlens_k[batch]`).
    pub total_k: usize,
    /// Elements between query rows (>= Hq·d): views into a packed QKV work.
    pub q_row_stride: usize,
    /// Elements between key rows (>= Hkv·d).
    pub k_row_stride: usize,
    /// Elements between value rows (>= Hkv·d).
    pub v_row_stride: usize,
    /// Elements between output rows (>= Hq·d).
    pub o_row_stride: usize,
}

impl AttentionBatch {
    /// Dense `[total, heads, d]` tensors.
    pub fn contiguous(p: &AttentionParams, batch: usize, max_seqlen_q: usize, total_q: usize, total_k: usize) -> Self {
        let (q, kv) = (p.num_q_heads * p.head_dim, p.num_kv_heads * p.head_dim);
        AttentionBatch { batch, max_seqlen_q, total_q, total_k, q_row_stride: q, k_row_stride: kv, v_row_stride: kv, o_row_stride: q }
    }

    /// One sequence of `nq` queries over `nk` keys.
    pub fn single(p: &AttentionParams, nq: usize, nk: usize) -> Self {
        Self::contiguous(p, 1, nq, nq, nk)
    }
}

/// Which way the keys were rotated (returned so callers and benchmarks can see the choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPath {
    /// No rotation needed (no RoPE).
    Plain,
    /// K rotated tile by tile inside the attention kernel.
    Fused,
    /// K rotated once into the workspace by the rope kernel.
    PreRotated,
}

/// Workspace elements (of T) the pre-rotate path needs: the rotated keys, plus the far keys of
/// Leaky ReRoPE. 0 without RoPE.
pub fn attention_fwd_workspace_len(p: &AttentionParams, total_k: usize) -> usize {
    let keys = total_k * p.num_kv_heads * p.head_dim;
    match (&p.rope, p.relative) {
        (None, _) => 0,
        (Some(_), Relative::Leaky { .. }) => 2 * keys,
        (Some(_), _) => keys,
    }
}

/// Whether to pass a workspace (of [`attention_fwd_workspace_len`]) to [`attention_fwd`] for
/// element type `T`: always when the pre-rotated path is required (ReRoPE / Leaky ReRoPE, f32),
/// never without RoPE, and otherwise once the queries of a sequence fill more than one narrow
/// query tile (64 rows; 32 at head_dim 256 and 512). Past that point the fused path re-rotates each K
/// tile once per query block, while pre-rotated keys cost one pass over K and let the kernel run
/// its wide tile (128 query rows, half the shared-memory traffic per mma), which needs keys ready
/// in memory. The threshold is argued from work counts, unmeasured until BENCHMARKS.md has figures.
pub fn prefill_prefers_workspace<T: Dtype>(p: &AttentionParams, batch: &AttentionBatch) -> bool {
    p.rope.is_some() && (pre_rotation_required::<T>(p) || batch.max_seqlen_q > narrow_tile_rows(p.head_dim))
}

/// Query rows of the narrow prefill kernel (the one that takes every option).
pub(crate) fn narrow_tile_rows(d: usize) -> usize {
    if d >= 256 {
        32
    } else {
        64
    }
}

/// ReRoPE needs the second (far) copy of the keys, and the f32 kernel has no fused path.
fn pre_rotation_required<T: Dtype>(p: &AttentionParams) -> bool {
    p.relative != Relative::None || !is_16bit::<T>()
}

/// Buffer lengths (in elements) of a prefill call: what [`AttentionBatch::check`] validates
/// without touching a device (the launcher runs the same check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwdLens {
    /// Q elements.
    pub q: usize,
    /// K elements.
    pub k: usize,
    /// V elements.
    pub v: usize,
    /// Output elements.
    pub out: usize,
    /// LSE elements (f32).
    pub lse: usize,
    /// `cu_seqlens_q` entries.
    pub cu_seqlens_q: usize,
    /// `cu_seqlens_k` entries.
    pub cu_seqlens_k: usize,
    /// Workspace elements, if one is passed.
    pub workspace: Option<usize>,
}

impl AttentionBatch {
    /// Validate a prefill call for element type `T` and say which path it will take.
    pub fn check<T: Dtype>(&self, p: &AttentionParams, lens: &FwdLens) -> Result<PrefillPath> {
        common(p)?;
        let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
        check_rows("q", lens.q, self.total_q, self.q_row_stride, hq, d)?;
        check_rows("k", lens.k, self.total_k, self.k_row_stride, hkv, d)?;
        check_rows("v", lens.v, self.total_k, self.v_row_stride, hkv, d)?;
        check_rows("out", lens.out, self.total_q, self.o_row_stride, hq, d)?;
        if lens.lse < hq * self.total_q {
            return Err(Error::BufferTooSmall { what: "lse", needed: hq * self.total_q, got: lens.lse });
        }
        for (what, got) in [("cu_seqlens_q", lens.cu_seqlens_q), ("cu_seqlens_k", lens.cu_seqlens_k)] {
            if got < self.batch + 1 {
                return Err(Error::BufferTooSmall { what, needed: self.batch + 1, got });
            }
        }
        if self.batch > 65535 || hq > 65535 {
            return Err(Error::Shape {
                what: "grid",
                expected: "batch and num_q_heads <= 65535".into(),
                got: format!("{} x {}", self.batch, hq),
            });
        }
        if self.max_seqlen_q > self.total_q {
            return Err(Error::Shape { what: "max_seqlen_q", expected: format!("<= total_q {}", self.total_q), got: self.max_seqlen_q.to_string() });
        }
        for (what, v) in [("total_q", self.total_q), ("total_k", self.total_k), ("max_seqlen_q", self.max_seqlen_q)] {
            to_i32(what, v)?;
        }
        if is_16bit::<T>() {
            // cp.async moves 16-byte chunks: K and V rows must start on 16-byte boundaries;
            // O is stored two elements at a time.
            let chunk = 16 / std::mem::size_of::<T>();
            for (what, stride) in [("k", self.k_row_stride), ("v", self.v_row_stride)] {
                if stride % chunk != 0 {
                    return Err(Error::Stride { what, stride, min: chunk });
                }
            }
            if !self.o_row_stride.is_multiple_of(2) {
                return Err(Error::Stride { what: "out", stride: self.o_row_stride, min: 2 });
            }
        }
        let needed_ws = attention_fwd_workspace_len(p, self.total_k);
        match (lens.workspace, p.rope.is_some()) {
            (_, false) => Ok(PrefillPath::Plain),
            (Some(ws), true) if ws >= needed_ws => Ok(PrefillPath::PreRotated),
            (Some(ws), true) => Err(Error::BufferTooSmall { what: "workspace", needed: needed_ws, got: ws }),
            (None, true) if pre_rotation_required::<T>(p) => {
                Err(Error::BufferTooSmall { what: "workspace (ReRoPE and f32 pre-rotate K)", needed: needed_ws, got: 0 })
            }
            (None, true) => Ok(PrefillPath::Fused),
        }
    }
}

/// Bytes of the composed-rotation tables a kernel keeps for tiles of `keys` rows at head_dim `d`:
/// the offsets 0..8, a base every 8 keys and the steps 8s they are made with, f32 pairs per
/// rotation pair (`ROT_SUB` in kernels/tile.cuh).
pub(crate) fn rotation_table_bytes(keys: usize, d: usize) -> usize {
    (8 + 2 * (keys / 8)) * (d / 2) * 8
}

/// The launch of the 16-bit (tensor-core) prefill kernel for `params`, contiguous or paged: one
/// block per query tile, head and sequence; shared memory for the Q, K and V tiles (pitch d + 8),
/// the far copies with ReRoPE, and on the fused path at head_dim <= 128 the composed-rotation
/// tables after them.
///
/// Two kernels per head dim (kernels/attention_fwd.cu): the *wide* one (128 query rows, 64 at
/// head_dim 256) for keys ready in memory, contiguous, without ReRoPE, when the queries fill more
/// than one narrow tile; otherwise the narrow one, which takes every option. Head dim 512 has
/// only the narrow one (32 query rows, 32 keys, its 4 warps 2 x 2 over rows and halves of the
/// head: 97.5 KB of tiles), and no ReRoPE ([`common`] refuses it).
pub(crate) fn mma_fwd_launch<T: Dtype>(params: AttnParams, p: &AttentionParams, fused: bool) -> Launch<AttnParams> {
    let d = p.head_dim;
    let rel = p.rope.is_some() && p.relative != Relative::None;
    let wide = d <= 256
        && !fused
        && !rel
        && params.block_table == 0
        && params.splits <= 1
        && params.max_seqlen_q as usize > narrow_tile_rows(d);
    // (query rows, keys, threads) per block; the wide head_dim-128 kernel's 48-key tiles on sm_80
    // fit in the 64 sized here.
    let (bm, bn, threads) = match (wide, d) {
        (_, 512) => (32, 32, 128),
        (true, 256) => (64, 64, 128),
        (true, _) => (128, 64, 128),
        (false, 256) => (32, 32, 64),
        (false, _) => (64, 64, 128),
    };
    let tiles = (bm + 2 * bn + if rel { bm + bn } else { 0 }) * (d + 8) * std::mem::size_of::<T>();
    let smem = tiles + if fused && d <= 128 { rotation_table_bytes(bn, d) } else { 0 };
    // Split keys (narrow kernels, paged prefill): `splits` blocks per query tile.
    let q_tiles = (params.max_seqlen_q as usize).div_ceil(bm) * params.splits.max(1) as usize;
    let grid = (q_tiles as u32, params.q_heads as u32, params.batch as u32);
    let name = format!("attention_fwd_{}d{d}_{}", if wide { "wide_" } else { "" }, T::NAME);
    Launch { module: Module::AttentionFwd, name, grid, threads, smem, params }
}

/// The parameter fields every prefill launch (contiguous or paged) fills the same way: the
/// position encoding, masks and scale, the batch geometry and heads; addresses, strides and the
/// paging fields zero, for the launcher to set.
pub(crate) fn attn_params_base(c: Common, p: &AttentionParams, batch: usize, max_seqlen_q: usize, total_q: usize) -> AttnParams {
    AttnParams {
        rope: c.rope,
        q: 0,
        k: 0,
        v: 0,
        k_far: 0,
        out: 0,
        lse: 0,
        cu_seqlens_q: 0,
        cu_seqlens_k: 0,
        seq_starts: 0,
        q_row_stride: 0,
        k_row_stride: 0,
        v_row_stride: 0,
        o_row_stride: 0,
        kf_row_stride: 0,
        batch: batch as i32,
        max_seqlen_q: max_seqlen_q as i32,
        total_q: total_q as i32,
        total_k: 0,
        q_heads: p.num_q_heads as i32,
        kv_heads: p.num_kv_heads as i32,
        head_dim: p.head_dim as i32,
        causal: c.causal,
        window: c.window,
        sinks: c.sinks,
        chunk: c.chunk,
        alibi_total_heads: c.alibi_total_heads,
        alibi_head_offset: c.alibi_head_offset,
        rotate_k: 0,
        scale_log2: (p.softmax_scale() * std::f64::consts::LOG2_E) as f32,
        scale: c.scale,
        block_table: 0,
        context_lens: 0,
        page_size: 0,
        max_pages: 0,
        num_pages: 0,
        splits: 1,
        keys_per_split: 0,
        gather_rows: 0,
        part_out: 0,
        part_lse: 0,
        sink: c.sink,
        cap_in: c.cap_in,
        cap_out: c.cap_out_log2(),
        gate: GateArgs::default(),
    }
}

pub(crate) fn is_16bit<T: Dtype>() -> bool {
    std::mem::size_of::<T>() == 2
}

/// Prefill attention: O `[total_q, Hq, d]` (rows `o_row_stride` apart) and natural-log LSE
/// `[Hq, total_q]` (f32) from unrotated Q, K and V. `workspace` (length from
/// [`attention_fwd_workspace_len`]) selects the pre-rotate path; without it the fused path runs,
/// which f16/bf16 plain RoPE supports (ReRoPE and f32 need the workspace: a typed error says so).
///
/// From a server (the README's snippet, compiled):
/// ```no_run
/// use half::bf16;
/// use rope_attn::cuda::{attention_fwd, attention_fwd_workspace_len, prefill_prefers_workspace, AttentionBatch, Gpu};
/// use rope_attn::{AttentionParams, Layout, RopeConfig, Rotary};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let gpu = Gpu::new(0)?; // or Gpu::from_context(your_ctx): kernels load once per context
/// let stream = gpu.context().default_stream();
/// let rope = RopeConfig::from_hf_config_json(&std::fs::read_to_string("config.json")?)?;
/// let (seqs, hq, hkv, d) = ([5usize, 3], 32, 8, 128);
/// let mut p = AttentionParams::new(hq, hkv, d); // causal, 1/sqrt(d)
/// p.rope = Some(Rotary::from_schedule(&rope.schedule(Some(8))?, Layout::Half));
/// let total: usize = seqs.iter().sum();
/// let batch = AttentionBatch::contiguous(&p, seqs.len(), 5, total, total);
/// let cu = stream.clone_htod(&[0i32, 5, 8])?;
/// let q = stream.alloc_zeros::<bf16>(total * hq * d)?; // your projections, unrotated
/// let (k, v) = (stream.alloc_zeros::<bf16>(total * hkv * d)?, stream.alloc_zeros::<bf16>(total * hkv * d)?);
/// let mut out = stream.alloc_zeros::<bf16>(total * hq * d)?;
/// let mut lse = stream.alloc_zeros::<f32>(hq * total)?;
/// let mut ws = stream.alloc_zeros::<bf16>(attention_fwd_workspace_len(&p, total))?;
/// let mut ws = ws.as_view_mut();
/// let ws = prefill_prefers_workspace::<bf16>(&p, &batch).then_some(&mut ws);
/// attention_fwd(&gpu, &stream, &q, &k, &v, &mut out, &mut lse, &cu, &cu, &batch, &p, ws)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PrefillPath> {
    fwd(gpu, stream, q, k, v, None::<Gate<'_, CudaSlice<T>>>, out, lse, cu_seqlens_q, cu_seqlens_k, None::<&CudaSlice<i32>>, batch, p, workspace)
}

/// [`attention_fwd`] with the output gate fused (Qwen3-Next, Qwen3.5, LFM3): O is written as
/// `O · sigmoid(gate)`, the gates read from `gate` as `layout` says ([`OutputGate`]; for
/// Qwen3-Next, [`OutputGate::after_query`] over `q_proj`'s output from element `head_dim` on).
/// The LSE is the attention's, ungated. `gate` must not overlap `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_gated<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PrefillPath> {
    fwd(gpu, stream, q, k, v, Some((gate, layout)), out, lse, cu_seqlens_q, cu_seqlens_k, None::<&CudaSlice<i32>>, batch, p, workspace)
}

/// A gate buffer and where its gates lie.
type Gate<'a, G> = (&'a G, &'a OutputGate);

/// [`attention_fwd`] with explicit starting positions: `seq_starts` is `[batch, 2]` i32, the
/// positions of each sequence's first query and first key. This is what a chunk of a longer
/// sequence or a ring-attention key block needs: RoPE angles, causal / window masks, ALiBi and
/// ReRoPE distances all follow these positions. (Without it: queries end where keys end.)
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_at<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    seq_starts: &impl DevicePtr<i32>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PrefillPath> {
    if seq_starts.len() < 2 * batch.batch {
        return Err(Error::BufferTooSmall { what: "seq_starts", needed: 2 * batch.batch, got: seq_starts.len() });
    }
    fwd(gpu, stream, q, k, v, None::<Gate<'_, CudaSlice<T>>>, out, lse, cu_seqlens_q, cu_seqlens_k, Some(seq_starts), batch, p, workspace)
}

#[allow(clippy::too_many_arguments)]
fn fwd<T: Dtype, G: DevicePtr<T>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    gate: Option<Gate<'_, G>>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    seq_starts: Option<&impl DevicePtr<i32>>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PrefillPath> {
    let be = OnStream::new(gpu, stream)?;
    let lens = FwdLens {
        q: q.len(),
        k: k.len(),
        v: v.len(),
        out: out.len(),
        lse: lse.len(),
        cu_seqlens_q: cu_seqlens_q.len(),
        cu_seqlens_k: cu_seqlens_k.len(),
        workspace: workspace.as_ref().map(|w| w.len()),
    };
    let path = batch.check::<T>(p, &lens)?;
    let out_len = out.len();
    let (q, _g1) = q.device_ptr(stream);
    let (k, _g2) = k.device_ptr(stream);
    let (v, _g3) = v.device_ptr(stream);
    let (out, _g4) = out.device_ptr_mut(stream);
    let (lse, _g5) = lse.device_ptr_mut(stream);
    let (cu_q, _g6) = cu_seqlens_q.device_ptr(stream);
    let (cu_k, _g7) = cu_seqlens_k.device_ptr(stream);
    let (seq_starts, _g8) = match seq_starts {
        Some(s) => {
            let (sp, g) = s.device_ptr(stream);
            (sp, Some(g))
        }
        None => (0, None),
    };
    let (workspace, _g9) = match workspace {
        Some(w) => {
            let (wp, g) = w.device_ptr_mut(stream);
            (wp, Some(g))
        }
        None => (0, None),
    };
    let (gate, _g10) = GateArgs::on_stream::<T, _>(gate, (batch.total_q, p.num_q_heads, p.head_dim), stream, out, out_len)?;
    let ptrs = FwdPtrs { q, k, v, out, lse, cu_q, cu_k, seq_starts, workspace, gate };
    launch_fwd::<T, _>(&be, ptrs, path, batch, p)?;
    Ok(path)
}

/// Addresses of a prefill call's buffers (0 = absent: no seq_starts, no workspace).
pub(crate) struct FwdPtrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub seq_starts: u64,
    pub workspace: u64,
    pub gate: GateArgs,
}

/// Plan and run a prefill whose buffers [`AttentionBatch::check`] accepted (it returned `path`):
/// the key pre-rotation launches when the path says so, then the attention kernel.
pub(crate) fn launch_fwd<T: Dtype, B: Backend>(be: &B, ptrs: FwdPtrs, path: PrefillPath, batch: &AttentionBatch, p: &AttentionParams) -> Result<()> {
    let c = common(p)?;
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    if batch.batch == 0 || batch.total_q == 0 || batch.max_seqlen_q == 0 {
        return Ok(());
    }
    let elem = std::mem::size_of::<T>();
    let FwdPtrs { q: qp, k: kp, v: vp, out: op, lse: lp, cu_q: cq, cu_k: ck, seq_starts: starts, workspace: wp, gate } = ptrs;
    if is_16bit::<T>() && (kp % 16 != 0 || vp % 16 != 0 || op % 4 != 0) {
        return Err(Error::Shape { what: "k/v/out pointers", expected: "16-byte aligned k and v, 4-byte aligned out".into(), got: format!("{kp:#x} {vp:#x} {op:#x}") });
    }

    let mut k_near = kp;
    let mut k_near_stride = batch.k_row_stride;
    let mut k_far = kp;
    let mut kf_stride = batch.k_row_stride;
    if path == PrefillPath::PreRotated {
        let keys = batch.total_k * hkv * d;
        if wp % 16 != 0 {
            return Err(Error::Shape { what: "workspace pointer", expected: "16-byte aligned".into(), got: format!("{wp:#x}") });
        }
        let kshape = RopeShape { tokens: batch.total_k, q_heads: 0, k_heads: hkv, head_dim: d, q_row_stride: 0, k_row_stride: batch.k_row_stride };
        // Key t of sequence b sits at t - cu_seqlens_k[b] + seq_starts[2b + 1].
        let positions = || Positions::FromCuSeqlens { cu_seqlens: ck, batch: batch.batch, starts: if starts == 0 { 0 } else { starts + 4 }, stride: 2 };
        let ptrs = |out: u64| RopePtrs { q_in: 0, q_out: 0, k_in: kp, k_out: out, q_out_stride: 0, k_out_stride: hkv * d };
        launch_rope::<T, B>(be, ptrs(wp), &kshape, c.rope, positions(), false)?;
        k_near = wp;
        k_near_stride = hkv * d;
        if let Relative::Leaky { .. } = p.relative {
            let far = wp + (keys * elem) as u64;
            launch_rope::<T, B>(be, ptrs(far), &kshape, c.rope, positions(), true)?;
            k_far = far;
            kf_stride = hkv * d;
        }
    }

    let params = AttnParams {
        q: qp,
        k: k_near,
        v: vp,
        k_far,
        out: op,
        lse: lp,
        cu_seqlens_q: cq,
        cu_seqlens_k: ck,
        seq_starts: starts,
        q_row_stride: batch.q_row_stride as i64,
        k_row_stride: k_near_stride as i64,
        v_row_stride: batch.v_row_stride as i64,
        o_row_stride: batch.o_row_stride as i64,
        kf_row_stride: kf_stride as i64,
        total_k: batch.total_k as i32,
        rotate_k: (path == PrefillPath::Fused) as i32,
        gate,
        ..attn_params_base(c, p, batch.batch, batch.max_seqlen_q, batch.total_q)
    };
    // The kernel clamps sequence offsets to total_q / total_k, which the buffers were checked to span.
    let launch = if is_16bit::<T>() {
        mma_fwd_launch::<T>(params, p, path == PrefillPath::Fused)
    } else {
        let grid = (batch.max_seqlen_q.div_ceil(4) as u32, hq as u32, batch.batch as u32);
        Launch { module: Module::AttentionFwd, name: "attention_fwd_rows_f32".into(), grid, threads: 128, smem: 0, params }
    };
    be.run(&launch)
}

/// [`attention_fwd`], then compare O and LSE with [`reference::attention`] per sequence on the
/// same (copied back) inputs. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<(PrefillPath, CheckReport)> {
    let path = attention_fwd(gpu, stream, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch, p, workspace)?;
    let host = FwdHost {
        q: widen(&stream.clone_dtoh(q)?),
        k: widen(&stream.clone_dtoh(k)?),
        v: widen(&stream.clone_dtoh(v)?),
        out: widen(&stream.clone_dtoh(out)?),
        lse: stream.clone_dtoh(lse)?.iter().map(|&x| x as f64).collect(),
        cu_q: stream.clone_dtoh(cu_seqlens_q)?,
        cu_k: stream.clone_dtoh(cu_seqlens_k)?,
        gate: None,
    };
    Ok((path, compare_fwd::<T>(&host, batch, p)?))
}

/// [`attention_fwd_gated`], then compare O (gated) and LSE with the reference as
/// [`attention_fwd_checked`] does. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_gated_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cu_seqlens_q: &impl DevicePtr<i32>,
    cu_seqlens_k: &impl DevicePtr<i32>,
    batch: &AttentionBatch,
    p: &AttentionParams,
    workspace: Option<&mut CudaViewMut<'_, T>>,
) -> Result<(PrefillPath, CheckReport)> {
    let path = attention_fwd_gated(gpu, stream, q, k, v, gate, layout, out, lse, cu_seqlens_q, cu_seqlens_k, batch, p, workspace)?;
    let host = FwdHost {
        q: widen(&stream.clone_dtoh(q)?),
        k: widen(&stream.clone_dtoh(k)?),
        v: widen(&stream.clone_dtoh(v)?),
        out: widen(&stream.clone_dtoh(out)?),
        lse: stream.clone_dtoh(lse)?.iter().map(|&x| x as f64).collect(),
        cu_q: stream.clone_dtoh(cu_seqlens_q)?,
        cu_k: stream.clone_dtoh(cu_seqlens_k)?,
        gate: Some((widen(&stream.clone_dtoh(gate)?), *layout)),
    };
    Ok((path, compare_fwd::<T>(&host, batch, p)?))
}

/// Host copies of a prefill's inputs and results, widened, for checked mode.
pub(crate) struct FwdHost {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub cu_q: Vec<i32>,
    pub cu_k: Vec<i32>,
    /// The output gate's values and layout, if the call was gated.
    pub gate: Option<(Vec<f64>, OutputGate)>,
}

/// Checked mode's comparison of a prefill with [`reference::attention_varlen`] (shared with the emulator).
pub(crate) fn compare_fwd<T: Dtype>(h: &FwdHost, batch: &AttentionBatch, p: &AttentionParams) -> Result<CheckReport> {
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    let qh = gather_rows(&h.q, batch.total_q, batch.q_row_stride, hq * d);
    let kh = gather_rows(&h.k, batch.total_k, batch.k_row_stride, hkv * d);
    let vh = gather_rows(&h.v, batch.total_k, batch.v_row_stride, hkv * d);
    let oh = gather_rows(&h.out, batch.total_q, batch.o_row_stride, hq * d);
    let offsets = |cu: &[i32]| -> Vec<usize> { cu.iter().take(batch.batch + 1).map(|&x| x.max(0) as usize).collect() };
    let cu_k = offsets(&h.cu_k);
    let mut want = reference::attention_varlen(&qh, &kh, &vh, &offsets(&h.cu_q), &cu_k, p)?;
    if let Some((g, layout)) = &h.gate {
        reference::output_gate(&mut want.out, g, layout, hq, d)?;
    }
    // Queries sit at positions up to their sequence's last key (bottom-right aligned).
    let last = cu_k.windows(2).map(|w| w[1] as i64 - w[0] as i64 - 1).max().unwrap_or(0);
    let (tol_o, tol_l) = Tolerance::attention::<T>(p, max_abs(&qh) * p.query_scale_bound(last), max_abs(&kh), max_abs(&vh));
    let ro = CheckReport::compare("attention out", &oh, &want.out, tol_o);
    let rl = CheckReport::compare("attention lse", &h.lse[..want.lse.len()], &want.lse, tol_l);
    ro.worst(rl).ensure()
}
