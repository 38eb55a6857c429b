//! Full attention with output and log-sum-exp (SPEC §5): the twin of the prefill and decode kernels.

use super::check_len;
use super::scores::ScoreContext;
use crate::attention::AttentionParams;
use crate::error::Result;

/// Attention output `[Nq, Hq, d]` and natural-log LSE `[Hq, Nq]` (`-inf` for fully masked rows,
/// whose output is 0; with learned sinks such a row's LSE is its head's sink logit).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOutput {
    /// `[Nq, Hq, d]`.
    pub out: Vec<f64>,
    /// `[Hq, Nq]`.
    pub lse: Vec<f64>,
}

/// Softmax attention of Q `[Nq, Hq, d]` over K, V `[Nk, Hkv, d]`, queries at `q_pos`, keys at `k_pos`.
///
/// ```
/// use rope_attn::{reference, AttentionParams};
/// let p = AttentionParams::new(1, 1, 2);
/// let (q, k, v) = (vec![1.0, 0.0], vec![1.0, 0.0, 0.0, 1.0], vec![1.0, 2.0, 3.0, 4.0]);
/// let o = reference::attention(&q, &k, &v, &[1], &[0, 1], &p).unwrap();
/// let w = (1.0f64 / 2f64.sqrt()).exp();            // key 0 scores 1/sqrt(2), key 1 scores 0
/// assert!((o.out[0] - (w * 1.0 + 3.0) / (w + 1.0)).abs() < 1e-15);
/// assert!((o.lse[0] - (w + 1.0).ln()).abs() < 1e-15);
/// ```
pub fn attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    q_pos: &[i64],
    k_pos: &[i64],
    p: &AttentionParams,
) -> Result<AttentionOutput> {
    let ctx = ScoreContext::new(p, q, k, q_pos, k_pos)?;
    check_len("v", v.len(), k.len())?;
    let (nq, d, hq, hkv) = (q_pos.len(), p.head_dim, p.num_q_heads, p.num_kv_heads);
    let mut out = vec![0.0; nq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * nq];
    let mut row: Vec<Option<f64>> = Vec::with_capacity(k_pos.len());
    for h in 0..hq {
        let kvh = h / p.group_size();
        for (qi, &i) in q_pos.iter().enumerate() {
            row.clear();
            row.extend(k_pos.iter().enumerate().map(|(kj, &j)| ctx.score(h, qi, i, kj, j)));
            // A learned sink joins the denominator with no value (SinkArgs in kernels/params.cuh).
            let sink = p.sink_logits.as_ref().map(|s| s[h]);
            let Some(max) = row.iter().flatten().copied().chain(sink).reduce(f64::max) else { continue };
            let sum: f64 = row.iter().flatten().chain(sink.iter()).map(|s| (s - max).exp()).sum();
            lse[h * nq + qi] = max + sum.ln();
            let o = &mut out[(qi * hq + h) * d..(qi * hq + h + 1) * d];
            for (kj, s) in row.iter().enumerate() {
                let Some(s) = s else { continue };
                let w = (s - max).exp() / sum;
                let vs = (kj * hkv + kvh) * d;
                for (oc, vc) in o.iter_mut().zip(&v[vs..vs + d]) {
                    *oc += w * vc;
                }
            }
        }
    }
    Ok(AttentionOutput { out, lse })
}

/// Attention over a packed variable-length batch, the twin of `attention_fwd`: sequence b owns
/// query rows `cu_q[b]..cu_q[b+1]` of Q `[total_q, Hq, d]` and key rows `cu_k[b]..cu_k[b+1]` of
/// K, V `[total_k, Hkv, d]`; its query m sits at position `seqlen_k - seqlen_q + m` and key j at
/// j (bottom-right aligned). Output `[total_q, Hq, d]`, LSE `[Hq, total_q]`.
pub fn attention_varlen(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu_q: &[usize],
    cu_k: &[usize],
    p: &AttentionParams,
) -> Result<AttentionOutput> {
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    if cu_q.len() != cu_k.len() || cu_q.is_empty() {
        return Err(crate::Error::Shape {
            what: "cu_seqlens",
            expected: "q and k offsets of equal, non-zero length".into(),
            got: format!("{} and {}", cu_q.len(), cu_k.len()),
        });
    }
    let (tq, tk) = (cu_q[cu_q.len() - 1], cu_k[cu_k.len() - 1]);
    check_len("q", q.len(), tq * hq * d)?;
    check_len("k", k.len(), tk * hkv * d)?;
    let mut out = AttentionOutput { out: vec![0.0; tq * hq * d], lse: vec![f64::NEG_INFINITY; hq * tq] };
    for b in 0..cu_q.len() - 1 {
        let (q0, q1, k0, k1) = (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]);
        if q1 < q0 || k1 < k0 || q1 > tq || k1 > tk {
            return Err(crate::Error::Shape { what: "cu_seqlens", expected: "non-decreasing offsets".into(), got: format!("sequence {b}") });
        }
        let (nq, nk) = (q1 - q0, k1 - k0);
        let q_pos: Vec<i64> = (0..nq as i64).map(|m| nk as i64 - nq as i64 + m).collect();
        let k_pos: Vec<i64> = (0..nk as i64).collect();
        let r = attention(&q[q0 * hq * d..q1 * hq * d], &k[k0 * hkv * d..k1 * hkv * d], &v[k0 * hkv * d..k1 * hkv * d], &q_pos, &k_pos, p)?;
        out.out[q0 * hq * d..q1 * hq * d].copy_from_slice(&r.out);
        for h in 0..hq {
            out.lse[h * tq + q0..h * tq + q1].copy_from_slice(&r.lse[h * nq..(h + 1) * nq]);
        }
    }
    Ok(out)
}
