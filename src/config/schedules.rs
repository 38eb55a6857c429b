//! The arithmetic of each rope type, written in the same order of operations as
//! `transformers.modeling_rope_utils` so that f64 results agree to the last few ulps.

use super::{RopeConfig, RopeScaling};
use crate::error::{positive, Error, Result};
use std::f64::consts::PI;

fn invalid(key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidValue { key: key.to_string(), reason: reason.into() }
}

fn positive_len(key: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(invalid(key, "must be > 0"));
    }
    Ok(())
}

pub(super) fn validate(cfg: &RopeConfig) -> Result<()> {
    let half = cfg.rotary_dim / 2;
    match &cfg.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } | RopeScaling::Ntk { factor } => {
            positive("factor", *factor)?;
        }
        RopeScaling::Dynamic { factor, max_position_embeddings } => {
            positive("factor", *factor)?;
            positive_len("max_position_embeddings", *max_position_embeddings)?;
            if cfg.rotary_dim <= 2 {
                return Err(invalid("partial_rotary_factor", "dynamic NTK needs a rotary dim > 2"));
            }
        }
        RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, .. } => {
            positive("factor", *factor)?;
            positive_len("original_max_position_embeddings", *original_max_position_embeddings)?;
            positive("beta_fast", *beta_fast)?;
            positive("beta_slow", *beta_slow)?;
            for (k, v) in [("mscale", mscale), ("mscale_all_dim", mscale_all_dim)] {
                if let Some(v) = v {
                    if !v.is_finite() {
                        return Err(Error::Parameter { name: k, value: *v, reason: "must be finite" });
                    }
                }
            }
            if let Some(a) = attention_factor {
                positive("attention_factor", *a)?;
            }
        }
        RopeScaling::Proportional { factor, rotated_pairs } => {
            positive("factor", *factor)?;
            if cfg.rotary_dim != cfg.head_dim {
                return Err(Error::RotaryDim { rotary_dim: cfg.rotary_dim, head_dim: cfg.head_dim });
            }
            if *rotated_pairs > half {
                return Err(invalid("partial_rotary_factor", format!("{rotated_pairs} rotated pairs, rotary_dim/2 = {half}")));
            }
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            positive("factor", *factor)?;
            positive("low_freq_factor", *low_freq_factor)?;
            positive("high_freq_factor", *high_freq_factor)?;
            positive_len("original_max_position_embeddings", *original_max_position_embeddings)?;
            if high_freq_factor <= low_freq_factor {
                return Err(invalid("high_freq_factor", "must be greater than low_freq_factor"));
            }
        }
        RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, factor, attention_factor } => {
            for (key, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() != half {
                    return Err(invalid(key, format!("has {} entries, rotary_dim/2 = {half}", list.len())));
                }
                if let Some(bad) = list.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                    return Err(invalid(key, format!("entry {bad} is not a finite positive number")));
                }
            }
            positive_len("original_max_position_embeddings", *original_max_position_embeddings)?;
            positive("factor", *factor)?;
            if let Some(a) = attention_factor {
                positive("attention_factor", *a)?;
            }
        }
    }
    Ok(())
}

/// `1 / base^(2i/r)` for i in 0..r/2 — transformers' `arange(0, dim, 2) / dim` exponent.
fn base_inv_freq(base: f64, r: usize) -> Vec<f64> {
    (0..r / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / r as f64)).collect()
}

/// YaRN's `get_mscale`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

pub(super) fn compute(cfg: &RopeConfig, seq_len: Option<usize>) -> (Vec<f64>, f64) {
    let (base, r) = (cfg.theta, cfg.rotary_dim);
    match &cfg.scaling {
        RopeScaling::Default => (base_inv_freq(base, r), 1.0),
        RopeScaling::Linear { factor } => {
            (base_inv_freq(base, r).into_iter().map(|f| f / factor).collect(), 1.0)
        }
        RopeScaling::Proportional { factor, rotated_pairs } => {
            // transformers: the rotated pairs' `1 / base^(2i/head_dim)`, zeros after, all `/= factor`.
            let inv = base_inv_freq(base, r).into_iter().enumerate().map(|(i, f)| if i < *rotated_pairs { f / factor } else { 0.0 }).collect();
            (inv, 1.0)
        }
        RopeScaling::Ntk { factor } => {
            let b = base * factor.powf(r as f64 / (r as f64 - 2.0));
            (base_inv_freq(b, r), 1.0)
        }
        RopeScaling::Dynamic { factor, max_position_embeddings } => {
            let mpe = *max_position_embeddings as f64;
            let len = seq_len.map_or(mpe, |s| (s as f64).max(mpe));
            let b = base * ((factor * len / mpe) - (factor - 1.0)).powf(r as f64 / (r as f64 - 2.0));
            (base_inv_freq(b, r), 1.0)
        }
        RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate } => {
            let factor = *factor;
            let af = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                // transformers tests `if mscale and mscale_all_dim`: zero counts as absent.
                (Some(m), Some(md)) if *m != 0.0 && *md != 0.0 => yarn_mscale(factor, *m) / yarn_mscale(factor, *md),
                _ => yarn_mscale(factor, 1.0),
            });
            let dim = r as f64;
            let orig = *original_max_position_embeddings as f64;
            let corr = |rot: f64| (dim * (orig / (rot * 2.0 * PI)).ln()) / (2.0 * base.ln());
            let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim - 1.0);
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            let inv = (0..r / 2)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f64 / dim);
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (factor * pos_freq);
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extra = 1.0 - ramp;
                    interpolation * (1.0 - extra) + extrapolation * extra
                })
                .collect();
            (inv, af)
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let inv = base_inv_freq(base, r)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers' `~(wavelen < high) & ~(wavelen > low)`, negations kept as written.
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let s = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - s) * scaled / factor + s * scaled
                    } else {
                        scaled
                    }
                })
                .collect();
            (inv, 1.0)
        }
        RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, factor, attention_factor } => {
            let orig = *original_max_position_embeddings;
            let af = attention_factor.unwrap_or_else(|| {
                if *factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
                }
            });
            let ext = match seq_len {
                Some(s) if s > orig => long_factor,
                _ => short_factor,
            };
            let inv = ext
                .iter()
                .enumerate()
                .map(|(i, e)| 1.0 / (e * base.powf((2 * i) as f64 / r as f64)))
                .collect();
            (inv, af)
        }
    }
}
