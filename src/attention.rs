//! One description of an attention problem, shared by the CPU reference and the GPU
//! launchers so that checked mode and the tests compare like with like (SPEC §1-§5).

use crate::config::RopeSchedule;
use crate::error::{positive, Error, Result};

/// Which components of a head form a rotation pair (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// GPT-NeoX / transformers `rotate_half`: pair i = `(x[i], x[i + r/2])`.
    #[default]
    Half,
    /// GPT-J / Meta LLaMA: pair i = `(x[2i], x[2i+1])`.
    Interleaved,
}

/// The rotation: frequencies, how many components rotate, their layout and the attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    /// Radians per position, length `rotary_dim / 2` (f64: the GPU splits it for exact angles).
    pub inv_freq: Vec<f64>,
    /// Rotated components (even, <= head_dim); the rest pass through unscaled.
    pub rotary_dim: usize,
    /// Pairing of components.
    pub layout: Layout,
    /// Multiplies the rotated components (YaRN / LongRoPE mscale); 1 otherwise.
    pub attention_factor: f64,
}

impl Rotary {
    /// A rotation from an evaluated schedule.
    pub fn from_schedule(s: &RopeSchedule, layout: Layout) -> Self {
        Rotary { inv_freq: s.inv_freq.clone(), rotary_dim: s.rotary_dim, layout, attention_factor: s.attention_factor }
    }

    /// Validate against a head dimension.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > head_dim {
            return Err(Error::RotaryDim { rotary_dim: self.rotary_dim, head_dim });
        }
        if self.inv_freq.len() != self.rotary_dim / 2 {
            return Err(Error::Shape {
                what: "inv_freq",
                expected: format!("[{}]", self.rotary_dim / 2),
                got: format!("[{}]", self.inv_freq.len()),
            });
        }
        for &f in &self.inv_freq {
            if !f.is_finite() || f < 0.0 {
                return Err(Error::Parameter { name: "inv_freq", value: f, reason: "must be finite and >= 0" });
            }
        }
        positive("attention_factor", self.attention_factor)?;
        Ok(())
    }
}

/// Relative-position variants that cannot be done by rotating Q and K once (SPEC §3).
/// `window` is w and `k` the leak divisor of SPEC §3.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Relative {
    /// Plain RoPE: the score sees `rel = i - j`.
    #[default]
    None,
    /// ReRoPE: distances at or past `window` are clamped to `window`.
    ReRope { window: usize },
    /// Leaky ReRoPE: past `window`, distances grow with slope `1/k` (k > 1).
    Leaky { window: usize, k: f64 },
}

/// ALiBi over the query heads. `head_offset` is the global index of the first local head, so a
/// tensor-parallel shard holding heads `offset..offset+Hq` of `total_heads` gets the right slopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alibi {
    /// Heads of the whole model (decides the slope schedule).
    pub total_heads: usize,
    /// Global index of local query head 0.
    pub head_offset: usize,
}

/// Which keys a query sees (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    /// Keys after the query are hidden.
    pub causal: bool,
    /// Sliding window W: keys with `i - j >= W` are hidden (unless they are sinks).
    pub window: Option<usize>,
    /// The first `sinks` positions stay visible through the window and the chunks.
    pub sinks: usize,
    /// Chunked attention C (Llama 4's `attention_chunk_size`): positions fall into chunks
    /// `[kC, (k+1)C)` and a query sees only keys of its own chunk (unless they are sinks), so
    /// each query sees at most C keys, like a window that restarts at every multiple of C
    /// (transformers' `chunked_overlay`: `j // C == i // C`). Combines with the other masks.
    pub chunk: Option<usize>,
}

impl Mask {
    /// Whether key position `j` is visible to query position `i`.
    #[inline]
    pub fn visible(&self, i: i64, j: i64) -> bool {
        if self.causal && j > i {
            return false;
        }
        if j < self.sinks as i64 {
            return true;
        }
        let in_window = self.window.is_none_or(|w| i - j < w as i64);
        let same_chunk = self.chunk.is_none_or(|c| i.div_euclid(c as i64) == j.div_euclid(c as i64));
        in_window && same_chunk
    }
}

/// Llama 4's attention temperature tuning (`attn_temperature_tuning`, arXiv 2501.19399), on its
/// NoPE layers: the query at position `i` is multiplied by
/// `1 + attn_scale · ln(1 + ⌊(i + 1) / floor_scale⌋)`, so its scores sharpen slowly with
/// distance from the start (by 1 + 0.1·ln 2 at 8191 with Llama 4's `floor_scale` 8192 and
/// `attn_scale` 0.1, by 1 + 0.1·ln 129 at 1M). transformers scales Q by it before the product;
/// every kernel here scales Q once, as its tile is staged, so the hot loop is unchanged and a
/// tile whose every query is below `floor_scale - 1` skips it. Positions below 0 (explicit
/// starts) take the factor 1 (transformers' `cache_position` never is).
///
/// Ministral 3 and Mistral 4 (`llama_4_scaling_beta` in their rope dict) scale the query the
/// same way with the floor taken at `i / original_max_position_embeddings`, without Llama 4's
/// `+ 1`: [`QueryTemperature::ministral3`], `offset` 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryTemperature {
    /// Positions per step of the floor (`floor_scale`, 8192 in Llama 4).
    pub floor_scale: usize,
    /// Slope of the logarithm (`attn_scale`, 0.1 in Llama 4).
    pub attn_scale: f64,
    /// Added to the position before the floor: 1 in Llama 4, 0 in Ministral 3 (0 or 1).
    pub offset: u32,
}

impl QueryTemperature {
    /// Llama 4's `attn_temperature_tuning`: `1 + attn_scale·ln(1 + ⌊(i + 1) / floor_scale⌋)`.
    pub fn llama4(floor_scale: usize, attn_scale: f64) -> Self {
        QueryTemperature { floor_scale, attn_scale, offset: 1 }
    }

    /// Ministral 3's and Mistral 4's `get_llama_4_attn_scale`:
    /// `1 + beta·ln(1 + ⌊i / original_max_position_embeddings⌋)`.
    pub fn ministral3(beta: f64, original_max_position_embeddings: usize) -> Self {
        QueryTemperature { floor_scale: original_max_position_embeddings, attn_scale: beta, offset: 0 }
    }

    /// The factor on the query at position `i`.
    pub fn factor(&self, i: i64) -> f64 {
        let steps = if i < 0 { 0 } else { (i + self.offset as i64) / self.floor_scale as i64 };
        1.0 + self.attn_scale * (steps as f64).ln_1p()
    }
}

/// An attention problem: heads, scale, masks and position encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionParams {
    /// Query heads (local to this device).
    pub num_q_heads: usize,
    /// Key/value heads; `num_q_heads` must be a multiple (GQA/MQA).
    pub num_kv_heads: usize,
    /// Components per head.
    pub head_dim: usize,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Masking.
    pub mask: Mask,
    /// RoPE applied to Q and K (from unrotated inputs), if any.
    pub rope: Option<Rotary>,
    /// ReRoPE / Leaky ReRoPE (needs `rope`).
    pub relative: Relative,
    /// ALiBi bias, if any.
    pub alibi: Option<Alibi>,
    /// Learned attention sinks (GPT-OSS's `sinks`), one logit per local query head in the
    /// units of the scaled score: each row's softmax takes `e^logit` into its denominator and
    /// nothing into O, so `O = Σ e^S V / (Σ e^S + e^logit)` and the LSE includes the sink. Not
    /// the StreamingLLM sink *tokens* of [`Mask::sinks`]. The GPU kernels take up to 128 query
    /// heads per launch with sinks; the scores kernel (raw scores, no softmax) ignores them.
    pub sink_logits: Option<Vec<f64>>,
    /// Logit soft-capping (Gemma 2's `attn_logit_softcapping`, Grok's 30): each scaled score
    /// `s = scale·q·k` becomes `cap·tanh(s / cap)`, before ALiBi and the masks (FlashAttention's
    /// order). Every kernel then takes its generic, per-element softmax form.
    pub softcap: Option<f64>,
    /// The per-position query temperature, if any (Llama 4's NoPE layers, Ministral 3's and
    /// Mistral 4's every layer; applies with or without `rope`).
    pub query_temperature: Option<QueryTemperature>,
}

impl AttentionParams {
    /// Causal attention without position encoding.
    pub fn new(num_q_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttentionParams {
            num_q_heads,
            num_kv_heads,
            head_dim,
            scale: None,
            mask: Mask { causal: true, window: None, sinks: 0, chunk: None },
            rope: None,
            relative: Relative::None,
            alibi: None,
            sink_logits: None,
            softcap: None,
            query_temperature: None,
        }
    }

    /// The scale in use.
    pub fn softmax_scale(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// The largest `|factor|` the query temperature applies at positions up to `max_pos` (1
    /// without one): what tolerances scale `max |q|` by. The factor is monotone in the position
    /// and 1 below `floor_scale - 1`, so the bound is at `max_pos`.
    pub fn query_scale_bound(&self, max_pos: i64) -> f64 {
        self.query_temperature.map_or(1.0, |t| t.factor(max_pos).abs().max(1.0))
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }

    /// Validate everything that does not depend on tensor sizes.
    pub fn validate(&self) -> Result<()> {
        if self.head_dim == 0 {
            return Err(Error::Shape { what: "head_dim", expected: "> 0".into(), got: "0".into() });
        }
        if self.num_kv_heads == 0 || self.num_q_heads == 0 || !self.num_q_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::GqaRatio { num_q_heads: self.num_q_heads, num_kv_heads: self.num_kv_heads });
        }
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::Parameter { name: "scale", value: s, reason: "must be finite" });
            }
        }
        if let Some(r) = &self.rope {
            r.validate(self.head_dim)?;
        }
        match self.relative {
            Relative::None => {}
            Relative::ReRope { window } | Relative::Leaky { window, .. } => {
                if self.rope.is_none() {
                    return Err(Error::Parameter { name: "relative", value: window as f64, reason: "ReRoPE needs a rope schedule" });
                }
                if window == 0 {
                    return Err(Error::Parameter { name: "rerope window", value: 0.0, reason: "must be >= 1" });
                }
            }
        }
        if let Relative::Leaky { k, .. } = self.relative {
            if !(k.is_finite() && k > 1.0) {
                return Err(Error::Parameter { name: "leaky k", value: k, reason: "must be finite and > 1" });
            }
        }
        if let Some(w) = self.mask.window {
            if w == 0 {
                return Err(Error::Parameter { name: "window", value: 0.0, reason: "must be >= 1" });
            }
        }
        if self.mask.chunk == Some(0) {
            return Err(Error::Parameter { name: "chunk", value: 0.0, reason: "must be >= 1" });
        }
        if let Some(c) = self.softcap {
            // The kernels take scale / cap and cap as f32.
            if !(c.is_finite() && c > 0.0 && c < f32::MAX as f64 && (self.softmax_scale() / c).is_normal()) {
                return Err(Error::Parameter { name: "softcap", value: c, reason: "must be finite and > 0" });
            }
        }
        if let Some(t) = self.query_temperature {
            // The kernels take floor_scale as an i32 and attn_scale as an f32.
            if t.floor_scale == 0 || t.floor_scale > i32::MAX as usize {
                return Err(Error::Parameter { name: "floor_scale", value: t.floor_scale as f64, reason: "must be in 1..=i32::MAX" });
            }
            if !(t.attn_scale.is_finite() && t.attn_scale.abs() < f32::MAX as f64) {
                return Err(Error::Parameter { name: "attn_scale", value: t.attn_scale, reason: "must be finite" });
            }
            if t.offset > 1 {
                return Err(Error::Parameter { name: "query temperature offset", value: t.offset as f64, reason: "must be 0 or 1" });
            }
        }
        if let Some(s) = &self.sink_logits {
            if s.len() != self.num_q_heads {
                return Err(Error::Shape { what: "sink_logits", expected: format!("[{}] (one per query head)", self.num_q_heads), got: format!("[{}]", s.len()) });
            }
            // Finite in f32 too: the kernels take them as f32.
            if let Some(&v) = s.iter().find(|v| !(v.is_finite() && v.abs() < f32::MAX as f64)) {
                return Err(Error::Parameter { name: "sink_logits", value: v, reason: "must be finite" });
            }
        }
        if let Some(a) = self.alibi {
            if a.total_heads == 0 || a.head_offset + self.num_q_heads > a.total_heads {
                return Err(Error::Shape {
                    what: "alibi heads",
                    expected: format!("head_offset + num_q_heads <= total_heads ({})", a.total_heads),
                    got: format!("{} + {}", a.head_offset, self.num_q_heads),
                });
            }
        }
        Ok(())
    }
}
