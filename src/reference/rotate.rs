//! RoPE rotation of head vectors (SPEC §1), the twin of `kernels/rope.cu`.

use super::check_len;
use crate::attention::{Layout, Rotary};
use crate::config::MRope;
use crate::error::{Error, Result};

/// The indices of rotation pair `i` for a rotary dimension `r`.
#[inline]
pub(crate) fn pair(layout: Layout, r: usize, i: usize) -> (usize, usize) {
    match layout {
        Layout::Half => (i, i + r / 2),
        Layout::Interleaved => (2 * i, 2 * i + 1),
    }
}

/// Rotate one head vector in place to position `pos` (fractional positions are allowed: Leaky
/// ReRoPE uses them) and multiply the rotated components by the attention factor.
/// The angle `pos * inv_freq` is formed in f64, whose 53 bits keep the fraction of a turn
/// exact to ~1e-9 rad even at positions beyond 2^24 (SPEC "Precision").
pub fn rotate_head(x: &mut [f64], pos: f64, rot: &Rotary) {
    rotate_head_pairs(x, rot, |_| pos);
}

/// Rotate one head vector with multimodal RoPE: pair `i` to `pos[m.component(i)]` of the
/// token's (time, height, width) positions.
pub fn rotate_head_mrope(x: &mut [f64], pos: [f64; 3], rot: &Rotary, m: &MRope) {
    rotate_head_pairs(x, rot, |i| pos[m.component(i)]);
}

/// Pair `i` rotated to `pos(i)`.
fn rotate_head_pairs(x: &mut [f64], rot: &Rotary, pos: impl Fn(usize) -> f64) {
    let r = rot.rotary_dim;
    for (i, &f) in rot.inv_freq.iter().enumerate() {
        let (a, b) = pair(rot.layout, r, i);
        let (s, c) = (pos(i) * f).sin_cos();
        let (x0, x1) = (x[a], x[b]);
        x[a] = (x0 * c - x1 * s) * rot.attention_factor;
        x[b] = (x0 * s + x1 * c) * rot.attention_factor;
    }
}

/// Rotate `tokens` rows of `heads` head vectors each, in place. Row `t` starts at
/// `t * row_stride` (so a packed QKV projection can be rotated where it lies) and is rotated
/// to `positions[t]`.
pub fn rotate(
    x: &mut [f64],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    row_stride: usize,
    positions: &[i64],
    rot: &Rotary,
) -> Result<()> {
    check_rows(x.len(), tokens, heads, head_dim, row_stride, rot)?;
    check_len("positions", positions.len(), tokens)?;
    check_positions(positions)?;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let start = t * row_stride + h * head_dim;
            rotate_head(&mut x[start..start + head_dim], p as f64, rot);
        }
    }
    Ok(())
}

/// [`rotate`] with multimodal RoPE: token `t` has positions `positions[t] = [time, height, width]`.
#[allow(clippy::too_many_arguments)]
pub fn rotate_mrope(
    x: &mut [f64],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    row_stride: usize,
    positions: &[[i64; 3]],
    rot: &Rotary,
    m: &MRope,
) -> Result<()> {
    check_rows(x.len(), tokens, heads, head_dim, row_stride, rot)?;
    m.validate(rot.rotary_dim / 2)?;
    check_len("positions", positions.len(), tokens)?;
    check_positions(positions.as_flattened())?;
    for (t, p) in positions.iter().enumerate() {
        for h in 0..heads {
            let start = t * row_stride + h * head_dim;
            rotate_head_mrope(&mut x[start..start + head_dim], p.map(|v| v as f64), rot, m);
        }
    }
    Ok(())
}

fn check_rows(len: usize, tokens: usize, heads: usize, head_dim: usize, row_stride: usize, rot: &Rotary) -> Result<()> {
    rot.validate(head_dim)?;
    if row_stride < heads * head_dim {
        return Err(Error::Stride { what: "row_stride", stride: row_stride, min: heads * head_dim });
    }
    if tokens > 0 {
        let needed = (tokens - 1) * row_stride + heads * head_dim;
        if len < needed {
            return Err(Error::BufferTooSmall { what: "x", needed, got: len });
        }
    }
    Ok(())
}

fn check_positions(positions: &[i64]) -> Result<()> {
    match positions.iter().find(|&&p| p < 0) {
        Some(&p) => Err(Error::Position { what: "position", value: p, limit: i64::MAX }),
        None => Ok(()),
    }
}
