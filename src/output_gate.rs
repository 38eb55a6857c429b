//! The output gate: attention's result multiplied by `sigmoid(g)` before `o_proj`, where the
//! projection produced `g` beside the query. Qwen3-Next and Qwen3.5 gate every component
//! (`q_proj` emits each head's `head_dim` query components and then its `head_dim` gates);
//! LFM3 gates whole heads (`g_proj`, one gate per head).
//!
//! The attention kernels apply it as they write O (`cuda::attention_fwd_gated`,
//! `attention_decode_gated`, `attention_fwd_paged_gated`; with split keys, the combine does;
//! `merge_states_gated` on a cascade's last merge),
//! so the gate costs no pass over O of its own. The LSE they return stays the attention's own,
//! ungated. Its f64 twin is [`reference::output_gate`](crate::reference::output_gate).

use crate::error::{Error, Result};

/// Where the gate of output row `t`, head `h`, component `c` lies in the gate buffer: element
/// `t · row_stride + h · head_stride + c` ([`per_head`](Self::per_head) false), or
/// `t · row_stride + h · head_stride` for the whole head (true). Output row `t` is query row `t` of a prefill
/// (`cu_seqlens_q`'s numbering) and row `b · queries + i` of a decode. The gate has O's dtype
/// and must not overlap O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputGate {
    /// Elements from one row's gates to the next.
    pub row_stride: usize,
    /// Elements from one head's gates to the next.
    pub head_stride: usize,
    /// One gate per head (LFM3) instead of one per component (Qwen3-Next).
    pub per_head: bool,
}

impl OutputGate {
    /// Qwen3-Next's and Qwen3.5's gate where `q_proj` left it: each head's `2 · head_dim` slice
    /// holds the query and then the gate. Pass the projection's buffer from element `head_dim`
    /// on (the first head's first gate).
    pub fn after_query(num_q_heads: usize, head_dim: usize) -> Self {
        OutputGate { row_stride: 2 * num_q_heads * head_dim, head_stride: 2 * head_dim, per_head: false }
    }

    /// A dense `[tokens, heads, head_dim]` gate, one per component.
    pub fn dense(num_q_heads: usize, head_dim: usize) -> Self {
        OutputGate { row_stride: num_q_heads * head_dim, head_stride: head_dim, per_head: false }
    }

    /// LFM3's `g_proj` output, `[tokens, heads]`: one gate per head.
    pub fn per_head(num_q_heads: usize) -> Self {
        OutputGate { row_stride: num_q_heads, head_stride: 1, per_head: true }
    }

    /// Index of the gate of row `t`, head `h`, component `c`.
    pub fn index(&self, t: usize, h: usize, c: usize) -> usize {
        t * self.row_stride + h * self.head_stride + if self.per_head { 0 } else { c }
    }

    /// Elements a buffer needs for `rows` rows of `heads` heads of `head_dim` (the last gate's
    /// index plus one; 0 without rows), or an error if that overflows.
    pub fn needed(&self, rows: usize, heads: usize, head_dim: usize) -> Result<usize> {
        if rows == 0 || heads == 0 || head_dim == 0 {
            return Ok(0);
        }
        let last_c = if self.per_head { 0 } else { head_dim - 1 };
        (rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (heads - 1).checked_mul(self.head_stride).and_then(|h| r.checked_add(h)))
            .and_then(|x| x.checked_add(last_c + 1))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or(Error::Shape { what: "output gate", expected: "strides whose last index fits an i64".into(), got: format!("{self:?} over {rows} rows") })
    }

    /// A typed error unless a gate buffer of `len` elements covers `rows` output rows.
    pub fn check(&self, len: usize, rows: usize, heads: usize, head_dim: usize) -> Result<()> {
        let needed = self.needed(rows, heads, head_dim)?;
        if len < needed {
            return Err(Error::BufferTooSmall { what: "output gate", needed, got: len });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3-Next's gate sits after each head's query: row t, head h, component c at
    /// `t·2Hd + 2hd + d + c` of `q_proj`'s output, i.e. `index` from element d on; a buffer of
    /// `rows·2Hd − d` elements (the projection from element d on) is exactly long enough.
    #[test]
    fn after_query_addresses_the_gate_half_of_q_proj() {
        let (rows, hq, d) = (3, 4, 8);
        let g = OutputGate::after_query(hq, d);
        for (t, h, c) in [(0, 0, 0), (1, 2, 5), (2, 3, 7)] {
            assert_eq!(d + g.index(t, h, c), t * 2 * hq * d + h * 2 * d + d + c);
        }
        assert_eq!(g.needed(rows, hq, d).unwrap(), rows * 2 * hq * d - d);
        assert!(g.check(rows * 2 * hq * d - d, rows, hq, d).is_ok());
        assert!(matches!(g.check(rows * 2 * hq * d - d - 1, rows, hq, d), Err(Error::BufferTooSmall { .. })));
        let ph = OutputGate::per_head(hq);
        assert_eq!((ph.index(2, 3, 7), ph.needed(rows, hq, d).unwrap()), (11, 12));
        assert_eq!(OutputGate::dense(hq, d).needed(rows, hq, d).unwrap(), rows * hq * d);
        assert_eq!(g.needed(0, hq, d).unwrap(), 0);
        let huge = OutputGate { row_stride: usize::MAX / 2, head_stride: 1, per_head: false };
        assert!(matches!(huge.needed(3, hq, d), Err(Error::Shape { .. })));
    }

    /// The f64 twin: sigmoid's limits exactly, its midpoint, and a short gate refused.
    #[test]
    fn reference_gate_limits() {
        let layout = OutputGate::per_head(3);
        let mut out = vec![2.0; 6];
        crate::reference::output_gate(&mut out, &[f64::INFINITY, f64::NEG_INFINITY, 0.0], &layout, 3, 2).unwrap();
        assert_eq!(out, [2.0, 2.0, 0.0, 0.0, 1.0, 1.0]);
        assert!(crate::reference::output_gate(&mut out, &[0.0; 2], &layout, 3, 2).is_err());
    }
}
