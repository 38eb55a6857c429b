//! Launcher for paged prefill (kernels/attention_fwd.cu): a varlen batch of new query tokens
//! against the keys and values of a paged KV cache named by the block table — chunked prefill
//! and prefix reuse. Keys stay unrotated in the cache. Two ways to run (f16 and bf16):
//! * **fused**: the narrow prefill kernel reads K and V through the block table and rotates each
//!   K tile in shared memory (by composition), ReRoPE's far copies included;
//! * **gathered** (a `gather` workspace passed): the rope kernel first gathers every sequence's
//!   keys (rotated, once) and values out of the cache into the workspace, then the prefill
//!   kernel runs on contiguous keys, which lets a long chunk take the wide tile (128 query rows,
//!   half the shared-memory traffic per mma) and rotate no K tile per query block. Not with
//!   ReRoPE (the wide kernel has no far product): that always runs fused.

use super::attention::{attn_params_base, is_16bit, mma_fwd_launch, narrow_tile_rows};
use super::checked::{last_context_position, max_abs, widen, CheckReport, Tolerance};
use super::decode::{launch_combine, paged_reference, partials, split_plan, split_workspace, PagedKvCache};
use super::device::Gpu;
use super::dtype::Dtype;
use super::launch::{Backend, OnStream};
use super::params::{to_i32, AttnParams, GateArgs};
use super::scores::{check_rows, common, gather_rows, Common};
use super::rope::{launch as launch_rope, PagedGather, Positions, RopePtrs, RopeShape};
use crate::attention::{AttentionParams, Relative};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use crate::reference;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// A paged prefill's batch: sequence b's new queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]`
/// of Q, and are the *last* of its `context_lens[b]` cached tokens (append them to the cache
/// first, as for decode): query m sits at position `context_lens[b] - seqlen_q + m`, key j at j.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedPrefillBatch {
    /// Sequences.
    pub batch: usize,
    /// Longest query run (sizes the grid).
    pub max_seqlen_q: usize,
    /// Query rows in all (`cu_seqlens_q[batch]`).
    pub total_q: usize,
    /// Columns of the block table (`[batch, max_pages]`, i32 page indices).
    pub max_pages: usize,
    /// An upper bound on the batch's context lengths added up (each taken at most the table's
    /// rows), known on the host, for the gathered path: it sizes the gather workspace
    /// ([`paged_prefill_gather_len`]), which holds the sequences' keys packed, each after the
    /// one before. Keys past it are cut, as both paths cut a context longer than the table's
    /// rows (the cut sequence's queries then end what is left of it): a bound the lengths break
    /// gives wrong results, never an access out of bounds; checked mode reports them. `None`:
    /// every table slot, `batch · max_pages · page_size` (a server whose block table is as wide
    /// as the model's longest context should give the batch's sum instead: one long sequence
    /// among short ones then costs its own length, not `batch` times it).
    pub total_context: Option<usize>,
    /// Elements between query rows (>= Hq·d).
    pub q_row_stride: usize,
    /// Elements between output rows (>= Hq·d).
    pub o_row_stride: usize,
}

impl PagedPrefillBatch {
    /// Dense Q and O.
    pub fn contiguous(p: &AttentionParams, batch: usize, max_seqlen_q: usize, total_q: usize, max_pages: usize) -> Self {
        let row = p.num_q_heads * p.head_dim;
        PagedPrefillBatch { batch, max_seqlen_q, total_q, max_pages, total_context: None, q_row_stride: row, o_row_stride: row }
    }
}

/// Buffer lengths (elements) of a paged prefill, for [`PagedPrefillBatch::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedFwdLens {
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
    /// `cu_seqlens_q` entries.
    pub cu_seqlens_q: usize,
    /// Output elements.
    pub out: usize,
    /// LSE elements (f32).
    pub lse: usize,
    /// f32 workspace elements (split keys), if one is passed.
    pub workspace: Option<usize>,
    /// Gather workspace elements (of T), if one is passed.
    pub gather: Option<usize>,
}

/// Which way a paged prefill runs (returned so callers and benchmarks can see the choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagedPrefillPath {
    /// K and V read through the block table by the prefill kernel, K tiles rotated in it.
    Fused,
    /// K (rotated) and V gathered into the workspace first, then the prefill on contiguous keys.
    Gathered,
}

/// How a paged prefill will run: key splits and keys per split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedPrefillPlan {
    /// Key splits actually used (fewer than asked when the block table is short).
    pub splits: usize,
    /// Keys per split (a multiple of 64, every narrow tile's width).
    pub keys_per_split: usize,
    /// Fused or gathered.
    pub path: PagedPrefillPath,
}

/// Split boundaries fall on multiples of this.
const SPLIT_ALIGN: usize = 64;

/// The keys splits share out: a sequence's context is at most its block-table row
/// (`max_pages · page_size`, what the kernel clamps it to).
fn split_span(batch: &PagedPrefillBatch, cache: &PagedKvCache) -> usize {
    batch.max_pages * cache.page_size
}

/// How many key splits a paged prefill should use on a GPU with `sm_count` SMs: enough blocks
/// to fill the machine twice over, each split at least 512 keys. Splitting pays when few query
/// tiles meet long contexts (small chunks, speculative verification beyond 16 tokens); for
/// long chunks this is 1.
pub fn paged_prefill_splits(p: &AttentionParams, batch: &PagedPrefillBatch, cache: &PagedKvCache, sm_count: usize) -> usize {
    let blocks = (batch.max_seqlen_q.div_ceil(narrow_tile_rows(p.head_dim)) * p.num_q_heads * batch.batch).max(1);
    (2 * sm_count).div_ceil(blocks).clamp(1, split_span(batch, cache).div_ceil(512).max(1))
}

/// f32 workspace elements of a paged prefill in `splits` key splits (0 for one split): the
/// partial outputs and their LSEs.
pub fn paged_prefill_workspace_len(p: &AttentionParams, batch: &PagedPrefillBatch, splits: usize) -> usize {
    if splits <= 1 {
        0
    } else {
        splits * batch.total_q * p.num_q_heads * (p.head_dim + 1)
    }
}

/// Keys the gather workspace holds, all sequences' packed (kernels/paged.cuh, gathered_span):
/// the batch's `total_context`, at most every table slot.
fn keys_gathered(batch: &PagedPrefillBatch, cache: &PagedKvCache) -> usize {
    let slots = batch.batch * split_span(batch, cache);
    batch.total_context.map_or(slots, |t| t.min(slots))
}

/// Elements (of T) of a gather workspace for this batch: K and V of `total_context` keys (every
/// table slot when it is `None`), `2 · total_context · Hkv · d`.
pub fn paged_prefill_gather_len(p: &AttentionParams, batch: &PagedPrefillBatch, cache: &PagedKvCache) -> usize {
    2 * keys_gathered(batch, cache) * p.num_kv_heads * p.head_dim
}

/// Whether to pass a gather workspace ([`paged_prefill_gather_len`]) to [`attention_fwd_paged`]:
/// without ReRoPE, once a sequence's new queries fill more than one narrow query tile (64
/// rows; 32 at head_dim 256 and 512), the point past which the contiguous prefill pre-rotates too
/// ([`super::prefill_prefers_workspace`]). The gather is one pass over the context's K and V;
/// the fused path re-reads and re-rotates every K tile once per query tile and head. Argued
/// from work counts, unmeasured until BENCHMARKS.md has figures.
pub fn paged_prefill_prefers_gather(p: &AttentionParams, batch: &PagedPrefillBatch) -> bool {
    p.relative == Relative::None && batch.max_seqlen_q > narrow_tile_rows(p.head_dim)
}

impl PagedPrefillBatch {
    /// Validate a paged prefill for element type `T` in (up to) `splits` key splits (no device
    /// needed), and plan the splits.
    pub fn check<T: Dtype>(&self, p: &AttentionParams, cache: &PagedKvCache, lens: &PagedFwdLens, splits: usize) -> Result<PagedPrefillPlan> {
        common(p)?;
        cache.validate(p)?;
        if !is_16bit::<T>() {
            return Err(Error::DtypeMismatch { expected: "f16 or bf16 (paged prefill runs on tensor cores)", got: T::NAME });
        }
        let (d, hq) = (p.head_dim, p.num_q_heads);
        check_rows("q", lens.q, self.total_q, self.q_row_stride, hq, d)?;
        check_rows("out", lens.out, self.total_q, self.o_row_stride, hq, d)?;
        for (what, got, needed) in [
            ("k_cache", lens.k_cache, cache.len()),
            ("v_cache", lens.v_cache, cache.len()),
            ("block_table", lens.block_table, self.batch * self.max_pages),
            ("context_lens", lens.context_lens, self.batch),
            ("cu_seqlens_q", lens.cu_seqlens_q, self.batch + 1),
            ("lse", lens.lse, hq * self.total_q),
        ] {
            if got < needed {
                return Err(Error::BufferTooSmall { what, needed, got });
            }
        }
        if self.max_seqlen_q > self.total_q {
            return Err(Error::Shape { what: "max_seqlen_q", expected: format!("<= total_q {}", self.total_q), got: self.max_seqlen_q.to_string() });
        }
        if self.batch > 65535 || hq > 65535 {
            return Err(Error::Shape { what: "grid", expected: "batch and num_q_heads <= 65535".into(), got: format!("{} x {hq}", self.batch) });
        }
        if !self.o_row_stride.is_multiple_of(2) {
            return Err(Error::Stride { what: "out", stride: self.o_row_stride, min: 2 });
        }
        // (max_pages · page_size: a table row's keys, to which the kernels clamp every context.)
        for (what, v) in [
            ("total_q", self.total_q),
            ("max_seqlen_q", self.max_seqlen_q),
            ("batch * max_pages", self.batch * self.max_pages),
            ("max_pages * page_size", self.max_pages * cache.page_size),
        ] {
            to_i32(what, v)?;
        }
        if splits == 0 {
            return Err(Error::Parameter { name: "splits", value: 0.0, reason: "must be >= 1" });
        }
        // ReRoPE leaves a gather workspace unused (module docs).
        let gather = lens.gather.filter(|_| p.relative == Relative::None);
        if let Some(got) = gather {
            let needed = paged_prefill_gather_len(p, self, cache);
            if got < needed {
                return Err(Error::BufferTooSmall { what: "paged prefill gather workspace", needed, got });
            }
            // Gathered rows are i32 in the kernels.
            to_i32("total_context", keys_gathered(self, cache))?;
        }
        // The keys splits share out: a sequence's context, at most the table's rows and (gathered)
        // the workspace's.
        let span = match gather {
            Some(_) => split_span(self, cache).min(keys_gathered(self, cache)),
            None => split_span(self, cache),
        };
        let (splits, keys_per_split) = split_plan(span, splits, SPLIT_ALIGN);
        let q_tiles = self.max_seqlen_q.div_ceil(narrow_tile_rows(d)).max(1);
        to_i32("keys_per_split", keys_per_split)?;
        if q_tiles * splits > i32::MAX as usize {
            return Err(Error::Shape { what: "grid", expected: "query tiles x splits < 2^31".into(), got: format!("{q_tiles} x {splits}") });
        }
        let needed = paged_prefill_workspace_len(p, self, splits);
        match lens.workspace {
            _ if splits == 1 => {}
            Some(ws) if ws >= needed => {}
            ws => return Err(Error::BufferTooSmall { what: "paged prefill workspace", needed, got: ws.unwrap_or(0) }),
        }
        let path = if gather.is_some() { PagedPrefillPath::Gathered } else { PagedPrefillPath::Fused };
        Ok(PagedPrefillPlan { splits, keys_per_split, path })
    }
}

/// Addresses of a paged prefill's buffers.
pub(crate) struct PagedFwdPtrs {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub block_table: u64,
    pub context_lens: u64,
    pub cu_q: u64,
    pub out: u64,
    pub lse: u64,
    /// f32 workspace (split keys only).
    pub workspace: u64,
    /// Gather workspace (gathered path only).
    pub gather: u64,
    pub gate: GateArgs,
}

/// Run a paged prefill that [`PagedPrefillBatch::check`] accepted (it returned `plan`): the
/// narrow prefill kernel in paged mode, then with split keys the combine.
pub(crate) fn launch_fwd_paged<T: Dtype, B: Backend>(
    be: &B,
    x: PagedFwdPtrs,
    plan: PagedPrefillPlan,
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
) -> Result<()> {
    let c = common(p)?;
    if batch.batch == 0 || batch.total_q == 0 || batch.max_seqlen_q == 0 {
        return Ok(());
    }
    if !x.k_cache.is_multiple_of(16) || !x.v_cache.is_multiple_of(16) || !x.out.is_multiple_of(4) {
        let got = format!("{:#x} {:#x} {:#x}", x.k_cache, x.v_cache, x.out);
        return Err(Error::Shape { what: "k/v cache and out pointers", expected: "16-byte aligned caches, 4-byte aligned out".into(), got });
    }
    let fused = plan.path == PagedPrefillPath::Fused;
    let params = if fused {
        AttnParams {
            q: x.q,
            k: x.k_cache,
            v: x.v_cache,
            k_far: x.k_cache,
            out: x.out,
            lse: x.lse,
            cu_seqlens_q: x.cu_q,
            q_row_stride: batch.q_row_stride as i64,
            o_row_stride: batch.o_row_stride as i64,
            rotate_k: p.rope.is_some() as i32,
            block_table: x.block_table,
            context_lens: x.context_lens,
            page_size: cache.page_size as i32,
            max_pages: batch.max_pages as i32,
            num_pages: cache.num_pages as i32,
            ..attn_params_base(c, p, batch.batch, batch.max_seqlen_q, batch.total_q)
        }
    } else {
        gathered_params::<T, B>(be, &x, c, cache, batch, p)?
    };
    let (part_out, part_lse) = partials(x.workspace, plan.splits, batch.total_q, p.num_q_heads, p.head_dim);
    let params = AttnParams { splits: plan.splits as i32, keys_per_split: plan.keys_per_split as i32, part_out, part_lse, gate: x.gate, ..params };
    // The kernel clamps context lengths and block-table entries into the pool, and query
    // offsets to total_q, which the buffers were checked to span.
    be.run(&mma_fwd_launch::<T>(params, p, fused && p.rope.is_some()))?;
    // The partials were sized by paged_prefill_workspace_len.
    launch_combine::<T, _>(be, x.workspace, x.out, x.lse, batch.o_row_stride, plan.splits, batch.total_q, p.num_q_heads, p.head_dim, params.sink, params.gate)
}

/// The gathered path's first launch: the rope kernel gathers K (rotated to its position) and V
/// of every sequence out of the cache into the workspace. Returns the prefill's parameters over
/// them, contiguous keys with context_lens as their lengths (kernels/attention.cuh,
/// seq_bounds): in one split the wide kernel takes them when the queries fill its tile.
fn gathered_params<T: Dtype, B: Backend>(
    be: &B,
    x: &PagedFwdPtrs,
    c: Common,
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
) -> Result<AttnParams> {
    let (d, hkv) = (p.head_dim, p.num_kv_heads);
    if !x.gather.is_multiple_of(16) {
        return Err(Error::Shape { what: "gather workspace pointer", expected: "16-byte aligned".into(), got: format!("{:#x}", x.gather) });
    }
    // (total_context 0: no keys gathered, and the prefill writes O = 0, LSE = -inf.)
    let rows = keys_gathered(batch, cache);
    let v_ws = x.gather + (rows * hkv * d * std::mem::size_of::<T>()) as u64;
    let shape = RopeShape { tokens: rows, q_heads: 0, k_heads: hkv, head_dim: d, q_row_stride: 0, k_row_stride: hkv * d };
    let ptrs = RopePtrs { q_in: 0, q_out: 0, k_in: x.k_cache, k_out: x.gather, q_out_stride: 0, k_out_stride: hkv * d };
    let g = PagedGather {
        block_table: x.block_table,
        context_lens: x.context_lens,
        v_in: x.v_cache,
        v_out: v_ws,
        batch: batch.batch,
        page_size: cache.page_size,
        max_pages: batch.max_pages,
        num_pages: cache.num_pages,
        rows,
    };
    launch_rope::<T, B>(be, ptrs, &shape, c.rope, Positions::Paged(g), false)?;
    Ok(AttnParams {
        q: x.q,
        k: x.gather,
        v: v_ws,
        k_far: x.gather,
        out: x.out,
        lse: x.lse,
        cu_seqlens_q: x.cu_q,
        q_row_stride: batch.q_row_stride as i64,
        k_row_stride: (hkv * d) as i64,
        v_row_stride: (hkv * d) as i64,
        o_row_stride: batch.o_row_stride as i64,
        kf_row_stride: (hkv * d) as i64,
        context_lens: x.context_lens,
        page_size: cache.page_size as i32,
        max_pages: batch.max_pages as i32,
        num_pages: cache.num_pages as i32,
        gather_rows: rows as i32,
        ..attn_params_base(c, p, batch.batch, batch.max_seqlen_q, batch.total_q)
    })
}

/// Paged prefill: O `[total_q, Hq, d]` and natural-log LSE `[Hq, total_q]` of new query tokens
/// against the unrotated keys of a paged cache (see [`PagedPrefillBatch`] for positions).
/// RoPE / ReRoPE / ALiBi / masks as `p` says; f16 and bf16. `splits > 1` splits every
/// sequence's keys (as decode does; [`paged_prefill_splits`] picks a count for a GPU) and needs
/// an f32 workspace of [`paged_prefill_workspace_len`]; the combine kernel then merges.
/// `gather` (of [`paged_prefill_gather_len`], when [`paged_prefill_prefers_gather`] says so)
/// selects the gathered path (module docs), splits as asked (one split and a chunk longer than
/// one narrow tile: the wide kernel); with ReRoPE it is not used. Returns the path taken.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_paged<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    gather: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PagedPrefillPath> {
    fwd_paged(gpu, stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, None::<(&CudaSlice<T>, &OutputGate)>, out, lse, cache, batch, p, splits, workspace, gather)
}

/// [`attention_fwd_paged`] with the output gate fused, as
/// [`attention_fwd_gated`](super::attention_fwd_gated) takes it: O is written as
/// `O · sigmoid(gate)` (with split keys, by the combine), output row `t` (`cu_seqlens_q`'s
/// numbering) reading the gates of row `t`. The LSE is the attention's, ungated.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_paged_gated<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    gather: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PagedPrefillPath> {
    fwd_paged(gpu, stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace, gather)
}

#[allow(clippy::too_many_arguments)]
fn fwd_paged<T: Dtype, G: DevicePtr<T>>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    gate: Option<(&G, &OutputGate)>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    gather: Option<&mut CudaViewMut<'_, T>>,
) -> Result<PagedPrefillPath> {
    let be = OnStream::new(gpu, stream)?;
    let lens = PagedFwdLens {
        q: q.len(),
        k_cache: k_cache.len(),
        v_cache: v_cache.len(),
        block_table: block_table.len(),
        context_lens: context_lens.len(),
        cu_seqlens_q: cu_seqlens_q.len(),
        out: out.len(),
        lse: lse.len(),
        workspace: workspace.as_ref().map(|w| w.len()),
        gather: gather.as_ref().map(|w| w.len()),
    };
    let plan = batch.check::<T>(p, cache, &lens, splits)?;
    let out_len = out.len();
    let (q, _g1) = q.device_ptr(stream);
    let (k_cache, _g2) = k_cache.device_ptr(stream);
    let (v_cache, _g3) = v_cache.device_ptr(stream);
    let (block_table, _g4) = block_table.device_ptr(stream);
    let (context_lens, _g5) = context_lens.device_ptr(stream);
    let (cu_q, _g6) = cu_seqlens_q.device_ptr(stream);
    let (out, _g7) = out.device_ptr_mut(stream);
    let (lse, _g8) = lse.device_ptr_mut(stream);
    let (workspace, _g9) = split_workspace(workspace, plan.splits, stream);
    let (gather, _g10) = match gather {
        Some(w) if plan.path == PagedPrefillPath::Gathered => {
            let (gp, g) = w.device_ptr_mut(stream);
            (gp, Some(g))
        }
        _ => (0, None),
    };
    let (gate, _g11) = GateArgs::on_stream::<T, _>(gate, (batch.total_q, p.num_q_heads, p.head_dim), stream, out, out_len)?;
    let ptrs = PagedFwdPtrs { q, k_cache, v_cache, block_table, context_lens, cu_q, out, lse, workspace, gather, gate };
    launch_fwd_paged::<T, _>(&be, ptrs, plan, cache, batch, p)?;
    Ok(plan.path)
}

/// Host copies of a paged prefill's inputs and results, widened, for checked mode.
pub(crate) struct PagedFwdHost {
    pub q: Vec<f64>,
    pub k_cache: Vec<f64>,
    pub v_cache: Vec<f64>,
    pub block_table: Vec<i32>,
    pub context_lens: Vec<i32>,
    pub cu_q: Vec<i32>,
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    /// The output gate's values and layout, if the call was gated.
    pub gate: Option<(Vec<f64>, OutputGate)>,
}

/// [`attention_fwd_paged`], then compare O and LSE with [`crate::reference::attention`] over the keys
/// gathered through the block table. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_paged_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    gather: Option<&mut CudaViewMut<'_, T>>,
) -> Result<CheckReport> {
    attention_fwd_paged(gpu, stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, out, lse, cache, batch, p, splits, workspace, gather)?;
    paged_host(stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, out, lse, None)
        .and_then(|host| compare_fwd_paged::<T>(&host, cache, batch, p))
}

/// [`attention_fwd_paged_gated`], then compare O (gated) and LSE with the reference as
/// [`attention_fwd_paged_checked`] does. Synchronizes the stream.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_paged_gated_checked<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    gate: &impl DevicePtr<T>,
    layout: &OutputGate,
    out: &mut (impl DevicePtrMut<T> + DevicePtr<T>),
    lse: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    cache: &PagedKvCache,
    batch: &PagedPrefillBatch,
    p: &AttentionParams,
    splits: usize,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    gather: Option<&mut CudaViewMut<'_, T>>,
) -> Result<CheckReport> {
    attention_fwd_paged_gated(gpu, stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, gate, layout, out, lse, cache, batch, p, splits, workspace, gather)?;
    paged_host(stream, q, k_cache, v_cache, block_table, context_lens, cu_seqlens_q, out, lse, Some((widen(&stream.clone_dtoh(gate)?), *layout)))
        .and_then(|host| compare_fwd_paged::<T>(&host, cache, batch, p))
}

/// Host copies of a paged prefill's buffers for checked mode (synchronizes the stream).
#[allow(clippy::too_many_arguments)]
fn paged_host<T: Dtype>(
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    block_table: &impl DevicePtr<i32>,
    context_lens: &impl DevicePtr<i32>,
    cu_seqlens_q: &impl DevicePtr<i32>,
    out: &impl DevicePtr<T>,
    lse: &impl DevicePtr<f32>,
    gate: Option<(Vec<f64>, OutputGate)>,
) -> Result<PagedFwdHost> {
    Ok(PagedFwdHost {
        q: widen(&stream.clone_dtoh(q)?),
        k_cache: widen(&stream.clone_dtoh(k_cache)?),
        v_cache: widen(&stream.clone_dtoh(v_cache)?),
        block_table: stream.clone_dtoh(block_table)?,
        context_lens: stream.clone_dtoh(context_lens)?,
        cu_q: stream.clone_dtoh(cu_seqlens_q)?,
        out: widen(&stream.clone_dtoh(out)?),
        lse: stream.clone_dtoh(lse)?.iter().map(|&x| x as f64).collect(),
        gate,
    })
}

/// Checked mode's comparison of a paged prefill with [`paged_reference`] (shared with the
/// emulator), query offsets clamped as the kernel clamps them.
pub(crate) fn compare_fwd_paged<T: Dtype>(h: &PagedFwdHost, cache: &PagedKvCache, batch: &PagedPrefillBatch, p: &AttentionParams) -> Result<CheckReport> {
    let (d, hq, tq) = (p.head_dim, p.num_q_heads, batch.total_q);
    let qh = gather_rows(&h.q, tq, batch.q_row_stride, hq * d);
    let oh = gather_rows(&h.out, tq, batch.o_row_stride, hq * d);
    let runs: Vec<(usize, usize)> = (0..batch.batch)
        .map(|b| {
            let q0 = (h.cu_q[b].max(0) as usize).min(tq);
            (q0, (h.cu_q[b + 1].max(0) as usize).clamp(q0, tq) - q0)
        })
        .collect();
    let (mut want_o, want_l) = paged_reference(&qh, &h.k_cache, &h.v_cache, &h.block_table, &h.context_lens, &runs, batch.max_pages, cache, p)?;
    if let Some((g, layout)) = &h.gate {
        reference::output_gate(&mut want_o, g, layout, hq, d)?;
    }
    let last = last_context_position(&h.context_lens, batch.batch);
    let (tol_o, tol_l) = Tolerance::attention::<T>(p, max_abs(&qh) * p.query_scale_bound(last), max_abs(&h.k_cache), max_abs(&h.v_cache));
    let ro = CheckReport::compare("paged prefill out", &oh, &want_o, tol_o);
    let rl = CheckReport::compare("paged prefill lse", &h.lse[..hq * tq], &want_l, tol_l);
    ro.worst(rl).ensure()
}
