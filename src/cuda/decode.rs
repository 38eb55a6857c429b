//! Launchers for kernels/attention_decode.cu (paged decode, split-K) and the paged-cache append.

use super::checked::{last_context_position, max_abs, widen, CheckReport, Tolerance};
use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{to_i32, DecodeParams, GateArgs, SinkArgs, SplitsParams};
use super::scores::{check_rows, common, gather_rows};
use crate::attention::{AttentionParams, Layout, Relative};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use crate::reference;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop};
use std::sync::Arc;

/// Geometry of a paged KV cache: K and V each `[num_pages, page_size, Hkv, d]`, unrotated keys.
/// The buffers and the block table are the caller's; this only describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvCache {
    /// Pages in the pool.
    pub num_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Components per head.
    pub head_dim: usize,
}

impl PagedKvCache {
    /// Elements of one of the K / V buffers.
    pub fn len(&self) -> usize {
        self.num_pages * self.page_size * self.kv_heads * self.head_dim
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn validate(&self, p: &AttentionParams) -> Result<()> {
        if self.kv_heads != p.num_kv_heads || self.head_dim != p.head_dim {
            return Err(Error::Shape {
                what: "paged cache",
                expected: format!("Hkv {} x d {}", p.num_kv_heads, p.head_dim),
                got: format!("Hkv {} x d {}", self.kv_heads, self.head_dim),
            });
        }
        if self.page_size == 0 || self.num_pages == 0 {
            return Err(Error::Shape { what: "paged cache", expected: "num_pages, page_size > 0".into(), got: format!("{self:?}") });
        }
        to_i32("num_pages * page_size", self.num_pages * self.page_size)?;
        Ok(())
    }
}

/// A decode step's batch: `queries` new tokens per sequence (already appended to the cache, so
/// query qi of sequence b sits at position `context_lens[b] - queries + qi`), Q rows
/// `[batch * queries, Hq, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeBatch {
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence (1..=16).
    pub queries: usize,
    /// Columns of the block table (`[batch, max_pages]`, i32 page indices).
    pub max_pages: usize,
    /// An upper bound on every `context_lens[b]`, known on the host (sizes the key splits).
    pub max_context: usize,
    /// Elements between query rows (>= Hq·d).
    pub q_row_stride: usize,
    /// Elements between output rows (>= Hq·d).
    pub o_row_stride: usize,
}

impl DecodeBatch {
    /// Dense Q and O.
    pub fn contiguous(p: &AttentionParams, batch: usize, queries: usize, max_pages: usize, max_context: usize) -> Self {
        let row = p.num_q_heads * p.head_dim;
        DecodeBatch { batch, queries, max_pages, max_context, q_row_stride: row, o_row_stride: row }
    }

    pub(crate) fn tokens(&self) -> usize {
        self.batch * self.queries
    }
}

/// Whether a decode runs on the CUDA-core kernel (kernels/attention_decode.cu): f32, every dtype
/// at head_dim 512, where a tensor-core warp's O over its 16 rows would take 256 registers, and
/// chunked attention (`chunked`) at head_dim 256, which the tensor-core kernel's 256 build
/// leaves out (at 255 registers the chunk test would spill: attention_decode_mma.cu, CHUNKS).
pub(crate) fn on_cores(elem: usize, d: usize, chunked: bool) -> bool {
    elem == 4 || d > 256 || (chunked && d > 128)
}

/// Keys per warp tile of the CUDA-core decode kernel (`decode_tile_keys` in
/// attention_decode.cu): a warp's K and V tiles, double-buffered, take 8 KB (16 KB at head_dim
/// 512, which takes 256's tile).
fn tile_keys_cores(d: usize, elem: usize) -> usize {
    let d2 = if d <= 64 { 64 } else if d <= 128 { 128 } else { 256 };
    2048 / (d2 * elem)
}

/// Split boundaries fall on multiples of this: of every tile size (`SPLIT_ALIGN_KEYS` in
/// kernels/decode.cuh).
const SPLIT_ALIGN: usize = 32;

/// Warps per decode block (each streams its own key tiles), in both kernels.
const DEC_WARPS: usize = 4;

/// (query head, query) rows per decode block: 16 on the tensor-core kernel (the mma's M),
/// 4 on the CUDA-core one ([`on_cores`]).
fn rows_per_block(cores: bool) -> usize {
    if cores {
        4
    } else {
        16
    }
}

/// Keys per warp tile of the tensor-core decode kernel (`DMMA_TILE`).
const MMA_TILE: usize = 16;

/// Shared memory a decode block may take on every supported card: 99 KB, the opt-in limit of
/// sm_86 / sm_89 (A100: 163 KB, H100: 227 KB).
const SMEM_BUDGET: usize = 99 * 1024;

/// Shared memory of the CUDA-core decode kernel (layout in kernels/attention_decode.cu): per
/// warp its K and V tiles double-buffered (elements of `elem` bytes), Q rotated [rows][d/2]
/// pairs in f32 and its far copy with ReRoPE (`rel`), the (cos, sin) table of a tile's key
/// offsets [tile][d/2] (twice with Leaky ReRoPE, `leaky`), per warp the tile's bases [d/2]
/// (twice with Leaky) and its tile's scores and cache slots: at most 56.3 KB up to head_dim 256,
/// 88.3 KB at 512 (no ReRoPE there).
fn decode_cores_smem_bytes(d: usize, elem: usize, rel: bool, leaky: bool) -> usize {
    let (bt, rows, pairs) = (tile_keys_cores(d, elem), rows_per_block(true), d / 2 * 8);
    let tables = if leaky { 2 } else { 1 };
    DEC_WARPS * 4 * bt * d * elem
        + rows * pairs * if rel { 2 } else { 1 }
        + bt * pairs * tables
        + DEC_WARPS * pairs * tables
        + DEC_WARPS * bt * (rows + 1) * 4
}

/// Warps per block and shared memory of the tensor-core decode kernel (layout in
/// kernels/attention_decode_mma.cu): per warp K and V tiles [2][16][d + 8], Q [16][d + 8] (twice
/// with ReRoPE), the offsets [9][d/2] (twice with Leaky), per warp the bases [2][d/2] (twice
/// with Leaky) and 16 slots, per warp a rotated tile when the keys rotate in shared memory
/// (`smem_rot`: partial rotary in the rotate_half layout, interleaved at head_dim 256) at head
/// dim 256 or with Leaky ReRoPE (the near keys rotate in place up to 128), and with
/// ReRoPE per warp 1 KB of far scores, and with `steps` > 1 the base steps [2][steps][d/2]. Four
/// warps unless that passes [`SMEM_BUDGET`], then two, then one: head_dim 128 takes 81 KB (two
/// blocks per SM on an A100 or H100), 256 two warps.
fn decode_mma_layout(d: usize, elem: usize, rel: bool, leaky: bool, smem_rot: bool, steps: usize) -> (usize, usize) {
    let tile = MMA_TILE * (d + 8) * elem;
    let (pairs, tables) = (d / 2 * 8, if leaky { 2 } else { 1 });
    let bytes = |w: usize| {
        w * 4 * tile
            + rows_per_block(false) * (d + 8) * elem * if rel { 2 } else { 1 }
            + 9 * pairs * tables
            + w * 2 * pairs * tables
            + w * MMA_TILE * 4
            + if smem_rot { w * tile } else { 0 }
            + if rel { w * 32 * 8 * 4 } else { 0 }
            + if steps > 1 { steps * 2 * pairs } else { 0 }
    };
    let warps = [DEC_WARPS, 2, 1].into_iter().find(|&w| bytes(w) <= SMEM_BUDGET).unwrap_or(1);
    (warps, bytes(warps))
}

/// Shared memory the driver keeps per resident block (sm_80 and later).
const SMEM_RESERVED_PER_BLOCK: usize = 1024;

/// The most blocks of the tensor-core decode kernel an SM holds by registers: every build takes
/// more than 128 registers a thread (tests/ptxas_spills.rs), so 64K registers hold at most three
/// blocks of 128 threads; shared memory for more is not worth keeping.
const MMA_MAX_RESIDENT: usize = 3;

/// Tiles per exact base in the tensor-core kernel's key rotations (`base_steps` in
/// kernels/attention_decode_mma.cu), for a GPU with `smem_per_sm` bytes of shared memory per SM.
/// A warp evaluates two exact bases for each pair it serves per 16-key tile (a reduction and a
/// sincospif, a 75-instruction loop that a lane runs twice a tile at head_dim 128: about a
/// seventh of the tile). With S steps it evaluates one anchor per S tiles and multiplies it by a
/// per-block table of the exact steps, which every thread helps to fill once (2·S·d/2
/// evaluations). By the SASS counts (sm_90, head_dim 128, four warps) a thread issues about
/// 160 instructions per tile for the direct bases, 30 + 154/S with steps, and 77·S for its share
/// of the table: over T tiles per warp S = 4 pays from 4 tiles, 8 as much as 4 at 16 and more
/// beyond. It is 1 (the direct bases) for f32 (another kernel), without RoPE, with Leaky ReRoPE
/// (its second set of bases), above head_dim 128 (the anchors' registers would cost that kernel
/// spills), when the table would cost the SM a resident block (an A100 at head_dim 128 has no
/// byte to spare for two; blocks past what the registers hold do not count), and when the card's
/// shared memory is unknown (0). `splits` as passed to [`attention_decode`]; the bench prints
/// what this returns ([`crate::cuda::Gpu::smem_per_sm`] gives a card's shared memory).
pub fn decode_base_steps<T: Dtype>(p: &AttentionParams, batch: &DecodeBatch, splits: usize, smem_per_sm: usize) -> usize {
    let (_, keys_per_split) = split_plan(split_span(p, batch), splits.max(1), SPLIT_ALIGN);
    base_steps(p, keys_per_split, std::mem::size_of::<T>(), smem_per_sm)
}

fn base_steps(p: &AttentionParams, keys_per_split: usize, elem: usize, smem_per_sm: usize) -> usize {
    let d = p.head_dim;
    let leaky = matches!(p.relative, Relative::Leaky { .. });
    if p.rope.is_none() || elem == 4 || leaky || d > 128 || smem_per_sm == 0 {
        return 1;
    }
    let rel = p.relative != Relative::None;
    let smem_rot = mma_smem_rot(p);
    let (warps, bytes) = decode_mma_layout(d, elem, rel, leaky, smem_rot, 1);
    let resident = |bytes: usize| (smem_per_sm / (bytes + SMEM_RESERVED_PER_BLOCK)).min(MMA_MAX_RESIDENT);
    // The warp's tiles in a split (under a window its splits share out the keys it shows).
    let tiles = keys_per_split.div_ceil(MMA_TILE * warps);
    let mut steps = if tiles >= 16 { 8 } else if tiles >= 4 { 4 } else { 1 };
    while steps > 1 {
        let (w, b) = decode_mma_layout(d, elem, rel, leaky, smem_rot, steps);
        if w == warps && b <= SMEM_BUDGET && resident(b) >= resident(bytes).max(1) {
            break;
        }
        steps /= 2;
    }
    steps
}

/// Whether the 16-bit kernel rotates keys into a tile of their own (its KR_SMEM where the
/// registers cannot, partial rotary in the rotate_half layout or interleaved at head_dim 256:
/// in place up to head_dim 128, but at 256, and for Leaky ReRoPE's far keys, into that tile).
fn mma_smem_rot(p: &AttentionParams) -> bool {
    let (d, leaky) = (p.head_dim, matches!(p.relative, Relative::Leaky { .. }));
    (leaky || d > 128)
        && p.rope.as_ref().is_some_and(|r| match r.layout {
            Layout::Half => r.rotary_dim < d,
            Layout::Interleaved => d > 128,
        })
}

/// Blocks of one key split of the 16-bit kernel, the one servers run (on tensor cores but at
/// head_dim 512).
fn blocks_per_split(p: &AttentionParams, b: &DecodeBatch) -> usize {
    let rows = p.group_size() * b.queries;
    b.batch * p.num_kv_heads * rows.div_ceil(rows_per_block(on_cores(2, p.head_dim, p.mask.chunk.is_some())))
}

/// The keys the splits share out: the whole context, or under a sliding window W the last
/// W + queries - 1 (what the earliest query can see; the kernel starts its splits there, sinks
/// aside), under chunks C at most C + queries - 1 (from the earliest query's chunk start).
fn split_span(p: &AttentionParams, b: &DecodeBatch) -> usize {
    let window = p.mask.window.map_or(usize::MAX, |w| w.saturating_add(b.queries.saturating_sub(1)));
    let chunk = p.mask.chunk.map_or(usize::MAX, |c| c.saturating_add(b.queries.saturating_sub(1)));
    b.max_context.min(window).min(chunk)
}

/// How many key splits a decode call should use on a GPU with `sm_count` SMs, each split at
/// least 256 keys (of those a sliding window shows), counting the blocks of the 16-bit kernel
/// (16 rows per block; the f32 kernel's 4-row blocks are then planned as if fewer). The blocks
/// run in rounds of two per SM (what the tensor-core kernel's registers and shared memory allow
/// at head_dim 128); the time is about rounds × keys per split, and the count that minimises it
/// wins, the fewest splits on a tie (less partial output to combine). Measured on an H100 with
/// the CUDA-core kernel (16 sequences, 8k keys): 2 splits 0.75 ms where the previous rule's 3 (a
/// second round half-full) took 1.03 ms; not yet re-measured with the tensor-core kernel.
pub fn decode_splits(p: &AttentionParams, b: &DecodeBatch, sm_count: usize) -> usize {
    let blocks = blocks_per_split(p, b).max(1);
    let span = split_span(p, b).max(1);
    let slots = (2 * sm_count).max(1);
    let max_splits = span.div_ceil(256).max(1);
    (1..=max_splits)
        .min_by_key(|&s| {
            let (actual, kps) = split_plan(span, s, SPLIT_ALIGN);
            (blocks * actual).div_ceil(slots) * kps
        })
        .unwrap_or(1)
}

/// The key splits a call really gets when it asks for `splits` over `span` keys, and the keys
/// per split (a multiple of `align`, the kernel's tile): a short span takes fewer splits than
/// asked. Decode's and the paged prefill's plans.
pub(crate) fn split_plan(span: usize, splits: usize, align: usize) -> (usize, usize) {
    let keys_per_split = span.div_ceil(splits).div_ceil(align).max(1) * align;
    (span.div_ceil(keys_per_split).max(1), keys_per_split)
}

/// f32 workspace elements for `splits` partial results (0 for one split).
pub fn decode_workspace_len(p: &AttentionParams, b: &DecodeBatch, splits: usize) -> usize {
    if splits <= 1 {
        0
    } else {
        splits * b.tokens() * p.num_q_heads * (p.head_dim + 1)
    }
}

/// Buffer lengths (elements) of a decode call, for [`DecodeBatch::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLens {
    /// Q elements.
    pub q: usize,
    /// K cache elements.
    pub k_cache: usize,
    /// V cache elements.
    pub v_cache: usize,
    /// Block-table entries.
    pub block_table: usize,
    /// `context_lens` entries.
    pub context_lens: usize,
    /// Output elements.
    pub out: usize,
    /// LSE elements.
    pub lse: usize,
    /// f32 workspace elements, if one is passed.
    pub workspace: Option<usize>,
}

/// How a decode call will run: key splits and keys per split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Key splits actually used (fewer than asked when the context is short).
    pub splits: usize,
    /// Keys per split (a multiple of the kernel's tile).
    pub keys_per_split: usize,
}

impl DecodeBatch {
    /// Validate a decode call (no device needed) and plan its splits.
    pub fn check(&self, p: &AttentionParams, cache: &PagedKvCache, lens: &DecodeLens, splits: usize) -> Result<DecodePlan> {
        common(p)?;
        cache.validate(p)?;
        let (d, hq) = (p.head_dim, p.num_q_heads);
        if !(1..=16).contains(&self.queries) {
            return Err(Error::Shape { what: "decode queries", expected: "1..=16".into(), got: self.queries.to_string() });
        }
        let tokens = self.tokens();
        check_rows("q", lens.q, tokens, self.q_row_stride, hq, d)?;
        check_rows("out", lens.out, tokens, self.o_row_stride, hq, d)?;
        for (what, got, needed) in [
            ("k_cache", lens.k_cache, cache.len()),
            ("v_cache", lens.v_cache, cache.len()),
            ("block_table", lens.block_table, self.batch * self.max_pages),
            ("context_lens", lens.context_lens, self.batch),
            ("lse", lens.lse, hq * tokens),
        ] {
            if got < needed {
                return Err(Error::BufferTooSmall { what, needed, got });
            }
        }
        if self.max_context > self.max_pages * cache.page_size {
            return Err(Error::Position {
                what: "max_context",
                value: self.max_context as i64,
                limit: (self.max_pages * cache.page_size) as i64,
            });
        }
        to_i32("batch * max_pages", self.batch * self.max_pages)?;
        // A table row's keys: the kernels clamp every context to them, in i32.
        to_i32("max_pages * page_size", self.max_pages * cache.page_size)?;
        to_i32("tokens", tokens)?;
        if splits == 0 {
            return Err(Error::Parameter { name: "splits", value: 0.0, reason: "must be >= 1" });
        }
        // (The CUDA-core kernel's 4-row blocks make the larger grid.)
        let grid_y = p.num_kv_heads * (p.group_size() * self.queries).div_ceil(rows_per_block(true));
        if grid_y > 65535 || self.batch > 65535 {
            return Err(Error::Shape { what: "decode grid", expected: "<= 65535".into(), got: format!("{grid_y} x {}", self.batch) });
        }
        let (splits, keys_per_split) = split_plan(split_span(p, self), splits, SPLIT_ALIGN);
        let needed = decode_workspace_len(p, self, splits);
        match lens.workspace {
            _ if splits == 1 => {}
            Some(ws) if ws >= needed => {}
            ws => return Err(Error::BufferTooSmall { what: "decode workspace", needed, got: ws.unwrap_or(0) }),
        }
        Ok(DecodePlan { splits, keys_per_split })
    }
}

/// Paged decode attention: O `[batch*queries, Hq, d]` and LSE `[Hq, batch*queries]` with keys
/// rotated on the fly at their cached positions. `splits > 1` needs a workspace of
/// [`decode_workspace_len`] f32 elements (the combine kernel then merges the partials).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    decode(gpu, stream, q, k_cache, v_cache, block_table, context_lens, None::<(&CudaSlice<T>, &OutputGate)>, out, lse, cache, batch, p, splits, workspace)
}

/// [`attention_decode`] with the output gate fused, as
/// [`attention_fwd_gated`](super::attention_fwd_gated) takes it: O is written as
/// `O · sigmoid(gate)` (with split keys, by the combine), output row `b · queries + i` reading
/// the gates of row `b · queries + i`. The LSE is the attention's, ungated.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_gated<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    decode(gpu, stream, q, k_cache, v_cache, block_table, context_lens, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace)
}

#[allow(clippy::too_many_arguments)]
fn decode<T: Dtype, G: DevicePtr<T>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    gate: Option<(&G, &OutputGate)>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let be = OnStream::new(gpu, stream)?;
    let lens = DecodeLens {
        q: q.len(),
        k_cache: k_cache.len(),
        v_cache: v_cache.len(),
        block_table: block_table.len(),
        context_lens: context_lens.len(),
        out: out.len(),
        lse: lse.len(),
        workspace: workspace.as_ref().map(|w| w.len()),
    };
    let plan = batch.check(p, cache, &lens, splits)?;
    let out_len = out.len();
    let (q, _g1) = q.device_ptr(stream);
    let (k_cache, _g2) = k_cache.device_ptr(stream);
    let (v_cache, _g3) = v_cache.device_ptr(stream);
    let (block_table, _g4) = block_table.device_ptr(stream);
    let (context_lens, _g5) = context_lens.device_ptr(stream);
    let (out, _g6) = out.device_ptr_mut(stream);
    let (lse, _g7) = lse.device_ptr_mut(stream);
    let (workspace, _g8) = split_workspace(workspace, plan.splits, stream);
    let (gate, _g9) = GateArgs::on_stream::<T, _>(gate, (batch.tokens(), p.num_q_heads, p.head_dim), stream, out, out_len)?;
    let ptrs = DecodePtrs { q, k_cache, v_cache, block_table, context_lens, out, lse, workspace, gate };
    launch_decode::<T, _>(&be, ptrs, plan, cache, batch, p)
}

/// Addresses of a decode call's buffers (workspace 0 when one split).
pub(crate) struct DecodePtrs {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub block_table: u64,
    pub context_lens: u64,
    pub out: u64,
    pub lse: u64,
    pub workspace: u64,
    pub gate: GateArgs,
}

/// Plan and run a decode that [`DecodeBatch::check`] accepted (it returned `plan`): the split-K
/// attention kernel, then the combine kernel when there is more than one split.
pub(crate) fn launch_decode<T: Dtype, B: Backend>(
    be: &B,
    ptrs: DecodePtrs,
    plan: DecodePlan,
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
) -> Result<()> {
    let DecodePlan { splits, keys_per_split } = plan;
    let c = common(p)?;
    let (d, hq) = (p.head_dim, p.num_q_heads);
    let elem = std::mem::size_of::<T>();
    let cores = on_cores(elem, d, p.mask.chunk.is_some());
    let tokens = batch.tokens();
    if tokens == 0 {
        return Ok(());
    }
    let grid_y = p.num_kv_heads * (p.group_size() * batch.queries).div_ceil(rows_per_block(cores));
    let DecodePtrs { q: qp, k_cache: kp, v_cache: vp, block_table: bp, context_lens: cp, out: op, lse: lp, workspace: wp, gate } = ptrs;
    if kp % 16 != 0 || vp % 16 != 0 {
        return Err(Error::Shape { what: "k/v cache pointers", expected: "16-byte aligned".into(), got: format!("{kp:#x} {vp:#x}") });
    }
    let (part_out, part_lse) = partials(wp, splits, tokens, hq, d);
    let rel = p.rope.is_some() && p.relative != Relative::None;
    let leaky = p.rope.is_some() && matches!(p.relative, Relative::Leaky { .. });
    let steps = base_steps(p, keys_per_split, elem, be.smem_per_sm());
    let params = DecodeParams {
        rope: c.rope,
        q: qp,
        k_cache: kp,
        v_cache: vp,
        block_table: bp,
        context_lens: cp,
        out: op,
        lse: lp,
        part_out,
        part_lse,
        q_row_stride: batch.q_row_stride as i64,
        o_row_stride: batch.o_row_stride as i64,
        batch: batch.batch as i32,
        queries: batch.queries as i32,
        q_heads: hq as i32,
        kv_heads: p.num_kv_heads as i32,
        head_dim: d as i32,
        page_size: cache.page_size as i32,
        max_pages: batch.max_pages as i32,
        num_pages: cache.num_pages as i32,
        splits: splits as i32,
        keys_per_split: keys_per_split as i32,
        causal: c.causal,
        window: c.window,
        sinks: c.sinks,
        chunk: c.chunk,
        alibi_total_heads: c.alibi_total_heads,
        alibi_head_offset: c.alibi_head_offset,
        scale_log2: (p.softmax_scale() * std::f64::consts::LOG2_E) as f32,
        base_steps: steps as i32,
        sink: c.sink,
        cap_in: c.cap_in,
        cap_out: c.cap_out_log2(),
        gate,
    };
    // Buffers were checked against the cache geometry and batch; the kernel clamps context
    // lengths and block-table entries into the pool.
    let (warps, smem) = if cores {
        (DEC_WARPS, decode_cores_smem_bytes(d, elem, rel, leaky))
    } else {
        decode_mma_layout(d, elem, rel, leaky, mma_smem_rot(p), steps)
    };
    be.run(&Launch {
        // The same kernel names in two modules: f32 (and head_dim 512) on CUDA cores, the
        // other 16-bit ones on tensor cores; the chunked 16-bit ones at 256 on CUDA cores as
        // attention_decode_cores_d256_*.
        module: if cores { Module::AttentionDecode } else { Module::AttentionDecodeMma },
        name: format!("attention_decode_{}d{d}_{}", if cores && elem == 2 && d <= 256 { "cores_" } else { "" }, T::NAME),
        grid: (splits as u32, grid_y as u32, batch.batch as u32),
        threads: (warps * 32) as u32,
        smem,
        params,
    })?;
    // The partials were sized by decode_workspace_len.
    launch_combine::<T, _>(be, wp, op, lp, batch.o_row_stride, splits, tokens, hq, d, c.sink, gate)
}

/// The device address of a split-K workspace (0 when one split needs none), and the guard that
/// orders its use on `stream`. Decode's and the split paged prefill's.
pub(crate) fn split_workspace<'a>(
    workspace: Option<&'a mut CudaViewMut<'_, f32>>,
    splits: usize,
    stream: &'a Arc<CudaStream>,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match workspace {
        Some(ws) if splits > 1 => {
            let (wp, g) = ws.device_ptr_mut(stream);
            (wp, Some(g))
        }
        _ => (0, None),
    }
}

/// Where split partials live in an f32 workspace at `ws`: O `[splits, tokens, heads, d]`, then
/// LSE `[splits, heads, tokens]`; (0, 0) for one split.
pub(crate) fn partials(ws: u64, splits: usize, tokens: usize, heads: usize, d: usize) -> (u64, u64) {
    if splits > 1 {
        (ws, ws + (splits * tokens * heads * d * 4) as u64)
    } else {
        (0, 0)
    }
}

/// The split-K combine (kernels/merge.cu) when there is more than one split: the partials in
/// the workspace at `ws` (laid out as [`partials`] says) into O (rows `o_row_stride` apart) and
/// LSE `[heads, tokens]`. Decode's and the split paged prefill's last step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_combine<T: Dtype, B: Backend>(
    be: &B,
    ws: u64,
    out: u64,
    lse: u64,
    o_row_stride: usize,
    splits: usize,
    tokens: usize,
    heads: usize,
    d: usize,
    sink: SinkArgs,
    gate: GateArgs,
) -> Result<()> {
    if splits <= 1 {
        return Ok(());
    }
    let (part_out, part_lse) = partials(ws, splits, tokens, heads, d);
    let params = SplitsParams {
        part_out,
        part_lse,
        out,
        lse,
        o_row_stride: o_row_stride as i64,
        splits: splits as i32,
        tokens: tokens as i32,
        heads: heads as i32,
        head_dim: d as i32,
        sink,
        gate,
    };
    let grid = (tokens as u32, heads as u32, 1);
    be.run(&Launch { module: Module::Merge, name: format!("combine_splits_{}", T::NAME), grid, threads: 128, smem: 0, params })
}

/// [`attention_decode`], then compare with [`reference::attention`] over the keys gathered from
/// the cache through the block table. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<CheckReport> {
    attention_decode(gpu, stream, q, k_cache, v_cache, block_table, context_lens, out, lse, cache, batch, p, splits, workspace)?;
    let host = DecodeHost {
        q: widen(&stream.clone_dtoh(q)?),
        k_cache: widen(&stream.clone_dtoh(k_cache)?),
        v_cache: widen(&stream.clone_dtoh(v_cache)?),
        block_table: stream.clone_dtoh(block_table)?,
        context_lens: stream.clone_dtoh(context_lens)?,
        out: widen(&stream.clone_dtoh(out)?),
        lse: stream.clone_dtoh(lse)?.iter().map(|&x| x as f64).collect(),
        gate: None,
    };
    compare_decode::<T>(&host, cache, batch, p)
}

/// [`attention_decode_gated`], then compare O (gated) and LSE with the reference as
/// [`attention_decode_checked`] does. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_gated_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cache: &PagedKvCache,
    batch: &DecodeBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<CheckReport> {
    attention_decode_gated(gpu, stream, q, k_cache, v_cache, block_table, context_lens, gate, layout, out, lse, cache, batch, p, splits, workspace)?;
    let host = DecodeHost {
        q: widen(&stream.clone_dtoh(q)?),
        k_cache: widen(&stream.clone_dtoh(k_cache)?),
        v_cache: widen(&stream.clone_dtoh(v_cache)?),
        block_table: stream.clone_dtoh(block_table)?,
        context_lens: stream.clone_dtoh(context_lens)?,
        out: widen(&stream.clone_dtoh(out)?),
        lse: stream.clone_dtoh(lse)?.iter().map(|&x| x as f64).collect(),
        gate: Some((widen(&stream.clone_dtoh(gate)?), *layout)),
    };
    compare_decode::<T>(&host, cache, batch, p)
}

/// Host copies of a decode's inputs and results, widened, for checked mode.
pub(crate) struct DecodeHost {
    pub q: Vec<f64>,
    pub k_cache: Vec<f64>,
    pub v_cache: Vec<f64>,
    pub block_table: Vec<i32>,
    pub context_lens: Vec<i32>,
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    /// The output gate's values and layout, if the call was gated.
    pub gate: Option<(Vec<f64>, OutputGate)>,
}

/// Keys and values of sequence b, gathered through its block-table row (entries clamped into the
/// pool, the length to the row's span, as the kernels clamp them): (context, K, V).
fn gather_paged(
    k_cache: &[f64],
    v_cache: &[f64],
    block_table: &[i32],
    context_lens: &[i32],
    b: usize,
    max_pages: usize,
    cache: &PagedKvCache,
) -> (usize, Vec<f64>, Vec<f64>) {
    let ctx = (context_lens[b].max(0) as usize).min(max_pages * cache.page_size);
    let row = cache.kv_heads * cache.head_dim;
    let gather = |buf: &[f64]| -> Vec<f64> {
        (0..ctx)
            .flat_map(|j| {
                let page = block_table[b * max_pages + j / cache.page_size].clamp(0, cache.num_pages as i32 - 1) as usize;
                let slot = page * cache.page_size + j % cache.page_size;
                buf[slot * row..(slot + 1) * row].iter().copied()
            })
            .collect()
    };
    (ctx, gather(k_cache), gather(v_cache))
}

/// The f64 reference of paged attention: sequence b's query rows `runs[b] = (first, count)` of
/// `q` (dense `[tokens, Hq, d]`) are the last of its `context_lens[b]` cached tokens, and attend
/// to all of them, gathered through the block table (clamped as the kernels clamp). Returns O
/// `[tokens, Hq, d]` and the natural-log LSE `[Hq, tokens]`; rows no run covers stay 0 and -inf.
/// Decode's and paged prefill's checked mode, and candle's CPU path, are this.
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_reference(
    q: &[f64],
    k_cache: &[f64],
    v_cache: &[f64],
    block_table: &[i32],
    context_lens: &[i32],
    runs: &[(usize, usize)],
    max_pages: usize,
    cache: &PagedKvCache,
    p: &AttentionParams,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let tokens = q.len() / (hq * d);
    let (mut out, mut lse) = (vec![0.0; tokens * hq * d], vec![f64::NEG_INFINITY; hq * tokens]);
    for (b, &(q0, nq)) in runs.iter().enumerate() {
        let (ctx, kk, vv) = gather_paged(k_cache, v_cache, block_table, context_lens, b, max_pages, cache);
        let q_pos: Vec<i64> = (0..nq as i64).map(|m| ctx as i64 - nq as i64 + m).collect();
        let k_pos: Vec<i64> = (0..ctx as i64).collect();
        let rows = q0 * hq * d..(q0 + nq) * hq * d;
        let r = reference::attention(&q[rows.clone()], &kk, &vv, &q_pos, &k_pos, p)?;
        out[rows].copy_from_slice(&r.out);
        for h in 0..hq {
            for m in 0..nq {
                lse[h * tokens + q0 + m] = r.lse[h * nq + m];
            }
        }
    }
    Ok((out, lse))
}

/// Checked mode's comparison of a decode with [`paged_reference`] (shared with the emulator).
pub(crate) fn compare_decode<T: Dtype>(h: &DecodeHost, cache: &PagedKvCache, batch: &DecodeBatch, p: &AttentionParams) -> Result<CheckReport> {
    let (d, hq) = (p.head_dim, p.num_q_heads);
    let tokens = batch.tokens();
    let qh = gather_rows(&h.q, tokens, batch.q_row_stride, hq * d);
    let oh = gather_rows(&h.out, tokens, batch.o_row_stride, hq * d);
    let runs: Vec<(usize, usize)> = (0..batch.batch).map(|b| (b * batch.queries, batch.queries)).collect();
    let (mut want_o, want_l) = paged_reference(&qh, &h.k_cache, &h.v_cache, &h.block_table, &h.context_lens, &runs, batch.max_pages, cache, p)?;
    if let Some((g, layout)) = &h.gate {
        reference::output_gate(&mut want_o, g, layout, hq, d)?;
    }
    let last = last_context_position(&h.context_lens, batch.batch);
    let (tol_o, tol_l) = Tolerance::attention::<T>(p, max_abs(&qh) * p.query_scale_bound(last), max_abs(&h.k_cache), max_abs(&h.v_cache));
    let ro = CheckReport::compare("decode out", &oh, &want_o, tol_o);
    let rl = CheckReport::compare("decode lse", &h.lse[..hq * tokens], &want_l, tol_l);
    ro.worst(rl).ensure()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor-core decode configuration fits the shared memory of every supported card,
    /// its warps' merge fits in the staging buffers it reuses, and the common one (head_dim
    /// 128, no ReRoPE) keeps two blocks per SM even on an A100 (164 KB per SM, 1 KB reserved
    /// per block), which its registers allow (at most 255: the kernel is built for two blocks of 128 threads).
    #[test]
    fn tensor_core_decode_layouts_fit() {
        for &d in crate::cuda::SUPPORTED_HEAD_DIMS.iter().filter(|&&d| !on_cores(2, d, false)) {
            for (rel, leaky) in [(false, false), (true, false), (true, true)] {
                for smem_rot in [false, true] {
                    let (w, bytes) = decode_mma_layout(d, 2, rel, leaky, smem_rot, 1);
                    assert!(bytes <= SMEM_BUDGET && (1..=DEC_WARPS).contains(&w), "d={d} rel={rel} leaky={leaky}: {w} warps, {bytes} B");
                    let staging = w * 4 * MMA_TILE * (d + 8) * 2;
                    let merge = w * rows_per_block(false) * (d + 2) * 4;
                    assert!(merge <= staging, "d={d}: the merge needs {merge} B of {staging}");
                }
            }
        }
        let (w, bytes) = decode_mma_layout(128, 2, false, false, false, 1);
        assert_eq!(w, DEC_WARPS);
        assert!(2 * (bytes + 1024) <= 164 * 1024, "{bytes} B");
        // The f32 kernel stays as sized before: at most 56.3 KB.
        assert!(decode_cores_smem_bytes(256, 4, true, true) <= 57_700);
        // Head dim 512 (no ReRoPE there) and the 16-bit chunked 256 fit every card, and their
        // warps' merge, f32 O of 4 rows per warp, fits in the staging buffers.
        for (d, elem, rel) in [(512, 2, false), (512, 4, false), (256, 2, true)] {
            let bytes = decode_cores_smem_bytes(d, elem, rel, rel);
            assert!(bytes <= SMEM_BUDGET, "{d} {elem}: {bytes} B");
            assert!(DEC_WARPS * rows_per_block(true) * (d + 2) * 4 <= DEC_WARPS * 4 * tile_keys_cores(d, elem) * d * elem);
        }
    }
}
