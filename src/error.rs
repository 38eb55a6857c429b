//! One error type for the whole crate: every bad input is refused with a variant that names
//! what was wrong *before* anything is launched on a device.

use std::fmt;

/// Everything that can go wrong in rope-attn. Each variant's doc says what its fields hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// `config.json` is not valid JSON, or not a JSON object.
    Json(String),
    /// A required key is absent from the config (the key's name).
    MissingKey(&'static str),
    /// A key is present but its value is unusable (`key`, why).
    InvalidValue { key: String, reason: String },
    /// `rope_type` / `type` names a schedule we do not know.
    UnknownRopeType(String),
    /// A per-layer-type `rope_parameters` config was given without naming the layer type,
    /// or with a name it does not hold (`available` lists the names it does hold).
    LayerType { requested: Option<String>, available: Vec<String> },
    /// A tensor or parameter has the wrong shape (what, expected, got).
    Shape { what: &'static str, expected: String, got: String },
    /// head_dim the kernels were not instantiated for.
    UnsupportedHeadDim { head_dim: usize, supported: &'static [usize] },
    /// The rotary dimension is odd, zero, or larger than the head dimension.
    RotaryDim { rotary_dim: usize, head_dim: usize },
    /// Hq is not a multiple of Hkv.
    GqaRatio { num_q_heads: usize, num_kv_heads: usize },
    /// A position is out of the range the kernels accept (what, value, limit).
    Position { what: &'static str, value: i64, limit: i64 },
    /// A scalar parameter is NaN, infinite, or outside its domain (name, value).
    Parameter { name: &'static str, value: f64, reason: &'static str },
    /// A device buffer is too small for the problem described.
    BufferTooSmall { what: &'static str, needed: usize, got: usize },
    /// A row stride is smaller than the row or otherwise inconsistent.
    Stride { what: &'static str, stride: usize, min: usize },
    /// The dtype of one tensor differs from the others.
    DtypeMismatch { expected: &'static str, got: &'static str },
    /// No CUDA driver / device is available.
    NoDevice(String),
    /// A CUDA driver call failed.
    Cuda(String),
    /// The SIMT emulator refused a launch or stopped a kernel that misbehaved (feature `emulator`).
    Emulator(String),
    /// Tensors that must share a device do not (what, expected, got).
    Device { what: &'static str, expected: String, got: String },
    /// An operation inside candle failed (feature `candle`).
    Candle(String),
    /// Checked mode: the GPU result differs from the CPU reference beyond tolerance.
    Mismatch { what: &'static str, max_abs: f64, max_rel: f64, tolerance: f64 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Json(e) => write!(f, "config.json does not parse: {e}"),
            Error::MissingKey(k) => write!(f, "config is missing the required key `{k}`"),
            Error::InvalidValue { key, reason } => write!(f, "config key `{key}`: {reason}"),
            Error::UnknownRopeType(t) => write!(
                f,
                "unknown rope_type `{t}` (known: default, linear, dynamic, ntk, yarn, llama3, longrope, su)"
            ),
            Error::LayerType { requested: None, available } => write!(
                f,
                "`rope_parameters` is keyed by layer type; name one of {available:?}"
            ),
            Error::LayerType { requested: Some(r), available } => write!(
                f,
                "`rope_parameters` has no layer type `{r}`; it has {available:?}"
            ),
            Error::Shape { what, expected, got } => {
                write!(f, "{what}: expected shape {expected}, got {got}")
            }
            Error::UnsupportedHeadDim { head_dim, supported } => {
                write!(f, "head_dim {head_dim} is not supported (supported: {supported:?})")
            }
            Error::RotaryDim { rotary_dim, head_dim } => write!(
                f,
                "rotary_dim {rotary_dim} must be even, positive and <= head_dim {head_dim}"
            ),
            Error::GqaRatio { num_q_heads, num_kv_heads } => write!(
                f,
                "num_q_heads {num_q_heads} is not a positive multiple of num_kv_heads {num_kv_heads}"
            ),
            Error::Position { what, value, limit } => {
                write!(f, "{what} = {value} is out of range (0 ..= {limit})")
            }
            Error::Parameter { name, value, reason } => write!(f, "{name} = {value}: {reason}"),
            Error::BufferTooSmall { what, needed, got } => {
                write!(f, "{what}: buffer holds {got} elements, the problem needs {needed}")
            }
            Error::Stride { what, stride, min } => {
                write!(f, "{what}: stride {stride} is smaller than the minimum {min}")
            }
            Error::DtypeMismatch { expected, got } => {
                write!(f, "dtype mismatch: expected {expected}, got {got}")
            }
            Error::NoDevice(why) => write!(f, "no CUDA device: {why}"),
            Error::Cuda(e) => write!(f, "CUDA error: {e}"),
            Error::Emulator(e) => write!(f, "SIMT emulator: {e}"),
            Error::Device { what, expected, got } => write!(f, "{what}: expected {expected}, got {got}"),
            Error::Candle(e) => write!(f, "candle: {e}"),
            Error::Mismatch { what, max_abs, max_rel, tolerance } => write!(
                f,
                "{what}: GPU result differs from the CPU reference (max abs {max_abs:.3e}, max rel {max_rel:.3e}, tolerance {tolerance:.1e})"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Crate-wide result.
pub type Result<T> = std::result::Result<T, Error>;

/// A finite, strictly positive f64 or a [`Error::Parameter`] naming it.
pub(crate) fn positive(name: &'static str, value: f64) -> Result<f64> {
    if !value.is_finite() {
        return Err(Error::Parameter { name, value, reason: "must be finite" });
    }
    if value <= 0.0 {
        return Err(Error::Parameter { name, value, reason: "must be > 0" });
    }
    Ok(value)
}
