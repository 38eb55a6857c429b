//! The heatmap figures: RoPE, ALiBi and both, for one model and one window.

use super::heatmap::{Heatmaps, Panel};
use super::score_matrix::score_matrix;
use crate::load::Model;
use rope_attn::{alibi, Alibi, AttentionParams, Layout, Rotary};

/// `0 .. window` when it fits the grid, else `grid` evenly spaced positions from 0 to window-1.
pub fn positions(window: usize, grid: usize) -> Vec<i64> {
    if window <= grid {
        return (0..window as i64).collect();
    }
    (0..grid).map(|k| ((k * (window - 1)) as f64 / (grid - 1) as f64).round() as i64).collect()
}

/// `2^-8 = 0.0039`
fn fmt_slope(s: f64) -> String {
    let e = s.log2();
    let pow = if (e - e.round()).abs() < 1e-9 { format!("{}", e.round()) } else { format!("{e:.2}") };
    format!("2^{pow} = {s:.4}")
}

/// Three panels for `m` over `window` tokens; ALiBi uses head `head` of `heads`.
pub fn heatmaps(m: &Model, window: usize, grid: usize, (heads, head): (usize, usize)) -> Result<Heatmaps, String> {
    let pos = positions(window, grid);
    let n = pos.len();
    let rope = Rotary::from_schedule(&m.schedule, Layout::Half);
    let bias = Alibi { total_heads: heads, head_offset: head };
    let base = AttentionParams::new(1, 1, m.config.head_dim);
    let with = |rope: Option<Rotary>, alibi: Option<Alibi>| AttentionParams { rope, alibi, ..base.clone() };
    let slope = alibi::slope(heads, head);
    let panels = vec![
        Panel {
            caption: format!("RoPE ({})", m.schedule.rope_type),
            values: score_matrix(&with(Some(rope.clone()), None), &pos, &pos)?,
        },
        Panel {
            caption: format!("ALiBi (slope {})", fmt_slope(slope)),
            values: score_matrix(&with(None, Some(bias)), &pos, &pos)?,
        },
        Panel { caption: "RoPE + ALiBi".into(), values: score_matrix(&with(Some(rope), Some(bias)), &pos, &pos)? },
    ];
    let sampling = if n == window {
        format!("all {n}×{n} positions")
    } else {
        format!("{n}×{n} positions sampled every ~{:.0} tokens", (window - 1) as f64 / (n - 1) as f64)
    };
    Ok(Heatmaps {
        title: format!("{}: position-only attention scores over {window} tokens", m.name),
        subtitle: format!(
            "S[i,j] = q'·k'/√d − slope·(i−j) for all-ones q, k; head_dim {}, rotary_dim {}, θ = {}, attention factor {:.4}; causal (grey = masked); {sampling}",
            m.config.head_dim, m.config.rotary_dim, m.config.theta, m.schedule.attention_factor
        ),
        window,
        n,
        panels,
    })
}

#[cfg(test)]
mod tests {
    use super::positions;

    #[test]
    fn sampled_positions_span_the_window() {
        assert_eq!(positions(100, 200).len(), 100);
        let p = positions(10_000, 200);
        assert_eq!((p.len(), p[0], p[199]), (200, 0, 9999));
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }
}
