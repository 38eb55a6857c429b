//! The element types kernels take: f32, f16 and bf16 (the `half` crate), accumulated in f32.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

/// An element type with kernels instantiated for it.
pub trait Dtype: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Suffix of the kernel symbols (`rope_half_v2_bf16`, ...).
    const NAME: &'static str;
    /// Unit roundoff of the storage format (2^-24, 2^-11, 2^-8): tolerances scale with it.
    const EPS: f64;
    /// Widen to f64 (exact).
    fn to_f64(self) -> f64;
    /// Round from f64.
    fn from_f64(x: f64) -> Self;
}

impl Dtype for f32 {
    const NAME: &'static str = "f32";
    const EPS: f64 = 5.960464477539063e-8;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Dtype for f16 {
    const NAME: &'static str = "f16";
    const EPS: f64 = 4.8828125e-4;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}

impl Dtype for bf16 {
    const NAME: &'static str = "bf16";
    const EPS: f64 = 3.90625e-3;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}
