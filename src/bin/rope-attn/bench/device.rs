//! GPU timing and problem set-up shared by `rope-attn bench` and `benches/gpu.rs` (which
//! includes this file by path): CUDA-event timing after warm-up, random inputs (never zeros),
//! input sets rotated so that small problems are not timed out of L2, and one struct per
//! benchmarked problem (prefill, paged decode, rope, copy). Nothing here runs without a device.
#![allow(dead_code)]

use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream};
use rope_attn::cuda::{self, AttentionBatch, DecodeBatch, Dtype, Gpu, PagedKvCache, PrefillPath, RopeShape};
use rope_attn::{Alibi, AttentionParams, Layout, Mask, NormScope, OutputGate, QkNorm, QueryTemperature, RopeConfig, RopeScaling, Rotary};
use std::sync::Arc;

/// Any error of a benchmark step (launcher, driver, set-up).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result of a benchmark step.
pub type Res<T> = Result<T, BoxError>;

// ---------------------------------------------------------------------------------------------
// Timing

/// How long to warm up and how many timed rounds to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Warm-up: at least this many milliseconds of calls (and at least 3 calls).
    pub warmup_ms: f64,
    /// Timed rounds; the reported time is the median round's time per call.
    pub rounds: usize,
    /// Calls per round are chosen so that one round lasts about this long.
    pub round_ms: f64,
    /// At most this many calls per round.
    pub max_iters: usize,
}

impl Settings {
    /// The full runner: 10 rounds of >= 5 ms each after >= 50 ms of warm-up.
    pub fn full() -> Self {
        Settings { warmup_ms: 50.0, rounds: 10, round_ms: 5.0, max_iters: 1000 }
    }

    /// `--quick`: 5 rounds of >= 2 ms after >= 20 ms of warm-up.
    pub fn quick() -> Self {
        Settings { warmup_ms: 20.0, rounds: 5, round_ms: 2.0, max_iters: 500 }
    }
}

/// What one measurement gave (milliseconds per call).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median over rounds of (round time / calls per round).
    pub median_ms: f64,
    /// Fastest round, per call.
    pub min_ms: f64,
    /// Slowest round, per call.
    pub max_ms: f64,
    /// Calls per round.
    pub iters: usize,
    /// Rounds.
    pub rounds: usize,
}

/// Two timing events on one stream (events created with timing enabled: cudarc's
/// `new_event(None)` disables timing).
pub struct Timer {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    end: CudaEvent,
}

impl Timer {
    /// Events in the stream's context.
    pub fn new(stream: &Arc<CudaStream>) -> Res<Self> {
        let ctx = stream.context();
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Timer { stream: stream.clone(), start: ctx.new_event(flags)?, end: ctx.new_event(flags)? })
    }

    /// Milliseconds between an event before `f(first)` and one after `f(first + iters - 1)`,
    /// the calls issued back to back. Waits for the end event.
    pub fn time(&self, iters: usize, first: usize, f: &mut dyn FnMut(usize) -> Res<()>) -> Res<f64> {
        self.start.record(&self.stream)?;
        for i in 0..iters {
            f(first + i)?;
        }
        self.end.record(&self.stream)?;
        Ok(self.start.elapsed_ms(&self.end)? as f64)
    }

    /// One untimed call (module load, shared-memory attribute), then warm-up, then `rounds`
    /// rounds of back-to-back calls. `f(i)` is call number `i` (use it to rotate input sets).
    pub fn measure(&self, s: &Settings, f: &mut dyn FnMut(usize) -> Res<()>) -> Res<Stats> {
        f(0)?;
        self.stream.synchronize()?;
        let (mut spent, mut calls, mut one) = (0.0, 0usize, f64::INFINITY);
        while calls < 3 || (spent < s.warmup_ms && calls < 10_000) {
            let t = self.time(1, calls + 1, f)?;
            spent += t;
            calls += 1;
            one = one.min(t);
        }
        let iters = ((s.round_ms / one.max(1e-4)).ceil() as usize).clamp(1, s.max_iters.max(1));
        let mut next = calls + 1;
        let mut per = Vec::with_capacity(s.rounds);
        for _ in 0..s.rounds.max(1) {
            per.push(self.time(iters, next, f)? / iters as f64);
            next += iters;
        }
        per.sort_by(f64::total_cmp);
        Ok(Stats { median_ms: median(&per), min_ms: per[0], max_ms: per[per.len() - 1], iters, rounds: per.len() })
    }
}

/// Median of a sorted, non-empty slice.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

// ---------------------------------------------------------------------------------------------
// Device facts

/// An integer attribute of the device.
fn attribute(gpu: &Gpu, a: sys::CUdevice_attribute) -> Res<usize> {
    Ok(gpu.context().attribute(a)?.max(0) as usize)
}

/// Streaming multiprocessors (sizes decode splits).
pub fn sm_count(gpu: &Gpu) -> Res<usize> {
    attribute(gpu, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
}

/// L2 bytes (decides how many input sets to rotate through).
pub fn l2_bytes(gpu: &Gpu) -> Res<usize> {
    attribute(gpu, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
}

/// (free, total) device memory in bytes.
pub fn memory(gpu: &Gpu) -> Res<(usize, usize)> {
    Ok(gpu.context().mem_get_info()?)
}

/// The CUDA version the driver supports, e.g. "12.8".
pub fn driver_api_version() -> Option<String> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int; the driver library was found by device_status.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Input sets to rotate through so that one pass over them is at least twice the L2 (1..=16).
pub fn input_sets(bytes_per_set: usize, l2: usize) -> usize {
    (2 * l2).div_ceil(bytes_per_set.max(1)).clamp(1, 16)
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// SplitMix64: fast, seeded, good enough for benchmark inputs.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates.
    pub fn shuffle<X>(&mut self, xs: &mut [X]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// `n` values uniform in [-1, 1), generated on all cores (seeded per chunk: reproducible).
pub fn random_host<T: Dtype>(n: usize, seed: u64) -> Vec<T> {
    let mut out = vec![T::default(); n];
    let threads = std::thread::available_parallelism().map_or(4, |t| t.get()).min(32);
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut r = SplitMix(seed ^ (c as u64).wrapping_mul(0xA076_1D64_78BD_642F));
                for x in part {
                    *x = T::from_f64(r.uniform());
                }
            });
        }
    });
    out
}

/// A device buffer of `n` random values.
pub fn random_device<T: Dtype>(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Res<CudaSlice<T>> {
    Ok(stream.clone_htod(&random_host::<T>(n.max(1), seed))?)
}

/// A large device buffer filled from a random block of at most 16 Mi elements, tiled by
/// device-to-device copies (a 32 GiB paged cache would take minutes to generate on the host).
pub fn random_device_tiled<T: Dtype>(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Res<CudaSlice<T>> {
    let block = n.clamp(1, 16 << 20);
    let mut buf = unsafe { stream.alloc::<T>(n.max(1)) }?;
    let first = random_host::<T>(block, seed);
    stream.memcpy_htod(&first, &mut buf.slice_mut(0..block))?;
    let mut filled = block;
    while filled < n {
        let take = filled.min(n - filled);
        let (head, mut tail) = buf.split_at_mut(filled);
        stream.memcpy_dtod(&head.slice(0..take), &mut tail.slice_mut(0..take))?;
        filled += take;
    }
    Ok(buf)
}

/// The benchmarks' RoPE over a head of `d`: Llama 3.1's schedule (theta 5e5, llama3 scaling,
/// factor 8) up to head_dim 256; at 512, Gemma 4's full layers' proportional RoPE (theta 1e6, a
/// quarter of the pairs turning: the kernels turn at most 128). Attention factor 1 either way,
/// so rotating the same buffer again and again keeps it bounded.
pub fn bench_rotary(d: usize) -> Res<Rotary> {
    if d > 256 {
        let cfg = RopeConfig::with_scaling(1e6, d, d, Some(131072), RopeScaling::Proportional { factor: 1.0, rotated_pairs: d / 8 })?;
        return Ok(Rotary::from_schedule(&cfg.schedule(None)?, Layout::Half));
    }
    let cfg = RopeConfig::with_scaling(
        500000.0,
        d,
        d,
        Some(131072),
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    )?;
    Ok(Rotary::from_schedule(&cfg.schedule(None)?, Layout::Half))
}

/// Normwise relative difference `‖a − b‖ / ‖b‖` (infinite if either holds a NaN/inf).
pub fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn widen<T: Dtype>(stream: &Arc<CudaStream>, x: &CudaSlice<T>) -> Res<Vec<f64>> {
    Ok(stream.clone_dtoh(x)?.iter().map(|v| v.to_f64()).collect())
}

// ---------------------------------------------------------------------------------------------
// Prefill

/// Which prefill variant to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillVariant {
    /// RoPE + ALiBi inside the kernel, K rotated tile by tile (no workspace).
    Fused,
    /// RoPE + ALiBi inside the kernel, K rotated once into the workspace by the rope kernel.
    PreRotated,
    /// The unfused pipeline: the rope kernel rotates Q and K in place, then attention with
    /// ALiBi but no RoPE. Rotates the input set in place: time it last.
    Unfused,
    /// Attention without any position encoding (what torch's flash SDPA computes).
    NoPe,
    /// `Fused` under Llama 4's chunked attention (chunks of [`LLAMA4_CHUNK`]): the tiles
    /// outside each query tile's chunk are skipped.
    FusedChunked,
    /// `Fused` with Qwen3-Next's output gate (a dense `[tokens, hq, d]` gate) fused into the
    /// epilogue: its cost next to `Fused` is the gate's.
    FusedGated,
    /// `NoPe` with Llama 4's query temperature ([`LLAMA4_TEMPERATURE`], its NoPE layers'): the
    /// cost of scaling each Q tile once, next to the same call without it.
    NoPeTemperature,
}

/// Llama 4's `floor_scale` and `attn_scale`.
pub const LLAMA4_TEMPERATURE: QueryTemperature = QueryTemperature { floor_scale: 8192, attn_scale: 0.1, offset: 1 };

/// Llama 4's `attention_chunk_size`.
pub const LLAMA4_CHUNK: usize = 8192;

/// A prefill problem: `batch` sequences of `seqlen` tokens (Q, K and V the same length), GQA
/// `hq`/`hkv`, RoPE (Llama 3.1) + ALiBi, causal or not; several input sets when small.
pub struct Prefill<T: Dtype> {
    /// RoPE + ALiBi (+ mask).
    pub with_pe: AttentionParams,
    /// ALiBi only (the attention half of the unfused pipeline).
    pub alibi_only: AttentionParams,
    /// No position encoding.
    pub no_pe: AttentionParams,
    /// `with_pe` in chunks of [`LLAMA4_CHUNK`].
    pub chunked: AttentionParams,
    /// `no_pe` with Llama 4's query temperature.
    pub temperature: AttentionParams,
    /// The batch geometry.
    pub batch: AttentionBatch,
    /// Total tokens.
    pub tokens: usize,
    sets: Vec<[CudaSlice<T>; 3]>,
    out: CudaSlice<T>,
    lse: CudaSlice<f32>,
    ws: CudaSlice<T>,
    /// The output gate of `FusedGated`, `[tokens, hq, d]`.
    gate: CudaSlice<T>,
    cu_q: CudaSlice<i32>,
    cu_k: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    rot: Rotary,
}

impl<T: Dtype> Prefill<T> {
    /// Device bytes this problem will allocate with `sets` input sets.
    pub fn device_bytes(batch: usize, seqlen: usize, hq: usize, hkv: usize, d: usize, sets: usize) -> usize {
        let e = std::mem::size_of::<T>();
        let t = batch * seqlen;
        let qkv = t * (hq + 2 * hkv) * d * e;
        sets * qkv + 2 * t * hq * d * e + t * hkv * d * e + t * hq * 4 + t * (hq + hkv) * d * e
    }

    /// Bytes of one input set (Q, K, V).
    pub fn set_bytes(batch: usize, seqlen: usize, hq: usize, hkv: usize, d: usize) -> usize {
        batch * seqlen * (hq + 2 * hkv) * d * std::mem::size_of::<T>()
    }

    /// Allocate and fill.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &Arc<CudaStream>,
        batch: usize,
        seqlen: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        causal: bool,
        sets: usize,
        seed: u64,
    ) -> Res<Self> {
        let rot = bench_rotary(d)?;
        let mut no_pe = AttentionParams::new(hq, hkv, d);
        no_pe.mask = Mask { causal, window: None, sinks: 0, chunk: None };
        let alibi_only = AttentionParams { alibi: Some(Alibi { total_heads: hq, head_offset: 0 }), ..no_pe.clone() };
        let with_pe = AttentionParams { rope: Some(rot.clone()), ..alibi_only.clone() };
        let chunked = AttentionParams { mask: Mask { chunk: Some(LLAMA4_CHUNK), ..with_pe.mask }, ..with_pe.clone() };
        let temperature = AttentionParams { query_temperature: Some(LLAMA4_TEMPERATURE), ..no_pe.clone() };
        let tokens = batch * seqlen;
        let ab = AttentionBatch::contiguous(&with_pe, batch, seqlen, tokens, tokens);
        let mut set_list = Vec::with_capacity(sets);
        for s in 0..sets.max(1) {
            let base = seed.wrapping_add(1000 * s as u64);
            set_list.push([
                random_device::<T>(stream, tokens * hq * d, base + 1)?,
                random_device::<T>(stream, tokens * hkv * d, base + 2)?,
                random_device::<T>(stream, tokens * hkv * d, base + 3)?,
            ]);
        }
        let cu: Vec<i32> = (0..=batch).map(|b| (b * seqlen) as i32).collect();
        let pos: Vec<i32> = (0..tokens).map(|t| (t % seqlen) as i32).collect();
        let ws_len = cuda::attention_fwd_workspace_len(&with_pe, tokens).max(1);
        Ok(Prefill {
            with_pe,
            alibi_only,
            no_pe,
            chunked,
            temperature,
            batch: ab,
            tokens,
            sets: set_list,
            out: stream.alloc_zeros::<T>(tokens * hq * d)?,
            lse: stream.alloc_zeros::<f32>(tokens * hq)?,
            ws: stream.alloc_zeros::<T>(ws_len)?,
            gate: random_device::<T>(stream, tokens * hq * d, seed + 7)?,
            cu_q: stream.clone_htod(&cu)?,
            cu_k: stream.clone_htod(&cu)?,
            positions: stream.clone_htod(&pos)?,
            rot,
        })
    }

    /// Input sets in rotation.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    /// Run one variant on input set `i % sets`; returns the path the launcher took (the
    /// attention call's, for the unfused pipeline: `Plain`).
    pub fn run(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, variant: PrefillVariant, i: usize) -> Res<PrefillPath> {
        let n = self.sets.len();
        let [q, k, v] = &mut self.sets[i % n];
        let (out, lse, b) = (&mut self.out, &mut self.lse, &self.batch);
        let (cq, ck) = (&self.cu_q, &self.cu_k);
        let path = match variant {
            PrefillVariant::Fused => {
                cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.with_pe, None)?
            }
            PrefillVariant::PreRotated => {
                let mut ws = self.ws.as_view_mut();
                cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.with_pe, Some(&mut ws))?
            }
            PrefillVariant::NoPe => cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.no_pe, None)?,
            PrefillVariant::FusedChunked => cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.chunked, None)?,
            PrefillVariant::FusedGated => {
                let p = &self.with_pe;
                let layout = OutputGate::dense(p.num_q_heads, p.head_dim);
                cuda::attention_fwd_gated(gpu, stream, q, k, v, &self.gate, &layout, out, lse, cq, ck, b, p, None)?
            }
            PrefillVariant::NoPeTemperature => cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.temperature, None)?,
            PrefillVariant::Unfused => {
                let p = &self.with_pe;
                let shape = RopeShape::contiguous(self.tokens, p.num_q_heads, p.num_kv_heads, p.head_dim);
                cuda::rope_inplace(gpu, stream, q, k, &self.positions, &shape, &self.rot)?;
                cuda::attention_fwd(gpu, stream, q, k, v, out, lse, cq, ck, b, &self.alibi_only, None)?
            }
        };
        Ok(path)
    }

    /// Cross-check on input set 0 before anything is timed: the fused, pre-rotated and unfused
    /// outputs must agree (normwise, to a few units of the dtype's rounding). Returns
    /// (fused path, pre-rotated path, ‖pre − fused‖/‖fused‖, ‖unfused − fused‖/‖fused‖).
    /// The unfused run rotates copies of Q and K: set 0 stays unrotated.
    pub fn cross_check(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>) -> Res<(PrefillPath, PrefillPath, f64, f64)> {
        let fused_path = self.run(gpu, stream, PrefillVariant::Fused, 0)?;
        let fused = widen(stream, &self.out)?;
        let pre_path = self.run(gpu, stream, PrefillVariant::PreRotated, 0)?;
        let pre = widen(stream, &self.out)?;
        let p = &self.with_pe;
        let [q, k, v] = &self.sets[0];
        let mut q2 = unsafe { stream.alloc::<T>(q.len()) }?;
        let mut k2 = unsafe { stream.alloc::<T>(k.len()) }?;
        stream.memcpy_dtod(q, &mut q2)?;
        stream.memcpy_dtod(k, &mut k2)?;
        let shape = RopeShape::contiguous(self.tokens, p.num_q_heads, p.num_kv_heads, p.head_dim);
        cuda::rope_inplace(gpu, stream, &mut q2, &mut k2, &self.positions, &shape, &self.rot)?;
        let (out, lse) = (&mut self.out, &mut self.lse);
        cuda::attention_fwd(
            gpu,
            stream,
            &q2,
            &k2,
            v,
            out,
            lse,
            &self.cu_q,
            &self.cu_k,
            &self.batch,
            &self.alibi_only,
            None,
        )?;
        let unfused = widen(stream, &self.out)?;
        Ok((fused_path, pre_path, rel_diff(&pre, &fused), rel_diff(&unfused, &fused)))
    }
}

// ---------------------------------------------------------------------------------------------
// Paged decode

/// A decode step: `batch` sequences, one query each, all at context `context`, over a paged
/// cache (page `page_size`, pages handed out in a random order); RoPE (Llama 3.1), no ALiBi.
/// With several input sets, each set has its own pages and block table.
pub struct Decode<T: Dtype> {
    /// The attention parameters (RoPE, causal).
    pub p: AttentionParams,
    /// The batch geometry.
    pub batch: DecodeBatch,
    /// The cache geometry.
    pub cache: PagedKvCache,
    /// Key splits used.
    pub splits: usize,
    k_cache: CudaSlice<T>,
    v_cache: CudaSlice<T>,
    tables: Vec<CudaSlice<i32>>,
    lens: CudaSlice<i32>,
    q: CudaSlice<T>,
    out: CudaSlice<T>,
    lse: CudaSlice<f32>,
    ws: CudaSlice<f32>,
    /// The output gate of [`Decode::run_gated`], `[batch, hq, d]`.
    gate: CudaSlice<T>,
}

impl<T: Dtype> Decode<T> {
    /// Bytes of K and V one decode step reads (each cached token once).
    pub fn kv_bytes(batch: usize, context: usize, hkv: usize, d: usize) -> usize {
        2 * batch * context * hkv * d * std::mem::size_of::<T>()
    }

    /// Allocate, fill and plan the splits for `sm_count` SMs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &Arc<CudaStream>,
        batch: usize,
        context: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        page_size: usize,
        sets: usize,
        sm_count: usize,
        seed: u64,
    ) -> Res<Self> {
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(bench_rotary(d)?);
        let max_pages = context.div_ceil(page_size);
        let per_set = batch * max_pages;
        let sets = sets.max(1);
        let cache = PagedKvCache { num_pages: sets * per_set, page_size, kv_heads: hkv, head_dim: d };
        let mut r = SplitMix(seed);
        let mut tables = Vec::with_capacity(sets);
        for s in 0..sets {
            let mut pages: Vec<i32> = ((s * per_set) as i32..((s + 1) * per_set) as i32).collect();
            r.shuffle(&mut pages);
            tables.push(stream.clone_htod(&pages)?);
        }
        let db = DecodeBatch::contiguous(&p, batch, 1, max_pages, context);
        let splits = cuda::decode_splits(&p, &db, sm_count);
        let ws_len = cuda::decode_workspace_len(&p, &db, splits).max(1);
        Ok(Decode {
            k_cache: random_device_tiled::<T>(stream, cache.len(), seed + 1)?,
            v_cache: random_device_tiled::<T>(stream, cache.len(), seed + 2)?,
            tables,
            lens: stream.clone_htod(&vec![context as i32; batch])?,
            q: random_device::<T>(stream, batch * hq * d, seed + 3)?,
            out: stream.alloc_zeros::<T>(batch * hq * d)?,
            lse: stream.alloc_zeros::<f32>(batch * hq)?,
            ws: stream.alloc_zeros::<f32>(ws_len)?,
            gate: random_device::<T>(stream, batch * hq * d, seed + 4)?,
            p,
            batch: db,
            cache,
            splits,
        })
    }

    /// Device bytes of a problem with `sets` sets (cache pool, tables, workspace upper bound).
    pub fn device_bytes(
        batch: usize,
        context: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        page_size: usize,
        sets: usize,
    ) -> usize {
        let pages = sets * batch * context.div_ceil(page_size);
        2 * pages * page_size * hkv * d * std::mem::size_of::<T>() + pages * 4 + 64 * batch * hq * (d + 1) * 4
    }

    /// Input sets in rotation.
    pub fn sets(&self) -> usize {
        self.tables.len()
    }

    /// One decode step over the block table of set `i % sets`.
    pub fn run(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let table = &self.tables[i % self.tables.len()];
        let mut ws = self.ws.as_view_mut();
        cuda::attention_decode(
            gpu,
            stream,
            &self.q,
            &self.k_cache,
            &self.v_cache,
            table,
            &self.lens,
            &mut self.out,
            &mut self.lse,
            &self.cache,
            &self.batch,
            &self.p,
            self.splits,
            Some(&mut ws),
        )?;
        Ok(())
    }

    /// [`Decode::run`] with Qwen3-Next's output gate fused (by the combine when split).
    pub fn run_gated(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let table = &self.tables[i % self.tables.len()];
        let mut ws = self.ws.as_view_mut();
        let layout = OutputGate::dense(self.p.num_q_heads, self.p.head_dim);
        let (q, kc, vc, lens) = (&self.q, &self.k_cache, &self.v_cache, &self.lens);
        cuda::attention_decode_gated(gpu, stream, q, kc, vc, table, lens, &self.gate, &layout, &mut self.out, &mut self.lse, &self.cache, &self.batch, &self.p, self.splits, Some(&mut ws))?;
        Ok(())
    }

    /// Whether the last output is free of NaN/inf.
    pub fn output_finite(&self, stream: &Arc<CudaStream>) -> Res<bool> {
        Ok(widen(stream, &self.out)?.iter().all(|x| x.is_finite()))
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked prefill over a paged cache

/// A paged prefill: `batch` sequences, each `chunk` new queries at the end of `context` cached
/// tokens (page `page_size`, pages handed out in a random order); RoPE (Llama 3.1) + ALiBi, causal. One input set
/// (the cache of a long context is far larger than L2). Both paths run on the same buffers.
pub struct PagedPrefill<T: Dtype> {
    /// The attention parameters.
    pub p: AttentionParams,
    /// The batch geometry.
    pub batch: cuda::PagedPrefillBatch,
    /// The cache geometry.
    pub cache: PagedKvCache,
    /// Key splits (`paged_prefill_splits`), for both paths.
    pub splits: usize,
    k_cache: CudaSlice<T>,
    v_cache: CudaSlice<T>,
    table: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    cu_q: CudaSlice<i32>,
    q: CudaSlice<T>,
    out: CudaSlice<T>,
    lse: CudaSlice<f32>,
    ws: CudaSlice<f32>,
    gather: CudaSlice<T>,
}

impl<T: Dtype> PagedPrefill<T> {
    /// Device bytes: the cache, Q and O, the gather workspace (K and V again), the split partials.
    pub fn device_bytes(batch: usize, chunk: usize, context: usize, hq: usize, hkv: usize, d: usize, page_size: usize) -> usize {
        let e = std::mem::size_of::<T>();
        let kv = 2 * batch * context.div_ceil(page_size) * page_size * hkv * d * e;
        2 * kv + 2 * batch * chunk * hq * d * e + 16 * batch * chunk * hq * (d + 1) * 4
    }

    /// Allocate, fill and plan the key splits (both paths') for `sm_count` SMs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &Arc<CudaStream>,
        batch: usize,
        chunk: usize,
        context: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        page_size: usize,
        sm_count: usize,
        seed: u64,
    ) -> Res<Self> {
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(bench_rotary(d)?);
        p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
        let max_pages = context.div_ceil(page_size);
        let cache = PagedKvCache { num_pages: batch * max_pages, page_size, kv_heads: hkv, head_dim: d };
        let mut pages: Vec<i32> = (0..cache.num_pages as i32).collect();
        SplitMix(seed).shuffle(&mut pages);
        let pb = cuda::PagedPrefillBatch::contiguous(&p, batch, chunk, batch * chunk, max_pages);
        let splits = cuda::paged_prefill_splits(&p, &pb, &cache, sm_count);
        let cu: Vec<i32> = (0..=batch).map(|b| (b * chunk) as i32).collect();
        Ok(PagedPrefill {
            k_cache: random_device_tiled::<T>(stream, cache.len(), seed + 1)?,
            v_cache: random_device_tiled::<T>(stream, cache.len(), seed + 2)?,
            table: stream.clone_htod(&pages)?,
            lens: stream.clone_htod(&vec![context as i32; batch])?,
            cu_q: stream.clone_htod(&cu)?,
            q: random_device::<T>(stream, batch * chunk * hq * d, seed + 3)?,
            out: stream.alloc_zeros::<T>(batch * chunk * hq * d)?,
            lse: stream.alloc_zeros::<f32>(batch * chunk * hq)?,
            ws: stream.alloc_zeros::<f32>(cuda::paged_prefill_workspace_len(&p, &pb, splits).max(1))?,
            gather: stream.alloc_zeros::<T>(cuda::paged_prefill_gather_len(&p, &pb, &cache))?,
            p,
            batch: pb,
            cache,
            splits,
        })
    }

    /// One paged prefill, fused or gathered; the path it took.
    pub fn run(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, gathered: bool) -> Res<cuda::PagedPrefillPath> {
        let mut ws = self.ws.as_view_mut();
        let mut g = self.gather.as_view_mut();
        Ok(cuda::attention_fwd_paged(
            gpu,
            stream,
            &self.q,
            &self.k_cache,
            &self.v_cache,
            &self.table,
            &self.lens,
            &self.cu_q,
            &mut self.out,
            &mut self.lse,
            &self.cache,
            &self.batch,
            &self.p,
            self.splits,
            Some(&mut ws),
            gathered.then_some(&mut g),
        )?)
    }

    /// The last output, widened.
    pub fn output(&self, stream: &Arc<CudaStream>) -> Res<Vec<f64>> {
        widen(stream, &self.out)
    }
}

// ---------------------------------------------------------------------------------------------
// Rope alone, and the copy of the same bytes

/// The rope kernel in place on Q `[tokens, hq, d]` and K `[tokens, hkv, d]`, and a
/// device-to-device copy of as many bytes, each over rotating input sets.
pub struct RopeCopy<T: Dtype> {
    /// The geometry.
    pub shape: RopeShape,
    sets: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    positions: CudaSlice<i32>,
    rot: Rotary,
    src: CudaSlice<T>,
    dst: CudaSlice<T>,
    elems: usize,
    /// A Qwen3-style QK norm's weights (per head, head_dim each).
    norm_w: (CudaSlice<f32>, CudaSlice<f32>),
    /// Cohere's QK LayerNorm weights (one vector per head: hq·d and hkv·d).
    layer_norm_w: (CudaSlice<f32>, CudaSlice<f32>),
    /// Per set, a gated q_proj output `[tokens, hq, 2d]` (Qwen3-Next: query then gate per
    /// head), and the dense Q the gated call writes.
    gated: Vec<CudaSlice<T>>,
    q_dense: CudaSlice<T>,
}

impl<T: Dtype> RopeCopy<T> {
    /// Bytes one call reads plus writes (both the rope kernel and the copy): `2·tokens·(hq+hkv)·d·elem`.
    pub fn moved_bytes(tokens: usize, hq: usize, hkv: usize, d: usize) -> usize {
        2 * tokens * (hq + hkv) * d * std::mem::size_of::<T>()
    }

    /// Allocate and fill.
    pub fn new(
        stream: &Arc<CudaStream>,
        tokens: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        sets: usize,
        seed: u64,
    ) -> Res<Self> {
        let sets = sets.max(1);
        let elems = tokens * (hq + hkv) * d;
        let (mut list, mut gated) = (Vec::with_capacity(sets), Vec::with_capacity(sets));
        for s in 0..sets {
            let base = seed.wrapping_add(100 * s as u64);
            list.push((
                random_device::<T>(stream, tokens * hq * d, base)?,
                random_device::<T>(stream, tokens * hkv * d, base + 1)?,
            ));
            gated.push(random_device_tiled::<T>(stream, tokens * hq * 2 * d, base + 2)?);
        }
        let pos: Vec<i32> = (0..tokens as i32).collect();
        Ok(RopeCopy {
            shape: RopeShape::contiguous(tokens, hq, hkv, d),
            sets: list,
            positions: stream.clone_htod(&pos)?,
            rot: bench_rotary(d)?,
            src: random_device_tiled::<T>(stream, sets * elems, seed + 7)?,
            dst: stream.alloc_zeros::<T>(sets * elems)?,
            elems,
            norm_w: (random_device_tiled::<f32>(stream, d, seed + 8)?, random_device_tiled::<f32>(stream, d, seed + 9)?),
            layer_norm_w: (random_device_tiled::<f32>(stream, hq * d, seed + 10)?, random_device_tiled::<f32>(stream, hkv * d, seed + 11)?),
            gated,
            q_dense: stream.alloc_zeros::<T>(tokens * hq * d)?,
        })
    }

    /// Input sets in rotation.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    /// Rotate set `i % sets` in place.
    pub fn run_rope(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let n = self.sets.len();
        let (q, k) = &mut self.sets[i % n];
        cuda::rope_inplace(gpu, stream, q, k, &self.positions, &self.shape, &self.rot)?;
        Ok(())
    }

    /// Set `i % sets` through the QK norm (per head, weighted: Qwen3's) and then rotated, in
    /// place; with `rotate` false, the norm alone.
    pub fn run_rope_normed(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize, rotate: bool) -> Res<()> {
        let n = self.sets.len();
        let (q, k) = &mut self.sets[i % n];
        let norm = QkNorm { eps: 1e-6, scope: NormScope::Head, q_weight: Some(&self.norm_w.0), k_weight: Some(&self.norm_w.1) };
        match rotate {
            true => cuda::rope_inplace_normed(gpu, stream, q, k, &self.positions, &self.shape, &self.rot, &norm)?,
            false => cuda::qk_norm_inplace(gpu, stream, q, k, &self.shape, &norm)?,
        }
        Ok(())
    }

    /// Set `i % sets` through Cohere's QK LayerNorm (each head centred, its own weights) and
    /// rotated, in place: the same bytes as [`run_rope_normed`](Self::run_rope_normed), one
    /// more read of each head (from cache) for its mean.
    pub fn run_rope_layer_normed(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let n = self.sets.len();
        let (q, k) = &mut self.sets[i % n];
        let norm = QkNorm { eps: 1e-5, scope: NormScope::HeadCentred, q_weight: Some(&self.layer_norm_w.0), k_weight: Some(&self.layer_norm_w.1) };
        cuda::rope_inplace_normed(gpu, stream, q, k, &self.positions, &self.shape, &self.rot, &norm)?;
        Ok(())
    }

    /// Set `i % sets`'s gated query normalised and rotated into the dense Q, its K in place
    /// (`qk_norm_rope_gated`: Qwen3-Next's norm and RoPE from q_proj's output). The same bytes
    /// as [`run_rope_normed`](Self::run_rope_normed): the gates are not read.
    pub fn run_rope_gated(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let n = self.sets.len();
        let (_, k) = &mut self.sets[i % n];
        let norm = QkNorm { eps: 1e-6, scope: NormScope::Head, q_weight: Some(&self.norm_w.0), k_weight: Some(&self.norm_w.1) };
        let shape = RopeShape { q_row_stride: 2 * self.shape.q_row_stride, ..self.shape };
        let rotation = cuda::GatedRotation::Rope { positions: &self.positions, rot: &self.rot };
        cuda::qk_norm_rope_gated(gpu, stream, &self.gated[i % n], &mut self.q_dense, k, &shape, rotation, &norm)?;
        Ok(())
    }

    /// Copy set `i % sets` of the source into the destination (the same bytes as one rope call).
    pub fn run_copy(&mut self, stream: &Arc<CudaStream>, i: usize) -> Res<()> {
        let s = i % self.sets.len();
        let r = s * self.elems..(s + 1) * self.elems;
        stream.memcpy_dtod(&self.src.slice(r.clone()), &mut self.dst.slice_mut(r))?;
        Ok(())
    }
}

/// The device-to-device copy ceiling: GB/s (bytes read + written) of copying a buffer of
/// `bytes` bytes, and the stats of one copy.
pub fn copy_ceiling(stream: &Arc<CudaStream>, bytes: usize, s: &Settings) -> Res<(f64, Stats)> {
    let n = bytes / 4;
    let src = random_device_tiled::<f32>(stream, n, 99)?;
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    let timer = Timer::new(stream)?;
    let st = timer.measure(s, &mut |_| Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok((2.0 * (n * 4) as f64 / (st.median_ms * 1e-3) / 1e9, st))
}
