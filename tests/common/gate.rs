//! Output-gate test helpers shared by the emulated and GPU suites (emu_output_gate.rs,
//! gpu_output_gate.rs): gates in both layouts, and the gated result against the ungated one.

use super::{as_dtype, uniform};
use rope_attn::cuda::Dtype;
use rope_attn::OutputGate;

/// The two gate layouts over `rows` output rows: Qwen3-Next's (a whole `q_proj` output, gates
/// from element `d` on) and LFM3's `[rows, heads]`, with gates uniform in [-4, 4) and, for the
/// per-head gate, row 0's head 0 at +inf and row 1's head 1 at -inf.
pub fn gates<T: Dtype>(r: &mut rand::rngs::StdRng, rows: usize, hq: usize, d: usize) -> Vec<(&'static str, OutputGate, Vec<T>, usize)> {
    let qproj: Vec<f64> = uniform(r, rows * hq * 2 * d).iter().map(|x| 4.0 * x).collect();
    let mut per_head: Vec<f64> = uniform(r, rows * hq).iter().map(|x| 4.0 * x).collect();
    per_head[0] = f64::INFINITY;
    per_head[hq + 1] = f64::NEG_INFINITY;
    vec![
        ("after_query", OutputGate::after_query(hq, d), as_dtype::<T>(&qproj).0, d),
        ("per_head", OutputGate::per_head(hq), as_dtype::<T>(&per_head).0, 0),
    ]
}

/// A gated call's (O, LSE) against the same call ungated: the LSE equal to the bit (the gate
/// leaves it alone); O within two roundings of T (and f32's gate arithmetic) of
/// `ungated · sigmoid(g)`, exactly equal at g = +inf, exactly 0 at g = -inf; and the gate moved
/// more than 90 % of the elements (a gate that did nothing fails).
#[allow(clippy::too_many_arguments)]
pub fn check_gated<T: Dtype>(what: &str, (gated, lse): (&[T], &[f32]), (ungated, lse_u): (&[T], &[f32]), gate: &[T], layout: &OutputGate, hq: usize, d: usize) {
    assert!(lse.iter().zip(lse_u).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: the LSE is the ungated call's");
    let mut moved = 0;
    for (e, (g, u)) in gated.iter().zip(ungated).enumerate() {
        let (t, h, c) = (e / (hq * d), e / d % hq, e % d);
        let (g, u, x) = (g.to_f64(), u.to_f64(), gate[layout.index(t, h, c)].to_f64());
        if x == f64::INFINITY {
            assert_eq!(g, u, "{what}: element {e}, gate +inf");
        } else if x == f64::NEG_INFINITY {
            assert_eq!(g, 0.0, "{what}: element {e}, gate -inf");
        } else {
            let want = u / (1.0 + (-x).exp());
            let tol = (2.0 * T::EPS + 1e-6) * u.abs() + 1e-7;
            assert!((g - want).abs() <= tol, "{what}: element {e} is {g}, want {want} (ungated {u}, gate {x})");
        }
        moved += (g != u) as usize;
    }
    assert!(moved > gated.len() * 9 / 10, "{what}: the gate moved {moved} of {} elements", gated.len());
}
