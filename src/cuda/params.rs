//! `#[repr(C)]` mirrors of the kernels' parameter structs, passed by value (FlashAttention's
//! one-struct-per-kernel style). Field order and types must match the `.cu`/`.cuh` files.

use crate::attention::{AttentionParams, Layout, Relative, Rotary};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, SyncOnDrop};

/// `RA_MAX_PAIRS` in kernels/rope.cuh: the frequencies the kernels' parameters hold.
pub(crate) const MAX_PAIRS: usize = 128;

/// `RA_MAX_ROT_PAIRS`: rotary_dim <= 512, every pair past [`MAX_PAIRS`] of frequency 0 (Gemma
/// 4's proportional RoPE on its 512-wide layers turns 64 pairs and passes the rest through).
pub(crate) const MAX_ROT_PAIRS: usize = 256;

/// What the kernels' rotation arguments hold: at most [`MAX_ROT_PAIRS`] pairs, none turning
/// past the first [`MAX_PAIRS`] (the launchers and the shape checks refuse anything else).
pub(crate) fn check_rotation_fits(rot: &Rotary, head_dim: usize) -> Result<()> {
    if rot.rotary_dim / 2 > MAX_ROT_PAIRS {
        return Err(Error::RotaryDim { rotary_dim: rot.rotary_dim, head_dim });
    }
    if let Some(&f) = rot.inv_freq.iter().skip(MAX_PAIRS).find(|&&f| f != 0.0) {
        return Err(Error::Parameter {
            name: "inv_freq",
            value: f,
            reason: "the kernels turn at most 128 rotation pairs; pairs past them must have frequency 0 (proportional RoPE)",
        });
    }
    Ok(())
}

/// Mirror of `ra::RopeArgs` (kernels/rope.cuh).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(crate) struct RopeArgs {
    pub freq: [[f32; 2]; MAX_PAIRS],
    pub freq_leak: [[f32; 2]; MAX_PAIRS],
    pub rotary_dim: i32,
    pub interleaved: i32,
    pub attention_factor: f32,
    pub relative: i32,
    pub window: i32,
    pub temp_floor: i32,
    pub temp_scale: f32,
    pub temp_offset: i32,
}

/// `inv_freq / 2π` (turns per position) as an f32 pair hi + lo carrying ~48 bits, so the kernel
/// can reduce `position * freq` modulo one turn exactly (kernels/rope.cuh, `angle_turns`).
pub(crate) fn split_turns(inv_freq: f64) -> [f32; 2] {
    let turns = inv_freq / std::f64::consts::TAU;
    let hi = turns as f32;
    [hi, (turns - hi as f64) as f32]
}

impl RopeArgs {
    /// No rotation at all (attention without RoPE).
    pub fn none() -> Self {
        RopeArgs {
            freq: [[0.0; 2]; MAX_PAIRS],
            freq_leak: [[0.0; 2]; MAX_PAIRS],
            rotary_dim: 0,
            interleaved: 0,
            attention_factor: 1.0,
            relative: 0,
            window: 0,
            temp_floor: 0,
            temp_scale: 0.0,
            temp_offset: 0,
        }
    }

    /// The kernel form of a rotation (validated against `head_dim`) and relative mode.
    pub fn new(rot: Option<&Rotary>, relative: Relative, head_dim: usize) -> Result<Self> {
        let mut a = Self::none();
        let Some(rot) = rot else { return Ok(a) };
        rot.validate(head_dim)?;
        check_rotation_fits(rot, head_dim)?;
        for (i, &f) in rot.inv_freq.iter().take(MAX_PAIRS).enumerate() {
            a.freq[i] = split_turns(f);
        }
        a.rotary_dim = rot.rotary_dim as i32;
        a.interleaved = (rot.layout == Layout::Interleaved) as i32;
        a.attention_factor = rot.attention_factor as f32;
        match relative {
            Relative::None => {}
            Relative::ReRope { window } => {
                a.relative = 1;
                a.window = window_i32(window)?;
            }
            Relative::Leaky { window, k } => {
                a.relative = 2;
                a.window = window_i32(window)?;
                for (i, &f) in rot.inv_freq.iter().take(MAX_PAIRS).enumerate() {
                    a.freq_leak[i] = split_turns(f / k);
                }
            }
        }
        Ok(a)
    }
}

fn window_i32(w: usize) -> Result<i32> {
    i32::try_from(w).map_err(|_| Error::Position { what: "rerope window", value: w as i64, limit: i32::MAX as i64 })
}

/// Largest number of query heads per launch that learned sinks take (kernels/params.cuh).
pub const MAX_SINK_HEADS: usize = 128;

/// Mirror of `ra::SinkArgs` (kernels/params.cuh): learned sink logits per query head.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SinkArgs {
    pub logit: [f32; MAX_SINK_HEADS],
    pub on: i32,
    pub pad_: i32,
}

impl SinkArgs {
    /// From a validated [`AttentionParams::sink_logits`] (off when `None`).
    pub(crate) fn new(p: &AttentionParams) -> Result<Self> {
        let mut a = SinkArgs { logit: [0.0; MAX_SINK_HEADS], on: 0, pad_: 0 };
        if let Some(s) = &p.sink_logits {
            if s.len() > MAX_SINK_HEADS {
                return Err(Error::Shape {
                    what: "sink_logits",
                    expected: format!("at most {MAX_SINK_HEADS} query heads per launch"),
                    got: s.len().to_string(),
                });
            }
            for (a, &v) in a.logit.iter_mut().zip(s) {
                *a = v as f32;
            }
            a.on = 1;
        }
        Ok(a)
    }
}

/// Mirror of `ra::RopeParams` (kernels/rope.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RopeParams {
    pub rope: RopeArgs,
    pub q_in: u64,
    pub q_out: u64,
    pub k_in: u64,
    pub k_out: u64,
    pub positions: u64,
    pub cu_seqlens: u64,
    pub seq_starts: u64,
    pub q_in_stride: i64,
    pub q_out_stride: i64,
    pub k_in_stride: i64,
    pub k_out_stride: i64,
    pub tokens: i32,
    pub q_heads: i32,
    pub k_heads: i32,
    pub head_dim: i32,
    pub batch: i32,
    pub starts_stride: i32,
    pub use_leak_freq: i32,
    pub block_table: u64,
    pub context_lens: u64,
    pub v_in: u64,
    pub v_out: u64,
    pub page_size: i32,
    pub max_pages: i32,
    pub num_pages: i32,
    pub gather_rows: i32,
    pub mrope: i32,
    pub mrope_h: i32,
    pub mrope_w: i32,
    pub mrope_stride: i32,
    pub norm: i32,
    pub norm_eps: f32,
    pub q_norm_w: u64,
    pub k_norm_w: u64,
    pub q_in_hstride: i32,
}

/// Mirror of `ra::ScoresParams` (kernels/scores.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ScoresParams {
    pub rope: RopeArgs,
    pub q: u64,
    pub k: u64,
    pub out: u64,
    pub q_row_stride: i64,
    pub k_row_stride: i64,
    pub nq: i32,
    pub nk: i32,
    pub q_heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub q_offset: i32,
    pub causal: i32,
    pub window: i32,
    pub sinks: i32,
    pub chunk: i32,
    pub alibi_total_heads: i32,
    pub alibi_head_offset: i32,
    pub scale: f32,
    pub cap_in: f32,
    pub cap_out: f32,
}

/// Mirror of `ra::AttnParams` (kernels/attention.cuh): prefill over a variable-length batch.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AttnParams {
    pub rope: RopeArgs,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub k_far: u64,
    pub out: u64,
    pub lse: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub seq_starts: u64,
    pub q_row_stride: i64,
    pub k_row_stride: i64,
    pub v_row_stride: i64,
    pub o_row_stride: i64,
    pub kf_row_stride: i64,
    pub batch: i32,
    pub max_seqlen_q: i32,
    pub total_q: i32,
    pub total_k: i32,
    pub q_heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub causal: i32,
    pub window: i32,
    pub sinks: i32,
    pub chunk: i32,
    pub alibi_total_heads: i32,
    pub alibi_head_offset: i32,
    pub rotate_k: i32,
    pub scale_log2: f32,
    pub scale: f32,
    pub block_table: u64,
    pub context_lens: u64,
    pub page_size: i32,
    pub max_pages: i32,
    pub num_pages: i32,
    pub splits: i32,
    pub keys_per_split: i32,
    pub gather_rows: i32,
    pub part_out: u64,
    pub part_lse: u64,
    pub sink: SinkArgs,
    pub cap_in: f32,
    pub cap_out: f32,
    pub gate: GateArgs,
}

/// Mirror of `ra::DecodeParams` (kernels/attention_decode.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DecodeParams {
    pub rope: RopeArgs,
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub block_table: u64,
    pub context_lens: u64,
    pub out: u64,
    pub lse: u64,
    pub part_out: u64,
    pub part_lse: u64,
    pub q_row_stride: i64,
    pub o_row_stride: i64,
    pub batch: i32,
    pub queries: i32,
    pub q_heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub page_size: i32,
    pub max_pages: i32,
    pub num_pages: i32,
    pub splits: i32,
    pub keys_per_split: i32,
    pub causal: i32,
    pub window: i32,
    pub sinks: i32,
    pub alibi_total_heads: i32,
    pub alibi_head_offset: i32,
    pub scale_log2: f32,
    pub base_steps: i32,
    pub sink: SinkArgs,
    pub cap_in: f32,
    pub cap_out: f32,
    pub chunk: i32,
    pub gate: GateArgs,
}

/// Mirror of `ra::AppendParams` (kernels/attention_decode.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AppendParams {
    pub k: u64,
    pub v: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub slots: u64,
    pub k_row_stride: i64,
    pub v_row_stride: i64,
    pub tokens: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub num_slots: i32,
    pub v_norm_eps: f32,
    pub pad_: i32,
}

/// Mirror of `ra::MergeParams` (kernels/merge.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct MergeParams {
    pub o1: u64,
    pub lse1: u64,
    pub o2: u64,
    pub lse2: u64,
    pub out: u64,
    pub lse_out: u64,
    pub tokens: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub pad_: i32,
    pub gate: GateArgs,
}

/// Mirror of `ra::SplitsParams` (kernels/merge.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SplitsParams {
    pub part_out: u64,
    pub part_lse: u64,
    pub out: u64,
    pub lse: u64,
    pub o_row_stride: i64,
    pub splits: i32,
    pub tokens: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub sink: SinkArgs,
    pub gate: GateArgs,
}

/// Mirror of `ra::GateArgs` (kernels/params.cuh): the output gate, `ptr` 0 for none.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct GateArgs {
    pub ptr: u64,
    pub row_stride: i64,
    pub head_stride: i64,
    pub comp_stride: i32,
    pub pad_: i32,
}

impl GateArgs {
    /// The gate at address `ptr`, `len` elements laid out as `g` says, once
    /// [`OutputGate::check`] found them enough for `rows` output rows of `heads` heads of
    /// `head_dim` (a typed error otherwise).
    pub(crate) fn checked(ptr: u64, len: usize, g: &OutputGate, (rows, heads, head_dim): (usize, usize, usize)) -> Result<Self> {
        g.check(len, rows, heads, head_dim)?;
        Ok(GateArgs { ptr, row_stride: g.row_stride as i64, head_stride: g.head_stride as i64, comp_stride: (!g.per_head) as i32, pad_: 0 })
    }

    /// The kernels' arguments for an optional device gate of `T`s over O's `shape` (rows,
    /// heads, head_dim: [`GateArgs::checked`]), with the guard that orders its use on `stream`.
    /// A typed error if its bytes overlap O's (`out`, `out_len` elements): blocks read gates
    /// while others write O, so an aliased gate would be read half-gated.
    pub(crate) fn on_stream<'a, T, G: DevicePtr<T>>(
        gate: Option<(&'a G, &OutputGate)>,
        shape: (usize, usize, usize),
        stream: &'a CudaStream,
        out: u64,
        out_len: usize,
    ) -> Result<(Self, Option<SyncOnDrop<'a>>)> {
        let Some((g, layout)) = gate else { return Ok((GateArgs::default(), None)) };
        let (ptr, guard) = g.device_ptr(stream);
        let args = GateArgs::checked(ptr, g.len(), layout, shape)?;
        let elem = std::mem::size_of::<T>() as u64;
        let (g_end, o_end) = (ptr + g.len() as u64 * elem, out + out_len as u64 * elem);
        if g.len() > 0 && out_len > 0 && ptr < o_end && out < g_end {
            return Err(Error::Shape {
                what: "output gate",
                expected: "a buffer disjoint from out".into(),
                got: format!("gate [{ptr:#x}, {g_end:#x}) overlapping out [{out:#x}, {o_end:#x})"),
            });
        }
        Ok((args, Some(guard)))
    }
}

// SAFETY: plain-old-data structs whose layout matches the CUDA side field for field.
unsafe impl DeviceRepr for RopeParams {}
unsafe impl DeviceRepr for ScoresParams {}
unsafe impl DeviceRepr for AttnParams {}
unsafe impl DeviceRepr for DecodeParams {}
unsafe impl DeviceRepr for AppendParams {}
unsafe impl DeviceRepr for MergeParams {}
unsafe impl DeviceRepr for SplitsParams {}

/// An i32 kernel argument from a usize, or a typed error naming it.
pub(crate) fn to_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Position { what, value: v as i64, limit: i32::MAX as i64 })
}

/// Size of every params struct and offset of every field, named as kernels/abi/layout_probe.cu
/// prints them, for tests/abi_layout.rs.
pub(crate) fn abi_layout() -> Vec<(String, usize)> {
    let mut out = Vec::new();
    macro_rules! check {
        ($s:ident; $($f:ident),*) => {
            out.push((stringify!($s).to_string(), std::mem::size_of::<$s>()));
            $(out.push((concat!(stringify!($s), ".", stringify!($f)).to_string(), std::mem::offset_of!($s, $f)));)*
        };
    }
    check!(RopeArgs; freq, freq_leak, rotary_dim, interleaved, attention_factor, relative, window, temp_floor, temp_scale, temp_offset);
    check!(SinkArgs; logit, on, pad_);
    check!(GateArgs; ptr, row_stride, head_stride, comp_stride, pad_);
    check!(RopeParams; rope, q_in, q_out, k_in, k_out, positions, cu_seqlens, seq_starts, q_in_stride, q_out_stride, k_in_stride, k_out_stride, tokens, q_heads, k_heads, head_dim, batch, starts_stride, use_leak_freq, block_table, context_lens, v_in, v_out, page_size, max_pages, num_pages, gather_rows, mrope, mrope_h, mrope_w, mrope_stride, norm, norm_eps, q_norm_w, k_norm_w, q_in_hstride);
    check!(ScoresParams; rope, q, k, out, q_row_stride, k_row_stride, nq, nk, q_heads, kv_heads, head_dim, q_offset, causal, window, sinks, chunk, alibi_total_heads, alibi_head_offset, scale, cap_in, cap_out);
    check!(AttnParams; rope, q, k, v, k_far, out, lse, cu_seqlens_q, cu_seqlens_k, seq_starts, q_row_stride, k_row_stride, v_row_stride, o_row_stride, kf_row_stride, batch, max_seqlen_q, total_q, total_k, q_heads, kv_heads, head_dim, causal, window, sinks, chunk, alibi_total_heads, alibi_head_offset, rotate_k, scale_log2, scale, block_table, context_lens, page_size, max_pages, num_pages, splits, keys_per_split, gather_rows, part_out, part_lse, sink, cap_in, cap_out, gate);
    check!(DecodeParams; rope, q, k_cache, v_cache, block_table, context_lens, out, lse, part_out, part_lse, q_row_stride, o_row_stride, batch, queries, q_heads, kv_heads, head_dim, page_size, max_pages, num_pages, splits, keys_per_split, causal, window, sinks, alibi_total_heads, alibi_head_offset, scale_log2, base_steps, sink, cap_in, cap_out, chunk, gate);
    check!(AppendParams; k, v, k_cache, v_cache, slots, k_row_stride, v_row_stride, tokens, kv_heads, head_dim, num_slots, v_norm_eps, pad_);
    check!(MergeParams; o1, lse1, o2, lse2, out, lse_out, tokens, heads, head_dim, pad_, gate);
    check!(SplitsParams; part_out, part_lse, out, lse, o_row_stride, splits, tokens, heads, head_dim, sink, gate);
    out
}
