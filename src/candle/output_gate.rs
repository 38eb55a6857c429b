//! The output gate on candle tensors (Qwen3-Next, Qwen3.5, LFM3): the attention ops with
//! `O · sigmoid(gate)` written as O is, by the kernels on CUDA ([`crate::cuda::attention_fwd_gated`]
//! and its paged and decode twins), by [`reference::output_gate`](crate::reference::output_gate)
//! on the f64 result on the CPU (then rounded once).
//!
//! The gate tensor is `[tokens, Hq, d]` with unit stride along d, one gate per component (rows
//! and heads at any stride, so Qwen3-Next's gates are read where `q_proj` left them:
//! `q_proj_out.reshape((t, hq, 2 * d))?.narrow(2, d, d)?`), or `[tokens, Hq, 1]` / `[tokens, Hq]`,
//! one per head (LFM3's `g_proj`). Its dtype is Q's. On CUDA a gate that shares its storage with
//! Q, K or V (a view of the same projection) is copied first: candle holds those storages'
//! locks during the op, and a second lock on one of them from the same thread may deadlock.

use super::{dims_str, same_device, same_dtype};
use crate::attention::AttentionParams;
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use candle_core::Tensor;

/// A validated gate tensor: where its gates lie in its storage (`strided`, from the layout's
/// offset) and in a contiguous copy of it (`packed`).
pub(super) struct Gate<'a> {
    pub tensor: &'a Tensor,
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub strided: OutputGate,
    pub packed: OutputGate,
}

/// `gate` checked against Q and the call's output rows.
pub(super) fn gate_of<'a>(gate: &'a Tensor, q: &Tensor, tokens: usize, p: &AttentionParams) -> Result<Gate<'a>> {
    same_dtype(q, gate)?;
    same_device(q, "gate", gate)?;
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let st = gate.layout().stride();
    match *gate.dims() {
        [t, h, c] if t == tokens && h == hq && c == d && st[2] == 1 => {
            Ok(Gate { tensor: gate, strided: OutputGate { row_stride: st[0], head_stride: st[1], per_head: false }, packed: OutputGate::dense(hq, d) })
        }
        [t, h, 1] | [t, h] if t == tokens && h == hq => {
            Ok(Gate { tensor: gate, strided: OutputGate { row_stride: st[0], head_stride: st[1], per_head: true }, packed: OutputGate::per_head(hq) })
        }
        _ => Err(Error::Shape {
            what: "gate",
            expected: format!("[{tokens}, {hq}, {d}] with unit stride along d, or [{tokens}, {hq}, 1] / [{tokens}, {hq}] (one per head)"),
            got: format!("{} with strides {st:?}", dims_str(gate)),
        }),
    }
}

/// [`attention_prefill`](super::attention_prefill) with the output gate fused (module docs):
/// returns `O · sigmoid(gate)` `[total_q, Hq, d]` and the attention's own (ungated) LSE.
pub fn attention_prefill_gated(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: &Tensor,
    p: &AttentionParams,
    seqlens_q: &[usize],
    seqlens_k: &[usize],
) -> Result<(Tensor, Tensor)> {
    super::prefill(q, k, v, Some(gate), p, seqlens_q, seqlens_k)
}

/// [`attention_decode`](super::attention_decode) with the output gate fused: gate row
/// `b · queries + i` for output row `b · queries + i`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_gated(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: &Tensor,
    max_context: usize,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    super::decode(q, k_cache, v_cache, block_table, context_lens, Some(gate), max_context, p)
}

/// [`attention_prefill_paged`](super::attention_prefill_paged) with the output gate fused.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill_paged_gated(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: &Tensor,
    seqlens_q: &[usize],
    total_context: Option<usize>,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    super::prefill_paged(q, k_cache, v_cache, block_table, context_lens, Some(gate), seqlens_q, total_context, p)
}

