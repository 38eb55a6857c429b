//! Checked mode: compare a GPU result with the f64 CPU reference on the same inputs.

use super::dtype::Dtype;
use crate::error::{Error, Result};

/// A tolerance on `|gpu - reference|`, normalised by `max(1, max |reference|)` so that it reads
/// as "relative to the data's scale" for large values and absolute for small ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance(pub f64);

impl Tolerance {
    /// RoPE: the output is the input rounded once more to T, plus the f32 angle error (< 1.6e-6
    /// rad by construction, ~4e-7 measured: tests/angle_precision.rs): `max(1e-5, 2 eps_T)`.
    pub fn rope<T: Dtype>() -> Self {
        Tolerance(f64::max(1e-5, 2.0 * T::EPS))
    }

    /// Scores: rotated Q and K are rounded to T before the f32-accumulated dot product, each
    /// product carrying ~2 eps_T of relative error that adds up like a random walk over
    /// `head_dim` terms; with room for the f32 angles: `4 eps_T sqrt(d) + 2e-5`.
    pub fn scores<T: Dtype>(head_dim: usize) -> Self {
        Tolerance(4.0 * T::EPS * (head_dim as f64).sqrt() + 2e-5)
    }

    /// Attention output and LSE: score error propagates through exp, and P and V are rounded
    /// to T for the second product: the score tolerance plus `4 eps_T`.
    pub fn attention<T: Dtype>(head_dim: usize) -> Self {
        Tolerance(Self::scores::<T>(head_dim).0 + 4.0 * T::EPS)
    }
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
    /// Largest `|gpu - reference| / max(1, max |reference|)`, the figure judged against the tolerance.
    pub max_scaled: f64,
    /// The tolerance applied.
    pub tolerance: Tolerance,
}

impl CheckReport {
    /// Compare element by element; infinities must match exactly (masked scores, empty LSE rows).
    pub fn compare(what: &'static str, gpu: &[f64], reference: &[f64], tolerance: Tolerance) -> Self {
        assert_eq!(gpu.len(), reference.len(), "{what}: lengths differ");
        let scale = reference.iter().filter(|r| r.is_finite()).fold(1.0f64, |m, r| m.max(r.abs()));
        let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
        for (&g, &r) in gpu.iter().zip(reference) {
            let err = if r.is_finite() {
                (g - r).abs()
            } else if g == r {
                0.0
            } else {
                f64::INFINITY
            };
            let err = if err.is_nan() { f64::INFINITY } else { err };
            max_abs = max_abs.max(err);
            if r.abs() > 1e-3 && r.is_finite() {
                max_rel = max_rel.max(err / r.abs());
            }
        }
        CheckReport { what, count: gpu.len(), max_abs, max_rel, max_scaled: max_abs / scale, tolerance }
    }

    /// Whether the error is within tolerance.
    pub fn passed(&self) -> bool {
        self.max_scaled <= self.tolerance.0
    }

    /// `Ok(self)` within tolerance, else [`Error::Mismatch`].
    pub fn ensure(self) -> Result<Self> {
        if self.passed() {
            Ok(self)
        } else {
            Err(Error::Mismatch { what: self.what, max_abs: self.max_abs, max_rel: self.max_rel, tolerance: self.tolerance.0 })
        }
    }

    /// Merge two reports (e.g. Q and K) into the worse of both.
    pub fn worst(self, other: CheckReport) -> CheckReport {
        CheckReport {
            what: self.what,
            count: self.count + other.count,
            max_abs: self.max_abs.max(other.max_abs),
            max_rel: self.max_rel.max(other.max_rel),
            max_scaled: self.max_scaled.max(other.max_scaled),
            tolerance: self.tolerance,
        }
    }
}

/// Widen device-typed values for comparison.
pub(crate) fn widen<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}
