//! Combining partial attention results over disjoint key sets: the twin of `kernels/merge.cu`.

use super::check_len;
use crate::error::Result;

/// Merge `(o1, lse1)` and `(o2, lse2)` (outputs `[N, H, d]`, LSE `[H, N]`) into the result over
/// the union of their keys: weights `exp(lse_i - lse)` with `lse = log(e^lse1 + e^lse2)`.
/// A side with `lse = -inf` contributes nothing; both `-inf` gives O = 0, lse = -inf.
pub fn merge(
    o1: &[f64],
    lse1: &[f64],
    o2: &[f64],
    lse2: &[f64],
    heads: usize,
    head_dim: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_len("o2", o2.len(), o1.len())?;
    check_len("lse2", lse2.len(), lse1.len())?;
    let n = lse1.len() / heads.max(1);
    check_len("o1", o1.len(), n * heads * head_dim)?;
    let mut out = vec![0.0; o1.len()];
    let mut lse = vec![f64::NEG_INFINITY; lse1.len()];
    for h in 0..heads {
        for t in 0..n {
            let (a, b) = (lse1[h * n + t], lse2[h * n + t]);
            let m = a.max(b);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let l = m + ((a - m).exp() + (b - m).exp()).ln();
            lse[h * n + t] = l;
            let (wa, wb) = ((a - l).exp(), (b - l).exp());
            let s = (t * heads + h) * head_dim;
            for c in s..s + head_dim {
                out[c] = wa * o1[c] + wb * o2[c];
            }
        }
    }
    Ok((out, lse))
}
