//! RoPE frequency schedules: what a model's `config.json` says, and the inverse frequencies,
//! rotary dimension and attention factor it implies (SPEC §2).
//!
//! [`RopeConfig`] is the parsed, validated description; [`RopeConfig::schedule`] evaluates it
//! for an optional current sequence length (dynamic NTK and LongRoPE depend on it) into a
//! [`RopeSchedule`], the f64 numbers every kernel and the CPU reference consume.

mod hf;
mod layer_shape;
mod layers;
mod model_defaults;
mod rope_dict;
mod mrope;
mod qk_norm;
mod schedules;

pub use layer_shape::LayerHeads;
pub use layers::{hf_layers, HfLayer, LayerAttention};
pub use mrope::MRope;
pub use qk_norm::{HfQkNorm, NormWeight};

use crate::error::{positive, Error, Result};

/// The largest head dimension a config may declare: far above any real model (<= 512), small
/// enough that a schedule can always be allocated.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// A frequency schedule and its parameters, one variant per `rope_type`.
/// Field names are the `config.json` keys they come from (SPEC §2 gives their meaning).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/r)`.
    Default,
    /// Position interpolation: `inv_freq / factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows with the current sequence length.
    Dynamic { factor: f64, max_position_embeddings: usize },
    /// Fixed NTK-aware scaling: `theta * factor^(r/(r-2))`.
    Ntk { factor: f64 },
    /// YaRN (NTK-by-parts with an attention temperature).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
    /// Llama 3.1 wavelength-banded scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// LongRoPE / Phi-3 "su": per-pair rescale factors, short below the original length, long above.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        factor: f64,
        attention_factor: Option<f64>,
    },
    /// Gemma 4's and LFM3's "proportional" RoPE: the pairs span the whole head (`rotary_dim` =
    /// `head_dim`, so a pair's partner sits `head_dim/2` away), the first `rotated_pairs`
    /// (`⌊partial_rotary_factor·head_dim/2⌋`) turn at `theta^(-2i/head_dim) / factor`, and the
    /// rest have frequency 0: they pass through unchanged (cos 0 = 1, sin 0 = 0 exactly). Unlike
    /// a partial rotation, the exponent's denominator stays the whole head.
    Proportional { factor: f64, rotated_pairs: usize },
}

impl RopeScaling {
    /// YaRN with transformers' defaults (beta_fast 32, beta_slow 1, no mscale overrides,
    /// truncated correction range): what a config with only `factor` and
    /// `original_max_position_embeddings` means.
    pub fn yarn(factor: f64, original_max_position_embeddings: usize) -> Self {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        }
    }

    /// The canonical `rope_type` name (as transformers writes it).
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Ntk { .. } => "ntk",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Proportional { .. } => "proportional",
        }
    }
}

/// A validated RoPE description: base, dimensions and schedule.
///
/// ```
/// use rope_attn::RopeConfig;
/// let json = r#"{"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
///   "max_position_embeddings": 131072,
///   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
///                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
/// let cfg = RopeConfig::from_hf_config_json(json).unwrap();
/// let s = cfg.schedule(None).unwrap();
/// assert_eq!(s.rotary_dim, 128);
/// assert_eq!(s.inv_freq.len(), 64);
/// assert_eq!(s.inv_freq[0], 1.0);                       // highest frequency untouched
/// assert!((s.inv_freq[63] * 8.0 - 500000f64.powf(-126.0 / 128.0)).abs() < 1e-18); // lowest / factor
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The RoPE base (`rope_theta`).
    pub theta: f64,
    /// The head dimension the rotation applies to (for DeepSeek: `qk_rope_head_dim`).
    pub head_dim: usize,
    /// Rotated components per head: `floor(head_dim * partial_rotary_factor)`, even.
    pub rotary_dim: usize,
    /// `max_position_embeddings`, when the config gives it.
    pub max_position_embeddings: Option<usize>,
    /// The schedule.
    pub scaling: RopeScaling,
    /// Multimodal RoPE (`mrope_section`): which of a token's three positions each pair takes.
    pub mrope: Option<MRope>,
}

/// The evaluated schedule: what a kernel needs to rotate.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSchedule {
    /// The canonical rope type name.
    pub rope_type: &'static str,
    /// Inverse frequencies, radians per position, length `rotary_dim / 2`.
    pub inv_freq: Vec<f64>,
    /// Rotated components per head.
    pub rotary_dim: usize,
    /// Multiplier applied to rotated Q and K components (YaRN / LongRoPE "mscale").
    pub attention_factor: f64,
    /// The config's multimodal sections, if any ([`MRope`]; the frequencies are the same).
    pub mrope: Option<MRope>,
}

impl RopeConfig {
    /// Plain RoPE with base `theta` over the whole head.
    pub fn new(theta: f64, head_dim: usize) -> Result<Self> {
        Self::with_scaling(theta, head_dim, head_dim, None, RopeScaling::Default)
    }

    /// A fully specified config; validates every field.
    pub fn with_scaling(
        theta: f64,
        head_dim: usize,
        rotary_dim: usize,
        max_position_embeddings: Option<usize>,
        scaling: RopeScaling,
    ) -> Result<Self> {
        let cfg = RopeConfig { theta, head_dim, rotary_dim, max_position_embeddings, scaling, mrope: None };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same config with multimodal sections (validated against the rotary dim).
    pub fn with_mrope(mut self, mrope: MRope) -> Result<Self> {
        self.mrope = Some(mrope);
        self.validate()?;
        Ok(self)
    }

    /// Parse a Hugging Face `config.json` (classic `rope_scaling`, or transformers >= 5
    /// `rope_parameters`). A per-layer-type `rope_parameters` needs
    /// [`from_hf_config_json_layer`](Self::from_hf_config_json_layer).
    pub fn from_hf_config_json(json: &str) -> Result<Self> {
        Self::from_hf_config_json_layer(json, None)
    }

    /// Parse a `config.json`, picking `layer_type` (e.g. `"full_attention"`) when its
    /// `rope_parameters` is keyed by layer type. Ignored for single-schedule configs.
    pub fn from_hf_config_json_layer(json: &str, layer_type: Option<&str>) -> Result<Self> {
        hf::parse(json, layer_type)
    }

    /// The layer types a per-layer `rope_parameters` config holds (empty for the others).
    pub fn hf_layer_types(json: &str) -> Result<Vec<String>> {
        rope_dict::layer_types(json)
    }

    /// Check every invariant; constructors call this, and so may anyone who built the struct by hand.
    pub fn validate(&self) -> Result<()> {
        positive("rope_theta", self.theta)?;
        if self.head_dim == 0 {
            return Err(Error::InvalidValue { key: "head_dim".into(), reason: "must be > 0".into() });
        }
        if self.head_dim > MAX_HEAD_DIM {
            // A corrupt config would otherwise make `schedule` allocate head_dim/2 f64s, and an
            // allocation failure aborts the process.
            return Err(Error::InvalidValue {
                key: "head_dim".into(),
                reason: format!("{} is larger than {MAX_HEAD_DIM}", self.head_dim),
            });
        }
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return Err(Error::RotaryDim { rotary_dim: self.rotary_dim, head_dim: self.head_dim });
        }
        if let Some(m) = &self.mrope {
            m.validate(self.rotary_dim / 2)?;
        }
        schedules::validate(self)
    }

    /// Evaluate the schedule. `seq_len` is the current sequence length: it matters for
    /// `dynamic` (frequencies grow with it) and `longrope` (long factors above the original length).
    pub fn schedule(&self, seq_len: Option<usize>) -> Result<RopeSchedule> {
        self.validate()?;
        let (inv_freq, attention_factor) = schedules::compute(self, seq_len);
        Ok(RopeSchedule { rope_type: self.scaling.name(), inv_freq, rotary_dim: self.rotary_dim, attention_factor, mrope: self.mrope })
    }
}

impl RopeSchedule {
    /// Plain RoPE frequencies `theta^(-2i/r)` (attention factor 1), without going through a config.
    pub fn plain(theta: f64, rotary_dim: usize) -> Result<Self> {
        RopeConfig::new(theta, rotary_dim)?.schedule(None)
    }

    /// RoPE's long-range decay: `sum_i cos(rel * inv_freq[i])` for each relative distance,
    /// the curve users compare schedules by (it is `q·R(rel)k` for all-ones q and k, up to scale).
    pub fn decay(&self, rels: &[f64]) -> Vec<f64> {
        rels.iter().map(|&rel| self.inv_freq.iter().map(|&f| (rel * f).cos()).sum()).collect()
    }
}

/// The relative distances the CLI and plots report decay at: 0, 1, 10, 100, ... up to `max`.
pub fn decay_distances(max: f64) -> Vec<f64> {
    let mut out = vec![0.0];
    let mut r = 1.0;
    while r <= max {
        out.push(r);
        r *= 10.0;
    }
    out
}
