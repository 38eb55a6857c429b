//! Checked mode: compare a GPU result with the f64 CPU reference on the same inputs.

use super::dtype::Dtype;
use crate::attention::AttentionParams;
use crate::error::{Error, Result};

/// A per-element bound `|gpu - reference| <= abs + rel·|reference|`, derived from the dtype's
/// rounding and the magnitudes of the inputs (`max |x|` of each tensor), so that it is tight
/// enough to catch a wrong rotation or mask, and loose enough never to flag rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part: a few f32 ulps, for values far from 1 (ALiBi-biased scores, LSE).
    pub rel: f64,
}

/// f32 carries 24 bits: four ulps of relative slack for results computed in f32.
const F32_REL: f64 = 4.0 * 5.960464477539063e-8;

impl Tolerance {
    /// RoPE: the output is rounded once more to T (`eps_T/2` relative), and the f32 angle is off
    /// by < 1.6e-6 rad (tests/angle_precision.rs): `(eps_T + 1e-5)·max|x|`.
    pub fn rope<T: Dtype>(xmax: f64) -> Self {
        Tolerance { abs: (T::EPS + 1e-5) * xmax.max(f64::MIN_POSITIVE), rel: 0.0 }
    }

    /// Scores `scale·q'·k' + bias`: rotated Q and K are rounded to T before the f32-accumulated
    /// product (each product off by ~eps_T relative, adding up like a random walk over d terms,
    /// bounded here with a factor 4 of room), plus the f32 angle error over the d terms. A
    /// soft-capped score (tanh' <= 1 shrinks those errors) adds the kernels' tanh error,
    /// cap·4e-7 (kernels/common.cuh, tanh_abs), doubled for room. With Llama 4's query
    /// temperature, `qmax` is of the scaled queries ([`AttentionParams::query_scale_bound`]):
    /// their one more rounding to T fits the factor 4.
    pub fn scores<T: Dtype>(p: &AttentionParams, qmax: f64, kmax: f64) -> Self {
        let d = p.head_dim as f64;
        let af = p.rope.as_ref().map_or(1.0, |r| r.attention_factor.max(1.0));
        let qk = p.softmax_scale().abs() * af * af * qmax * kmax;
        let cap = p.softcap.map_or(0.0, |c| c * 8e-7);
        Tolerance { abs: qk * (4.0 * T::EPS * d.sqrt() + 2e-6 * d) + cap + 1e-6, rel: F32_REL }
    }

    /// Attention output and LSE. A score error δ moves softmax weights by ~δ relative, so O moves
    /// by up to 2δ·max|v|; P is rounded to T for the second product (eps_T·max|v|). The LSE moves
    /// by at most δ. Returns (output tolerance, LSE tolerance).
    pub fn attention<T: Dtype>(p: &AttentionParams, qmax: f64, kmax: f64, vmax: f64) -> (Self, Self) {
        let s = Self::scores::<T>(p, qmax, kmax);
        (Tolerance { abs: (2.0 * s.abs + T::EPS) * vmax + 1e-6, rel: F32_REL }, s)
    }

    /// This tolerance times `k` (results that went through k roundings, e.g. merged halves).
    pub fn times(self, k: f64) -> Self {
        Tolerance { abs: self.abs * k, rel: self.rel * k }
    }

    fn allows(&self, err: f64, reference: f64) -> bool {
        err <= self.abs + self.rel * reference.abs()
    }
}

/// `max |x|` of a slice (0 for an empty one), the magnitude tolerances scale with.
pub fn max_abs(x: &[f64]) -> f64 {
    x.iter().filter(|v| v.is_finite()).fold(0.0, |m, v| m.max(v.abs()))
}

/// The last query position of a paged batch's first `batch` sequences (their queries end at
/// their context's last key), for [`AttentionParams::query_scale_bound`].
pub(crate) fn last_context_position(context_lens: &[i32], batch: usize) -> i64 {
    context_lens.iter().take(batch).map(|&c| c as i64 - 1).max().unwrap_or(0)
}

/// What checked mode measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    /// What was compared.
    pub what: &'static str,
    /// Elements compared.
    pub count: usize,
    /// Largest `|gpu - reference|`.
    pub max_abs: f64,
    /// Largest `|gpu - reference| / |reference|` over elements with `|reference| > 1e-3`.
    pub max_rel: f64,
    /// Elements outside the tolerance.
    pub failures: usize,
    /// The tolerance applied.
    pub tolerance: Tolerance,
}

impl CheckReport {
    /// Compare element by element; infinities must match exactly (masked scores, empty LSE rows),
    /// and a NaN anywhere fails.
    pub fn compare(what: &'static str, gpu: &[f64], reference: &[f64], tolerance: Tolerance) -> Self {
        assert_eq!(gpu.len(), reference.len(), "{what}: lengths differ");
        let (mut max_abs, mut max_rel, mut failures) = (0.0f64, 0.0f64, 0);
        for (&g, &r) in gpu.iter().zip(reference) {
            let err = if r.is_finite() {
                (g - r).abs()
            } else if g == r {
                0.0
            } else {
                f64::INFINITY
            };
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if !tolerance.allows(err, if r.is_finite() { r } else { 0.0 }) {
                failures += 1;
            }
            max_abs = max_abs.max(err);
            if r.is_finite() && r.abs() > 1e-3 {
                max_rel = max_rel.max(err / r.abs());
            }
        }
        CheckReport { what, count: gpu.len(), max_abs, max_rel, failures, tolerance }
    }

    /// Whether every element is within tolerance.
    pub fn passed(&self) -> bool {
        self.failures == 0
    }

    /// `Ok(self)` within tolerance, else [`Error::Mismatch`].
    pub fn ensure(self) -> Result<Self> {
        if self.passed() {
            Ok(self)
        } else {
            Err(Error::Mismatch { what: self.what, max_abs: self.max_abs, max_rel: self.max_rel, tolerance: self.tolerance.abs })
        }
    }

    /// Both reports as one (e.g. Q and K, or O and LSE): the worse figures, all failures.
    pub fn worst(self, other: CheckReport) -> CheckReport {
        CheckReport {
            what: self.what,
            count: self.count + other.count,
            max_abs: self.max_abs.max(other.max_abs),
            max_rel: self.max_rel.max(other.max_rel),
            failures: self.failures + other.failures,
            tolerance: self.tolerance,
        }
    }
}

/// Widen device-typed values for comparison.
pub(crate) fn widen<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}
