//! Materialized scores `scale * q'·k' + ALiBi bias` (soft-capped first when asked), masked
//! (SPEC §3-§5): the twin of
//! `kernels/scores.cu`, and the inner loop of the attention reference.

use super::check_len;
use super::rotate::rotate_head;
use crate::alibi;
use crate::attention::{AttentionParams, Relative};
use crate::error::Result;

/// Everything the per-pair score needs, prepared once per problem.
pub(crate) struct ScoreContext<'a> {
    p: &'a AttentionParams,
    q: &'a [f64],
    /// Q rotated at its position, K at its (or plain copies without RoPE).
    q_rot: Vec<f64>,
    k_rot: Vec<f64>,
    /// K with the attention factor on its rotary part but unrotated (ReRoPE's far branch).
    k_scaled: Vec<f64>,
    slopes: Vec<f64>,
    scale: f64,
}

impl<'a> ScoreContext<'a> {
    pub(crate) fn new(
        p: &'a AttentionParams,
        q: &'a [f64],
        k: &'a [f64],
        q_pos: &[i64],
        k_pos: &[i64],
    ) -> Result<Self> {
        p.validate()?;
        let d = p.head_dim;
        check_len("q", q.len(), q_pos.len() * p.num_q_heads * d)?;
        check_len("k", k.len(), k_pos.len() * p.num_kv_heads * d)?;
        let (mut q_rot, mut k_rot, mut k_scaled) = (q.to_vec(), k.to_vec(), Vec::new());
        if let Some(rot) = &p.rope {
            for (t, &pos) in q_pos.iter().enumerate() {
                for h in 0..p.num_q_heads {
                    let s = (t * p.num_q_heads + h) * d;
                    rotate_head(&mut q_rot[s..s + d], pos as f64, rot);
                }
            }
            if p.relative != Relative::None {
                k_scaled = k.to_vec();
            }
            for (t, &pos) in k_pos.iter().enumerate() {
                for h in 0..p.num_kv_heads {
                    let s = (t * p.num_kv_heads + h) * d;
                    rotate_head(&mut k_rot[s..s + d], pos as f64, rot);
                    if !k_scaled.is_empty() {
                        rotate_head(&mut k_scaled[s..s + d], 0.0, rot);
                    }
                }
            }
        }
        let slopes = match p.alibi {
            Some(a) => (0..p.num_q_heads).map(|h| alibi::slope(a.total_heads, a.head_offset + h)).collect(),
            None => Vec::new(),
        };
        Ok(ScoreContext { p, q, q_rot, k_rot, k_scaled, slopes, scale: p.softmax_scale() })
    }

    /// The score of query row `qi` (position `i`) of head `h` against key row `kj` (position `j`),
    /// or `None` when the mask hides it.
    pub(crate) fn score(&self, h: usize, qi: usize, i: i64, kj: usize, j: i64) -> Option<f64> {
        let p = self.p;
        if !p.mask.visible(i, j) {
            return None;
        }
        let d = p.head_dim;
        let kvh = h / p.group_size();
        let qs = (qi * p.num_q_heads + h) * d;
        let ks = (kj * p.num_kv_heads + kvh) * d;
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let rel = i - j;
        // ReRoPE by definition: the query rotated by the clamped distance against the unrotated key.
        let far = match p.relative {
            Relative::ReRope { window } if rel >= window as i64 => Some(window as f64),
            Relative::Leaky { window, k } if rel >= window as i64 => {
                Some(window as f64 + (rel - window as i64) as f64 / k)
            }
            _ => None,
        };
        let qk = match (far, &p.rope) {
            (Some(rel_eff), Some(rot)) => {
                let mut qv = self.q[qs..qs + d].to_vec();
                rotate_head(&mut qv, rel_eff, rot);
                dot(&qv, &self.k_scaled[ks..ks + d])
            }
            _ => dot(&self.q_rot[qs..qs + d], &self.k_rot[ks..ks + d]),
        };
        let bias = self.slopes.get(h).map_or(0.0, |s| -s * (rel.unsigned_abs() as f64));
        // Llama 4's temperature scales the query, so the whole product.
        let s = self.scale * p.query_temperature.map_or(1.0, |t| t.factor(i)) * qk;
        // Soft-capping before the bias, as the kernels (and FlashAttention) apply it.
        let s = p.softcap.map_or(s, |cap| cap * (s / cap).tanh());
        Some(s + bias)
    }
}

/// Scores `[Hq, Nq, Nk]` of Q `[Nq, Hq, d]` against K `[Nk, Hkv, d]` at the given positions;
/// masked entries are `-inf`.
pub fn scores(q: &[f64], k: &[f64], q_pos: &[i64], k_pos: &[i64], p: &AttentionParams) -> Result<Vec<f64>> {
    let ctx = ScoreContext::new(p, q, k, q_pos, k_pos)?;
    let (nq, nk) = (q_pos.len(), k_pos.len());
    let mut out = vec![f64::NEG_INFINITY; p.num_q_heads * nq * nk];
    for h in 0..p.num_q_heads {
        for (qi, &i) in q_pos.iter().enumerate() {
            for (kj, &j) in k_pos.iter().enumerate() {
                if let Some(s) = ctx.score(h, qi, i, kj, j) {
                    out[(h * nq + qi) * nk + kj] = s;
                }
            }
        }
    }
    Ok(out)
}
