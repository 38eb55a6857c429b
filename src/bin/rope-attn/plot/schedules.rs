//! Which curves the decay chart shows: one model under the context-extension schedules, or
//! several models each under its own.

use super::decay_chart::{Curve, DecayChart, Marker};
use crate::load::Model;
use rope_attn::{RopeConfig, RopeScaling, RopeSchedule};

/// The original context length a comparison extends: the config's own, else 8192.
fn original_length(cfg: &RopeConfig) -> usize {
    match &cfg.scaling {
        RopeScaling::Yarn { original_max_position_embeddings: o, .. }
        | RopeScaling::Llama3 { original_max_position_embeddings: o, .. }
        | RopeScaling::LongRope { original_max_position_embeddings: o, .. } => *o,
        RopeScaling::Dynamic { max_position_embeddings: o, .. } => *o,
        _ => cfg.max_position_embeddings.unwrap_or(8192),
    }
}

fn same(a: &RopeSchedule, b: &RopeSchedule) -> bool {
    a.inv_freq.len() == b.inv_freq.len()
        && a.inv_freq.iter().zip(&b.inv_freq).all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs().max(y.abs()))
}

/// The context-extension factor a config uses, if its schedule has one.
fn config_factor(cfg: &RopeConfig) -> Option<f64> {
    match &cfg.scaling {
        RopeScaling::Default => None,
        RopeScaling::Proportional { factor, .. } => (*factor != 1.0).then_some(*factor),
        RopeScaling::Linear { factor }
        | RopeScaling::Ntk { factor }
        | RopeScaling::Dynamic { factor, .. }
        | RopeScaling::Yarn { factor, .. }
        | RopeScaling::Llama3 { factor, .. }
        | RopeScaling::LongRope { factor, .. } => Some(*factor),
    }
}

/// `m`'s base and dimensions under default / linear / NTK / YaRN / Llama 3.1 with one factor
/// (given, else the config's own, else 8) and one original length (given, else the config's).
pub fn comparison(
    m: &Model,
    factor: Option<f64>,
    original_max: Option<usize>,
    points: usize,
    max_distance: f64,
) -> Result<DecayChart, String> {
    let c = &m.config;
    let factor = factor.or_else(|| config_factor(c)).unwrap_or(8.0);
    let orig = original_max.unwrap_or_else(|| original_length(c));
    let yarn = RopeScaling::yarn(factor, orig);
    let llama3 = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: orig,
    };
    let variants = [
        ("default (plain RoPE)".to_string(), RopeScaling::Default),
        (format!("linear ×{factor} (position interpolation)"), RopeScaling::Linear { factor }),
        (format!("NTK-aware ×{factor}"), RopeScaling::Ntk { factor }),
        (format!("YaRN ×{factor} (β 32/1)"), yarn),
        (format!("Llama 3.1 ×{factor} (low 1, high 4)"), llama3),
    ];
    let mut curves = Vec::new();
    for (label, scaling) in variants {
        let cfg = RopeConfig::with_scaling(c.theta, c.head_dim, c.rotary_dim, c.max_position_embeddings, scaling)
            .map_err(|e| format!("comparison schedule `{label}`: {e}"))?;
        let schedule = cfg.schedule(None).map_err(|e| format!("comparison schedule `{label}`: {e}"))?;
        curves.push(Curve { label, schedule });
    }
    if c.scaling != RopeScaling::Default {
        match curves.iter_mut().find(|k| same(&k.schedule, &m.schedule)) {
            Some(k) => k.label.push_str("  = this config"),
            None => curves.push(Curve {
                label: format!("this config as configured ({})", m.schedule.rope_type),
                schedule: m.schedule.clone(),
            }),
        }
    }
    let extended = orig as f64 * factor;
    let mut markers = vec![Marker { at: orig as f64, label: format!("original context {orig}") }];
    if extended <= max_distance {
        markers.push(Marker { at: extended, label: format!("extended context {extended} (×{factor})") });
    }
    Ok(DecayChart {
        title: format!("RoPE long-range decay of {} under context-extension schedules", m.name),
        subtitle: format!(
            "θ = {}, head_dim {}, rotary_dim {}; factor {factor}, original context {orig}; mean of cos(rel·θ_i) over the {} rotary pairs (attention factors not applied)",
            c.theta,
            c.head_dim,
            c.rotary_dim,
            c.rotary_dim / 2
        ),
        curves,
        markers,
        points,
        max_distance,
    })
}

/// Several models, each under its own schedule.
pub fn side_by_side(models: &[Model], points: usize, max_distance: f64) -> DecayChart {
    let curves = models
        .iter()
        .map(|m| Curve {
            label: format!(
                "{} ({}, θ = {}, r = {})",
                m.name, m.schedule.rope_type, m.config.theta, m.config.rotary_dim
            ),
            schedule: m.schedule.clone(),
        })
        .collect();
    DecayChart {
        title: format!("RoPE long-range decay of {} configs", models.len()),
        subtitle:
            "each config's own schedule; mean of cos(rel·θ_i) over its rotary pairs (attention factors not applied)"
                .into(),
        curves,
        markers: Vec::new(),
        points,
        max_distance,
    }
}
