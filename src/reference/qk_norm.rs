//! The QK norm's f64 twin (kernels/rope.cu: norm_sums, norm_scale), from its definition.

use crate::error::{Error, Result};
use crate::qk_norm::NormScope;

/// Normalise one token's heads in place: `x` holds them back to back (`heads · head_dim`
/// values), and each head (`NormScope::Head`; `weight` of `head_dim`) or all of them together
/// (`NormScope::Heads`; `weight` of `x.len()`) becomes `x / sqrt(mean(x²) + eps) · weight`;
/// under `NormScope::HeadCentred` each head becomes `(x − mean) / sqrt(mean((x − mean)²) + eps)`
/// times its own weights (`weight` of `x.len()`, head after head)
/// (weight all ones when `None`).
pub fn qk_norm_row(x: &mut [f64], head_dim: usize, eps: f64, scope: NormScope, weight: Option<&[f32]>) -> Result<()> {
    if head_dim == 0 || !x.len().is_multiple_of(head_dim) {
        return Err(Error::Shape { what: "qk_norm row", expected: format!("whole heads of {head_dim}"), got: x.len().to_string() });
    }
    let (span, weight_span) = match scope {
        NormScope::Head => (head_dim, head_dim),
        NormScope::Heads => (x.len().max(1), x.len().max(1)),
        NormScope::HeadCentred => (head_dim, x.len().max(1)),
    };
    if let Some(w) = weight.filter(|w| w.len() != weight_span) {
        return Err(Error::Shape { what: "qk_norm weight", expected: format!("{weight_span} weights"), got: w.len().to_string() });
    }
    for (i, part) in x.chunks_mut(span).enumerate() {
        // The weights of this part: the one vector, or (HeadCentred) this head's.
        let w = weight.map(|w| if scope == NormScope::HeadCentred { &w[i * span..(i + 1) * span] } else { w });
        let centre = if scope == NormScope::HeadCentred { part.iter().sum::<f64>() / span as f64 } else { 0.0 };
        let mean = part.iter().map(|v| (v - centre) * (v - centre)).sum::<f64>() / span as f64;
        let r = 1.0 / (mean + eps).sqrt();
        for (c, v) in part.iter_mut().enumerate() {
            *v = (*v - centre) * r * w.map_or(1.0, |w| w[c] as f64);
        }
    }
    Ok(())
}
