//! The additive sinusoidal table of the original Transformer (SPEC §6).

/// `PE[m, 2i] = sin(m / 10000^(2i/d))`, `PE[m, 2i+1] = cos(..)`, row-major `[positions, d]`.
pub fn sinusoidal(positions: usize, d: usize) -> Vec<f64> {
    let mut pe = vec![0.0; positions * d];
    for m in 0..positions {
        for c in 0..d {
            let i2 = (c - c % 2) as f64;
            let angle = m as f64 / 10000f64.powf(i2 / d as f64);
            pe[m * d + c] = if c % 2 == 0 { angle.sin() } else { angle.cos() };
        }
    }
    pe
}
