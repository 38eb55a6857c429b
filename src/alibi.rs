//! ALiBi slopes exactly as BLOOM computes them (SPEC §4).

/// The slopes for `num_heads` heads: `2^(-8(h+1)/n)` for the largest power of two `n <= H`,
/// then every other slope of the `2n` schedule for the remaining heads.
///
/// ```
/// let s = rope_attn::alibi::slopes(8);
/// assert_eq!(s[0], 0.5);
/// assert_eq!(s[7], 1.0 / 256.0);
/// let s12 = rope_attn::alibi::slopes(12);
/// assert_eq!(s12[8], 2f64.powf(-0.5)); // first head past n = 8: 2^(-4/8)
/// ```
pub fn slopes(num_heads: usize) -> Vec<f64> {
    (0..num_heads).map(|h| slope(num_heads, h)).collect()
}

/// The slope of head `h` (global index) among `num_heads`, without building the whole list.
pub fn slope(num_heads: usize, h: usize) -> f64 {
    assert!(h < num_heads, "head {h} out of {num_heads}");
    let n = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
    let n_f = n as f64;
    if h < n {
        2f64.powf(-8.0 * (h + 1) as f64 / n_f)
    } else {
        2f64.powf(-4.0 * (2 * (h - n) + 1) as f64 / n_f)
    }
}
