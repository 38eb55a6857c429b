//! The CUDA kernels, run on the CPU (feature `emulator`): no GPU, no driver.
//!
//! build.rs compiles the *same* `kernels/*.cu` sources with the host C++ compiler against
//! `kernels/emu/simt.h`, a model of the CUDA features they use: every CUDA thread is a fiber,
//! `__syncthreads` / `__syncwarp` are real barriers, shuffles, `ldmatrix` and `mma.sync` are
//! computed from all 32 lanes' operands as the PTX ISA lays them out, and `cp.async` copies land
//! late. Each call here goes through the very validation, parameter packing, grid and
//! shared-memory sizing of the matching [`crate::cuda`] call, then runs the grid block by block.
//!
//! What it is for: proving the kernels' indexing, fragment layouts, masking, online softmax and
//! barriers against the f64 reference on machines without a GPU (CI), and debugging them. It
//! also catches what would hang or be undefined on a GPU — lanes of a warp split between a
//! barrier and a collective, a warp collective with exited or diverged lanes, `ldmatrix` / `cp.async` outside shared memory, more
//! shared memory than an sm_86 block has — and reports it as [`Error::Emulator`]. Between
//! barriers the threads run in a seeded random order and each `cp.async` group lands at its
//! commit or only at its wait (uninitialised shared memory reads as NaN), so a missing barrier
//! or wait changes results instead of hiding. What it cannot show: speed, and hardware
//! behaviour beyond the PTX semantics it models (the mma sums are rounded once, in f64).
//!
//! [`Emulator::take_work`] reports the work the kernels did ([`Work`]: trigonometry, tensor-core
//! instructions, global bytes): not time, but a way to compare kernel variants and pin costs.
//!
//! Pass [`GuardedBuf`]s to catch out-of-bounds accesses too (what `compute-sanitizer memcheck`
//! does on a GPU): each ends at an inaccessible page, and an access past it stops the process
//! with a message naming how far past which buffer.
//!
//! It is slow (thousands of context switches per tile): meant for test-sized problems.
//!
//! ```
//! use rope_attn::emulator::Emulator;
//! use rope_attn::cuda::RopeShape;
//! use rope_attn::{Layout, RopeSchedule, Rotary};
//! let (tokens, heads, d) = (3, 2, 64);
//! let mut q = vec![half::bf16::ONE; tokens * heads * d];
//! let mut k = q.clone();
//! let rot = Rotary::from_schedule(&RopeSchedule::plain(10000.0, d)?, Layout::Half);
//! let shape = RopeShape::contiguous(tokens, heads, heads, d);
//! let report = Emulator::new().rope_inplace_checked(&mut q, &mut k, &[0, 1, 1 << 24], &shape, &rot)?;
//! assert!(report.passed());
//! # Ok::<(), rope_attn::Error>(())
//! ```

mod buffer;

pub use buffer::GuardedBuf;

use crate::attention::{AttentionParams, Relative, Rotary};
use crate::config::MRope;
use crate::cuda::attention::{compare_fwd, launch_fwd, FwdHost, FwdPtrs};
use crate::cuda::checked::widen;
use crate::cuda::gated::{compare_gated, launch_gated};
use crate::cuda::append::{launch_append, AppendRows};
use crate::cuda::decode::{compare_decode, launch_decode, DecodeHost, DecodePtrs};
use crate::cuda::launch::{Backend, Launch};
use crate::cuda::merge::{launch_merge, MergeShape};
use crate::cuda::paged_prefill::{compare_fwd_paged, launch_fwd_paged, PagedFwdHost, PagedFwdPtrs};
use crate::cuda::params::{GateArgs, RopeArgs};
use crate::cuda::rope::{
    compare_normed, compare_rope, compare_rope_mrope, launch as launch_rope, launch_normed as launch_rope_normed, NormArgs, NormedRotation, Positions,
    RopePtrs,
};
use crate::cuda::scores::{compare_scores, launch_scores};
use crate::cuda::{
    AttentionBatch, CheckReport, DecodeBatch, DecodeLens, Dtype, FwdLens, GatedRotation, PagedFwdLens, PagedKvCache, PagedPrefillBatch, PagedPrefillPath, PrefillPath, RopeShape, ScoresShape,
};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use crate::qk_norm::QkNorm;
use cudarc::driver::DeviceRepr;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    fn ra_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem_bytes: u32,
        params: *const c_void,
        params_size: usize,
        seed: u64,
        counters: *mut u64,
    ) -> c_int;
    fn ra_emu_last_error() -> *const c_char;
}

/// Runs kernels on the CPU. Launches are numbered, and each one's thread schedule and
/// cp.async timing are drawn from (seed, launch number): runs are reproducible.
#[derive(Debug)]
pub struct Emulator {
    seed: u64,
    launches: AtomicU64,
    work: [AtomicU64; 5], // launches, trig, mma, global bytes, ldmatrix bytes since the last take_work
    smem_per_sm: usize,
}

/// What the kernels did, counted as they ran in the emulator: a machine-independent measure of
/// work (not of time) for comparing kernel variants and pinning down their cost in tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Kernel launches.
    pub launches: u64,
    /// `sincospif` evaluations (the trigonometry RoPE costs).
    pub trig: u64,
    /// `mma.sync` instructions, per warp.
    pub mma: u64,
    /// Bytes moved between global memory and the kernels by vector accesses and `cp.async`.
    pub global_bytes: u64,
    /// Shared-memory bytes `ldmatrix` fed to the tensor cores: per mma, the traffic that limits
    /// `mma.sync` kernels on A100/H100 (what the prefill's 128-row tiles halve for K and V).
    pub ldmatrix_bytes: u64,
}

impl Default for Emulator {
    fn default() -> Self {
        Self::new()
    }
}

/// The kernels' gate arguments for an optional host gate over O's `(rows, heads, head_dim)`,
/// checked as on a device ([`GateArgs::checked`]; Rust's borrows keep it from aliasing O).
fn gate_args<T>(gate: Option<(&[T], &OutputGate)>, shape: (usize, usize, usize)) -> Result<GateArgs> {
    gate.map_or(Ok(GateArgs::default()), |(g, layout)| GateArgs::checked(addr(g), g.len(), layout, shape))
}

/// Address of a host buffer as the kernels see it (0 for an empty one, like an empty device buffer).
fn addr<T>(s: &[T]) -> u64 {
    if s.is_empty() {
        0
    } else {
        s.as_ptr() as u64
    }
}

impl Backend for Emulator {
    fn run<P: DeviceRepr + Copy>(&self, l: &Launch<P>) -> Result<()> {
        let name = CString::new(l.name.as_str()).expect("kernel names have no NUL");
        let grid = [l.grid.0, l.grid.1, l.grid.2];
        let block = [l.threads, 1, 1];
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        let seed = self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let smem = u32::try_from(l.smem).map_err(|_| Error::Emulator(format!("{}: shared memory size overflows", l.name)))?;
        // SAFETY: `params` is a #[repr(C)] mirror of the kernel's struct (its size is checked on
        // the C++ side too); every address in it was validated by the launcher that planned this
        // launch against the host buffers it came from, which outlive this call.
        let mut counts = [0u64; 4];
        let rc = unsafe {
            ra_emu_launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                smem,
                &l.params as *const P as *const c_void,
                std::mem::size_of::<P>(),
                seed,
                counts.as_mut_ptr(),
            )
        };
        self.work[0].fetch_add(1, Ordering::Relaxed);
        for (total, c) in self.work[1..].iter().zip(counts) {
            total.fetch_add(c, Ordering::Relaxed);
        }
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: a NUL-terminated, thread-local string owned by the emulator, valid until its next launch.
            Err(Error::Emulator(unsafe { CStr::from_ptr(ra_emu_last_error()) }.to_string_lossy().into_owned()))
        }
    }

    fn smem_per_sm(&self) -> usize {
        self.smem_per_sm
    }
}

/// Inputs of a prefill: Q, K, V and the cumulative sequence offsets.
#[derive(Debug, Clone, Copy)]
pub struct FwdInputs<'a, T> {
    /// Q rows (`batch.q_row_stride` apart).
    pub q: &'a [T],
    /// K rows.
    pub k: &'a [T],
    /// V rows.
    pub v: &'a [T],
    /// `[batch + 1]` query offsets.
    pub cu_seqlens_q: &'a [i32],
    /// `[batch + 1]` key offsets.
    pub cu_seqlens_k: &'a [i32],
    /// `[batch, 2]` starting positions (query, key) per sequence, as `attention_fwd_at` takes; `None` = bottom-right aligned.
    pub seq_starts: Option<&'a [i32]>,
}

/// Inputs of a paged prefill: new queries and the paged cache they attend to.
#[derive(Debug, Clone, Copy)]
pub struct PagedFwdInputs<'a, T> {
    /// Q rows (`batch.q_row_stride` apart).
    pub q: &'a [T],
    /// `[batch + 1]` query offsets.
    pub cu_seqlens_q: &'a [i32],
    /// K pages `[num_pages, page_size, Hkv, d]`, unrotated.
    pub k_cache: &'a [T],
    /// V pages.
    pub v_cache: &'a [T],
    /// `[batch, max_pages]` page indices.
    pub block_table: &'a [i32],
    /// `[batch]` cached keys per sequence (the new tokens included).
    pub context_lens: &'a [i32],
}

/// Inputs of a decode step: Q and the paged cache with its block table and lengths.
#[derive(Debug, Clone, Copy)]
pub struct DecodeInputs<'a, T> {
    /// Q rows (`batch.q_row_stride` apart).
    pub q: &'a [T],
    /// K pages `[num_pages, page_size, Hkv, d]`, unrotated.
    pub k_cache: &'a [T],
    /// V pages.
    pub v_cache: &'a [T],
    /// `[batch, max_pages]` page indices.
    pub block_table: &'a [i32],
    /// `[batch]` cached keys per sequence (the new tokens included).
    pub context_lens: &'a [i32],
}

impl Emulator {
    /// An emulator with the default seed.
    pub fn new() -> Self {
        Self::with_seed(0x005E_ED0F_C0DA)
    }

    /// An emulator whose thread schedules and copy timings follow `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Emulator { seed, launches: AtomicU64::new(0), work: Default::default(), smem_per_sm: Self::H100_SMEM_PER_SM }
    }

    /// Shared memory per SM of an H100 (228 KB), the card the emulator plans for by default.
    pub const H100_SMEM_PER_SM: usize = 228 * 1024;
    /// Shared memory per SM of an A100 (164 KB).
    pub const A100_SMEM_PER_SM: usize = 164 * 1024;

    /// Plan launches as for a card with `bytes` of shared memory per SM (what a launcher may
    /// spend without losing a resident block; decode's base steps depend on it). The blocks
    /// themselves are still held to the 99 KB every supported card gives one.
    pub fn with_smem_per_sm(mut self, bytes: usize) -> Self {
        self.smem_per_sm = bytes;
        self
    }

    /// The work of every launch so far, and a reset of the count.
    pub fn take_work(&self) -> Work {
        let [launches, trig, mma, bytes, ldsm] = &self.work;
        Work {
            launches: launches.swap(0, Ordering::Relaxed),
            trig: trig.swap(0, Ordering::Relaxed),
            mma: mma.swap(0, Ordering::Relaxed),
            global_bytes: bytes.swap(0, Ordering::Relaxed),
            ldmatrix_bytes: ldsm.swap(0, Ordering::Relaxed),
        }
    }

    /// [`crate::cuda::rope_inplace`] on host buffers.
    pub fn rope_inplace<T: Dtype>(&self, q: &mut [T], k: &mut [T], positions: &[i32], shape: &RopeShape, rot: &Rotary) -> Result<()> {
        shape.check(q.len(), k.len(), positions.len(), rot)?;
        let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
        let (qp, kp) = (addr(q), addr(k));
        let ptrs = RopePtrs::in_place(qp, kp, shape);
        launch_rope::<T, _>(self, ptrs, shape, args, Positions::Explicit(addr(positions)), false)
    }

    /// [`crate::cuda::rope_inplace_checked`] on host buffers.
    pub fn rope_inplace_checked<T: Dtype>(&self, q: &mut [T], k: &mut [T], positions: &[i32], shape: &RopeShape, rot: &Rotary) -> Result<CheckReport> {
        let before = [widen(q), widen(k)];
        self.rope_inplace(q, k, positions, shape, rot)?;
        compare_rope::<T>(&before, &[widen(q), widen(k)], positions, shape, rot)
    }

    /// [`crate::cuda::rope_inplace_normed`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_normed<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        shape: &RopeShape,
        rot: &Rotary,
        norm: &QkNorm<&[f32]>,
    ) -> Result<()> {
        shape.check(q.len(), k.len(), positions.len(), rot)?;
        shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
        let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
        self.normed(q, k, shape, args, Positions::Explicit(addr(positions)), norm)
    }

    /// [`crate::cuda::qk_norm_inplace`] on host buffers.
    pub fn qk_norm_inplace<T: Dtype>(&self, q: &mut [T], k: &mut [T], shape: &RopeShape, norm: &QkNorm<&[f32]>) -> Result<()> {
        shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
        self.normed(q, k, shape, RopeArgs::none(), Positions::Explicit(0), norm)
    }

    fn normed<T: Dtype>(&self, q: &mut [T], k: &mut [T], shape: &RopeShape, args: RopeArgs, pos: Positions, norm: &QkNorm<&[f32]>) -> Result<()> {
        let na = NormArgs::new(norm, norm.q_weight.map_or(0, addr), norm.k_weight.map_or(0, addr));
        let ptrs = RopePtrs::in_place(addr(q), addr(k), shape);
        launch_rope_normed::<T, _>(self, ptrs, shape, args, pos, false, na)
    }

    /// [`crate::cuda::rope_inplace_normed_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_normed_checked<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        shape: &RopeShape,
        rot: &Rotary,
        norm: &QkNorm<&[f32]>,
    ) -> Result<CheckReport> {
        let before = [widen(q), widen(k)];
        self.rope_inplace_normed(q, k, positions, shape, rot, norm)?;
        compare_normed::<T>(&before, &[widen(q), widen(k)], NormedRotation::Rope(positions, rot), shape, norm)
    }

    /// [`crate::cuda::qk_norm_inplace_checked`] on host buffers.
    pub fn qk_norm_inplace_checked<T: Dtype>(&self, q: &mut [T], k: &mut [T], shape: &RopeShape, norm: &QkNorm<&[f32]>) -> Result<CheckReport> {
        let before = [widen(q), widen(k)];
        self.qk_norm_inplace(q, k, shape, norm)?;
        compare_normed::<T>(&before, &[widen(q), widen(k)], NormedRotation::None, shape, norm)
    }

    /// [`crate::cuda::rope_inplace_mrope_normed`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_mrope_normed<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        stride: usize,
        shape: &RopeShape,
        rot: &Rotary,
        mrope: &MRope,
        norm: &QkNorm<&[f32]>,
    ) -> Result<()> {
        shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
        shape.check_norm(q.len(), k.len(), norm, |w| w.len())?;
        let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
        self.normed(q, k, shape, args, Positions::Sections { positions: addr(positions), stride, mrope: *mrope }, norm)
    }

    /// [`crate::cuda::rope_inplace_mrope_normed_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_mrope_normed_checked<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        stride: usize,
        shape: &RopeShape,
        rot: &Rotary,
        mrope: &MRope,
        norm: &QkNorm<&[f32]>,
    ) -> Result<CheckReport> {
        let before = [widen(q), widen(k)];
        self.rope_inplace_mrope_normed(q, k, positions, stride, shape, rot, mrope, norm)?;
        compare_normed::<T>(&before, &[widen(q), widen(k)], NormedRotation::Mrope(positions, stride, rot, mrope), shape, norm)
    }

    /// [`crate::cuda::qk_norm_rope_gated`] on host buffers: Qwen3-Next's and Qwen3.5's gated
    /// query, normalised and rotated out of `q_gated` into dense `q_out`, K in place.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope_gated<T: Dtype>(
        &self,
        q_gated: &[T],
        q_out: &mut [T],
        k: &mut [T],
        shape: &RopeShape,
        rotation: GatedRotation<'_, [i32]>,
        norm: &QkNorm<&[f32]>,
    ) -> Result<()> {
        let lens = [q_gated.len(), q_out.len(), k.len(), rotation.positions().map_or(0, <[i32]>::len)];
        let dense = shape.check_gated(lens, rotation, norm, |w| w.len())?;
        let na = NormArgs::new(norm, norm.q_weight.map_or(0, addr), norm.k_weight.map_or(0, addr));
        launch_gated::<T, _, [i32]>(self, [addr(q_gated), addr(q_out), addr(k)], shape, &dense, rotation, addr, na)
    }

    /// [`crate::cuda::qk_norm_rope_gated_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope_gated_checked<T: Dtype>(
        &self,
        q_gated: &[T],
        q_out: &mut [T],
        k: &mut [T],
        shape: &RopeShape,
        rotation: GatedRotation<'_, [i32]>,
        norm: &QkNorm<&[f32]>,
    ) -> Result<CheckReport> {
        let lens = [q_gated.len(), q_out.len(), k.len(), rotation.positions().map_or(0, <[i32]>::len)];
        let dense = shape.check_gated(lens, rotation, norm, |w| w.len())?;
        let (gated, k_before) = (widen(q_gated), widen(k));
        self.qk_norm_rope_gated(q_gated, q_out, k, shape, rotation, norm)?;
        compare_gated::<T>(&gated, k_before, &[widen(q_out), widen(k)], &widen(q_gated), rotation, shape, &dense, norm)
    }

    /// [`crate::cuda::rope_inplace_mrope`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_mrope<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        stride: usize,
        shape: &RopeShape,
        rot: &Rotary,
        mrope: &MRope,
    ) -> Result<()> {
        shape.check_mrope(q.len(), k.len(), positions.len(), stride, rot, mrope)?;
        let args = RopeArgs::new(Some(rot), Relative::None, shape.head_dim)?;
        let (qp, kp) = (addr(q), addr(k));
        let ptrs = RopePtrs::in_place(qp, kp, shape);
        let pos = Positions::Sections { positions: addr(positions), stride, mrope: *mrope };
        launch_rope::<T, _>(self, ptrs, shape, args, pos, false)
    }

    /// [`crate::cuda::rope_inplace_mrope_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_inplace_mrope_checked<T: Dtype>(
        &self,
        q: &mut [T],
        k: &mut [T],
        positions: &[i32],
        stride: usize,
        shape: &RopeShape,
        rot: &Rotary,
        mrope: &MRope,
    ) -> Result<CheckReport> {
        let before = [widen(q), widen(k)];
        self.rope_inplace_mrope(q, k, positions, stride, shape, rot, mrope)?;
        compare_rope_mrope::<T>(&before, &[widen(q), widen(k)], positions, stride, shape, rot, mrope)
    }

    /// [`crate::cuda::rope_into`] on host buffers: dense outputs, inputs untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_into<T: Dtype>(
        &self,
        q: &[T],
        k: &[T],
        q_out: &mut [T],
        k_out: &mut [T],
        positions: &[i32],
        shape: &RopeShape,
        rot: &Rotary,
    ) -> Result<()> {
        let (dense, args) = shape.check_into([q.len(), k.len(), q_out.len(), k_out.len(), positions.len()], rot)?;
        let ptrs = RopePtrs {
            q_in: addr(q),
            q_out: addr(q_out),
            k_in: addr(k),
            k_out: addr(k_out),
            q_out_stride: dense.q_row_stride,
            k_out_stride: dense.k_row_stride,
        };
        launch_rope::<T, _>(self, ptrs, shape, args, Positions::Explicit(addr(positions)), false)
    }

    /// [`crate::cuda::scores`] on host buffers.
    pub fn scores<T: Dtype>(&self, q: &[T], k: &[T], out: &mut [f32], shape: &ScoresShape, p: &AttentionParams) -> Result<()> {
        shape.check(p, q.len(), k.len(), out.len())?;
        launch_scores::<T, _>(self, [addr(q), addr(k), addr(out)], shape, p)
    }

    /// [`crate::cuda::scores_checked`] on host buffers.
    pub fn scores_checked<T: Dtype>(&self, q: &[T], k: &[T], out: &mut [f32], shape: &ScoresShape, p: &AttentionParams) -> Result<CheckReport> {
        self.scores(q, k, out, shape, p)?;
        let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
        compare_scores::<T>(&widen(q), &widen(k), &got, shape, p)
    }

    /// [`crate::cuda::attention_fwd`] (or `attention_fwd_at` with `seq_starts`) on host buffers;
    /// `workspace` picks the pre-rotated path as on a GPU.
    pub fn attention_fwd<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<PrefillPath> {
        self.fwd(x, None, out, lse, batch, p, workspace)
    }

    /// [`crate::cuda::attention_fwd_gated`] on host buffers (or `attention_fwd_at`'s positions, with `seq_starts`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_gated<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<PrefillPath> {
        self.fwd(x, Some((gate, layout)), out, lse, batch, p, workspace)
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<PrefillPath> {
        let lens = FwdLens {
            q: x.q.len(),
            k: x.k.len(),
            v: x.v.len(),
            out: out.len(),
            lse: lse.len(),
            cu_seqlens_q: x.cu_seqlens_q.len(),
            cu_seqlens_k: x.cu_seqlens_k.len(),
            workspace: workspace.as_ref().map(|w| w.len()),
        };
        let path = batch.check::<T>(p, &lens)?;
        if let Some(s) = x.seq_starts {
            if s.len() < 2 * batch.batch {
                return Err(Error::BufferTooSmall { what: "seq_starts", needed: 2 * batch.batch, got: s.len() });
            }
        }
        let ptrs = FwdPtrs {
            q: addr(x.q),
            k: addr(x.k),
            v: addr(x.v),
            out: addr(out),
            lse: addr(lse),
            cu_q: addr(x.cu_seqlens_q),
            cu_k: addr(x.cu_seqlens_k),
            seq_starts: x.seq_starts.map_or(0, addr),
            workspace: workspace.map_or(0, |w| addr(w)),
            gate: gate_args(gate, (batch.total_q, p.num_q_heads, p.head_dim))?,
        };
        launch_fwd::<T, _>(self, ptrs, path, batch, p)?;
        Ok(path)
    }

    /// [`crate::cuda::attention_fwd_checked`] on host buffers (default positions only, as there).
    pub fn attention_fwd_checked<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<(PrefillPath, CheckReport)> {
        self.fwd_checked(x, None, out, lse, batch, p, workspace)
    }

    /// [`crate::cuda::attention_fwd_gated_checked`] on host buffers (default positions only, as there).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_gated_checked<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<(PrefillPath, CheckReport)> {
        self.fwd_checked(x, Some((gate, layout)), out, lse, batch, p, workspace)
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd_checked<T: Dtype>(
        &self,
        x: &FwdInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        batch: &AttentionBatch,
        p: &AttentionParams,
        workspace: Option<&mut [T]>,
    ) -> Result<(PrefillPath, CheckReport)> {
        if x.seq_starts.is_some() {
            return Err(Error::Shape { what: "checked prefill", expected: "default positions (seq_starts: None)".into(), got: "seq_starts".into() });
        }
        let path = self.fwd(x, gate, out, lse, batch, p, workspace)?;
        let host = FwdHost {
            q: widen(x.q),
            k: widen(x.k),
            v: widen(x.v),
            out: widen(out),
            lse: lse.iter().map(|&v| v as f64).collect(),
            cu_q: x.cu_seqlens_q.to_vec(),
            cu_k: x.cu_seqlens_k.to_vec(),
            gate: gate.map(|(g, l)| (widen(g), *l)),
        };
        Ok((path, compare_fwd::<T>(&host, batch, p)?))
    }

    /// [`crate::cuda::attention_fwd_paged`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_paged<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<PagedPrefillPath> {
        self.fwd_paged(x, None, out, lse, cache, batch, p, splits, workspace, gather)
    }

    /// [`crate::cuda::attention_fwd_paged_gated`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_paged_gated<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<PagedPrefillPath> {
        self.fwd_paged(x, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace, gather)
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd_paged<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<PagedPrefillPath> {
        let lens = PagedFwdLens {
            q: x.q.len(),
            k_cache: x.k_cache.len(),
            v_cache: x.v_cache.len(),
            block_table: x.block_table.len(),
            context_lens: x.context_lens.len(),
            cu_seqlens_q: x.cu_seqlens_q.len(),
            out: out.len(),
            lse: lse.len(),
            workspace: workspace.as_ref().map(|w| w.len()),
            gather: gather.as_ref().map(|w| w.len()),
        };
        let plan = batch.check::<T>(p, cache, &lens, splits)?;
        let ptrs = PagedFwdPtrs {
            q: addr(x.q),
            k_cache: addr(x.k_cache),
            v_cache: addr(x.v_cache),
            block_table: addr(x.block_table),
            context_lens: addr(x.context_lens),
            cu_q: addr(x.cu_seqlens_q),
            out: addr(out),
            lse: addr(lse),
            workspace: if plan.splits > 1 { workspace.map_or(0, |w| addr(w)) } else { 0 },
            gather: if plan.path == PagedPrefillPath::Gathered { gather.map_or(0, |w| addr(w)) } else { 0 },
            gate: gate_args(gate, (batch.total_q, p.num_q_heads, p.head_dim))?,
        };
        launch_fwd_paged::<T, _>(self, ptrs, plan, cache, batch, p)?;
        Ok(plan.path)
    }

    /// [`crate::cuda::attention_fwd_paged_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_paged_checked<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<CheckReport> {
        self.fwd_paged_checked(x, None, out, lse, cache, batch, p, splits, workspace, gather)
    }

    /// [`crate::cuda::attention_fwd_paged_gated_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_paged_gated_checked<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<CheckReport> {
        self.fwd_paged_checked(x, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace, gather)
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd_paged_checked<T: Dtype>(
        &self,
        x: &PagedFwdInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &PagedPrefillBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
        gather: Option<&mut [T]>,
    ) -> Result<CheckReport> {
        self.fwd_paged(x, gate, out, lse, cache, batch, p, splits, workspace, gather)?;
        let host = PagedFwdHost {
            q: widen(x.q),
            k_cache: widen(x.k_cache),
            v_cache: widen(x.v_cache),
            block_table: x.block_table.to_vec(),
            context_lens: x.context_lens.to_vec(),
            cu_q: x.cu_seqlens_q.to_vec(),
            out: widen(out),
            lse: lse.iter().map(|&v| v as f64).collect(),
            gate: gate.map(|(g, l)| (widen(g), *l)),
        };
        compare_fwd_paged::<T>(&host, cache, batch, p)
    }

    /// [`crate::cuda::attention_decode`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<()> {
        self.decode(x, None, out, lse, cache, batch, p, splits, workspace)
    }

    /// [`crate::cuda::attention_decode_gated`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_gated<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<()> {
        self.decode(x, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<()> {
        let lens = DecodeLens {
            q: x.q.len(),
            k_cache: x.k_cache.len(),
            v_cache: x.v_cache.len(),
            block_table: x.block_table.len(),
            context_lens: x.context_lens.len(),
            out: out.len(),
            lse: lse.len(),
            workspace: workspace.as_ref().map(|w| w.len()),
        };
        let plan = batch.check(p, cache, &lens, splits)?;
        let ptrs = DecodePtrs {
            q: addr(x.q),
            k_cache: addr(x.k_cache),
            v_cache: addr(x.v_cache),
            block_table: addr(x.block_table),
            context_lens: addr(x.context_lens),
            out: addr(out),
            lse: addr(lse),
            workspace: if plan.splits > 1 { workspace.map_or(0, |w| addr(w)) } else { 0 },
            gate: gate_args(gate, (batch.tokens(), p.num_q_heads, p.head_dim))?,
        };
        launch_decode::<T, _>(self, ptrs, plan, cache, batch, p)
    }

    /// [`crate::cuda::attention_decode_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_checked<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<CheckReport> {
        self.decode_checked(x, None, out, lse, cache, batch, p, splits, workspace)
    }

    /// [`crate::cuda::attention_decode_gated_checked`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_gated_checked<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<CheckReport> {
        self.decode_checked(x, Some((gate, layout)), out, lse, cache, batch, p, splits, workspace)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_checked<T: Dtype>(
        &self,
        x: &DecodeInputs<'_, T>,
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse: &mut [f32],
        cache: &PagedKvCache,
        batch: &DecodeBatch,
        p: &AttentionParams,
        splits: usize,
        workspace: Option<&mut [f32]>,
    ) -> Result<CheckReport> {
        self.decode(x, gate, out, lse, cache, batch, p, splits, workspace)?;
        let host = DecodeHost {
            q: widen(x.q),
            k_cache: widen(x.k_cache),
            v_cache: widen(x.v_cache),
            block_table: x.block_table.to_vec(),
            context_lens: x.context_lens.to_vec(),
            out: widen(out),
            lse: lse.iter().map(|&v| v as f64).collect(),
            gate: gate.map(|(g, l)| (widen(g), *l)),
        };
        compare_decode::<T>(&host, cache, batch, p)
    }

    /// [`crate::cuda::paged_append`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_append<T: Dtype>(
        &self,
        k: &[T],
        v: &[T],
        k_cache: &mut [T],
        v_cache: &mut [T],
        slots: &[i32],
        tokens: usize,
        k_row_stride: usize,
        v_row_stride: usize,
        cache: &PagedKvCache,
    ) -> Result<()> {
        self.append(k, v, k_cache, v_cache, slots, AppendRows { tokens, k_row_stride, v_row_stride, v_norm_eps: None }, cache)
    }

    /// [`crate::cuda::paged_append_v_normed`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_append_v_normed<T: Dtype>(
        &self,
        k: &[T],
        v: &[T],
        k_cache: &mut [T],
        v_cache: &mut [T],
        slots: &[i32],
        tokens: usize,
        k_row_stride: usize,
        v_row_stride: usize,
        cache: &PagedKvCache,
        v_norm_eps: f64,
    ) -> Result<()> {
        self.append(k, v, k_cache, v_cache, slots, AppendRows { tokens, k_row_stride, v_row_stride, v_norm_eps: Some(v_norm_eps) }, cache)
    }

    #[allow(clippy::too_many_arguments)]
    fn append<T: Dtype>(&self, k: &[T], v: &[T], k_cache: &mut [T], v_cache: &mut [T], slots: &[i32], rows: AppendRows, cache: &PagedKvCache) -> Result<()> {
        rows.check([k.len(), v.len(), k_cache.len(), v_cache.len(), slots.len()], cache)?;
        launch_append::<T, _>(self, [addr(k), addr(v), addr(k_cache), addr(v_cache), addr(slots)], &rows, cache)
    }

    /// [`crate::cuda::merge_states`] on host buffers: `[(o1, lse1), (o2, lse2)]` into `(out, lse_out)`.
    pub fn merge_states<T: Dtype>(
        &self,
        parts: [(&[T], &[f32]); 2],
        out: &mut [T],
        lse_out: &mut [f32],
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.merge(parts, None, out, lse_out, tokens, heads, head_dim)
    }

    /// [`crate::cuda::merge_states_gated`] on host buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_states_gated<T: Dtype>(
        &self,
        parts: [(&[T], &[f32]); 2],
        gate: &[T],
        layout: &OutputGate,
        out: &mut [T],
        lse_out: &mut [f32],
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.merge(parts, Some((gate, layout)), out, lse_out, tokens, heads, head_dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn merge<T: Dtype>(
        &self,
        parts: [(&[T], &[f32]); 2],
        gate: Option<(&[T], &OutputGate)>,
        out: &mut [T],
        lse_out: &mut [f32],
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let [(o1, l1), (o2, l2)] = parts;
        let shape = MergeShape { tokens, heads, head_dim };
        shape.check([o1.len(), l1.len(), o2.len(), l2.len(), out.len(), lse_out.len()])?;
        let gate = gate_args(gate, (tokens, heads, head_dim))?;
        launch_merge::<T, _>(self, [addr(o1), addr(l1), addr(o2), addr(l2), addr(out), addr(lse_out)], gate, &shape)
    }
}

/// The emulator itself, through kernels/emu/selftest.cpp: its tensor-core arithmetic against a
/// plain product, and the misuse it must refuse.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::device::Module;
    use half::f16;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SelftestParams {
        a: u64,
        b: u64,
        d: u64,
        mode: i32,
        pad: i32,
    }
    // SAFETY: mirrors RaEmuSelftestParams (the emulator checks the size).
    unsafe impl DeviceRepr for SelftestParams {}

    fn selftest<P: DeviceRepr + Copy>(params: P, threads: u32, smem: usize) -> Result<()> {
        Emulator::new().run(&Launch { module: Module::Rope, name: "ra_emu_selftest".into(), grid: (1, 1, 1), threads, smem, params })
    }

    fn inputs() -> (Vec<f16>, Vec<f16>) {
        let a = (0..256).map(|i| f16::from_f32(((i * 37 % 23) as f32 - 11.0) / 8.0)).collect();
        let b = (0..128).map(|i| f16::from_f32(((i * 53 % 19) as f32 - 9.0) / 4.0)).collect();
        (a, b)
    }

    fn run_mode(mode: i32) -> (Result<()>, Vec<f32>) {
        let (a, b) = inputs();
        let mut d = vec![f32::NAN; 128];
        let params = SelftestParams { a: addr(&a), b: addr(&b), d: d.as_mut_ptr() as u64, mode, pad: 0 };
        (selftest(params, 32, 384 * 2), d)
    }

    #[test]
    fn ldmatrix_and_mma_compute_a_matrix_product() {
        let (a, b) = inputs();
        let (r, d) = run_mode(0);
        r.unwrap();
        for m in 0..16 {
            for n in 0..8 {
                let want: f64 = (0..16).map(|k| a[m * 16 + k].to_f64() * b[k * 8 + n].to_f64()).sum();
                assert_eq!(d[m * 8 + n] as f64, want, "D[{m}][{n}]");
            }
        }
    }

    fn err(r: Result<()>) -> String {
        match r {
            Err(Error::Emulator(e)) => e,
            other => panic!("expected an emulator error, got {other:?}"),
        }
    }

    #[test]
    fn misuse_is_refused() {
        assert!(err(run_mode(1).0).contains("lanes have exited"));
        assert!(err(run_mode(2).0).contains("wait at different collectives"));
        assert!(err(run_mode(3).0).contains("16-byte aligned"));
    }

    /// Racecheck's planted races (selftest modes 4, 5, 7: another lane's shared memory read with
    /// only a shuffle in between) fail their launch; the same with a __syncwarp (6) and the
    /// matrix product (0) run clean. Without the feature every mode runs.
    #[test]
    fn racecheck_finds_the_planted_races() {
        for mode in [4, 5, 7] {
            let r = run_mode(mode).0;
            if cfg!(feature = "racecheck") {
                assert!(err(r).contains("data race"), "mode {mode}");
            } else {
                r.unwrap();
            }
        }
        run_mode(6).0.unwrap();
        run_mode(0).0.unwrap();
    }

    #[test]
    fn bad_launches_are_refused() {
        let p = SelftestParams { a: 0, b: 0, d: 0, mode: 0, pad: 0 };
        assert!(err(selftest(p, 64, 0)).contains("64 threads (bound 32)"));
        assert!(err(selftest(p, 32, 100 * 1024)).contains("99 KiB"));
        assert!(err(selftest([0u64; 2], 32, 0)).contains("parameter struct of 16 bytes"));
        let l = Launch { module: Module::Rope, name: "no_such_kernel".into(), grid: (1, 1, 1), threads: 32, smem: 0, params: p };
        assert!(err(Emulator::new().run(&l)).contains("no kernel named no_such_kernel"));
    }
}
