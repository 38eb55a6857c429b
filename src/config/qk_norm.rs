//! Which QK norm a `config.json` asks for ([`HfQkNorm`], per layer in
//! [`HfLayer::qk_norm`](super::HfLayer::qk_norm)), as transformers' modeling code applies it.

use super::hf::{f64_of, flag, Obj};
use super::layer_shape::gemma3n_or_4;
use crate::error::{Error, Result};
use crate::qk_norm::{eps_is_valid, NormScope, QkNorm};

/// How a checkpoint's norm weights (`self_attn.q_norm.weight`, `k_norm.weight`) become the
/// kernels' f32 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeight {
    /// No weights (Llama 4's `Llama4TextL2Norm`).
    None,
    /// `x̂ · w` (Qwen3's, OLMo 2's, GLM-4-MoE's RMSNorm).
    Plain,
    /// `x̂ · (1 + w)`: the checkpoint stores the offset from one (Gemma 3's, Qwen3-Next's and
    /// Qwen3.5's zero-centred RMSNorm).
    OnePlus,
}

/// A model's QK norm: `x / sqrt(mean(x²) + eps)` over each head (or the whole projection,
/// [`NormScope::Heads`]) times a weight, applied to the *unrotated* Q and K, as the rope kernel
/// does it ([`QkNorm`]; Llama 4 normalises after its rotation, which is the same, since a
/// rotation keeps each vector's length).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfQkNorm {
    /// `rms_norm_eps` (the config class's default when absent).
    pub eps: f64,
    /// What one mean covers.
    pub scope: NormScope,
    /// How the checkpoint's weights enter.
    pub weight: NormWeight,
}

impl HfQkNorm {
    /// The kernels' weights from a checkpoint's (`q_norm.weight` or `k_norm.weight`, as f32):
    /// `None` for a norm without weights, `1 + w` for [`NormWeight::OnePlus`] (rounded to f32
    /// once, as transformers' `1.0 + weight.float()`).
    pub fn weights(&self, checkpoint: &[f32]) -> Option<Vec<f32>> {
        match self.weight {
            NormWeight::None => None,
            NormWeight::Plain => Some(checkpoint.to_vec()),
            NormWeight::OnePlus => Some(checkpoint.iter().map(|&w| (1.0 + w as f64) as f32).collect()),
        }
    }

    /// The launch's [`QkNorm`] with these (kernel) weights; `None` ones are all ones.
    pub fn with<W>(&self, q_weight: Option<W>, k_weight: Option<W>) -> QkNorm<W> {
        QkNorm { eps: self.eps, scope: self.scope, q_weight, k_weight }
    }
}

/// The QK norm of a (text) config root, by model type, or `None` for a model without one.
/// `use_qk_norm` switches Llama 4's (on by default) and GLM-4-MoE's (off by default); the
/// others always have it; Cohere's (Command R+, `use_qk_norm`, off by default) is a LayerNorm of
/// each head with weights per head ([`NormScope::HeadCentred`]). Chameleon's is a LayerNorm
/// with a bias, which these kernels do not compute: its configs are refused rather than run
/// without it.
pub(super) fn qk_norm_of(root: &Obj, model_type: &str) -> Result<Option<HfQkNorm>> {
    use NormScope::{Head, HeadCentred, Heads};
    use NormWeight::{None as Unweighted, OnePlus, Plain};
    let (scope, weight, default_eps, on) = match model_type {
        t if t.starts_with("llama4") => (Head, Unweighted, 1e-5, flag(root, "use_qk_norm")?.unwrap_or(true)),
        "qwen3" | "qwen3_moe" | "qwen3_vl" | "qwen3_vl_text" | "qwen3_vl_moe" | "qwen3_vl_moe_text" => (Head, Plain, 1e-6, true),
        "glm4_moe" => (Head, Plain, 1e-5, flag(root, "use_qk_norm")?.unwrap_or(false)),
        "gemma3" | "gemma3_text" | "qwen3_next" | "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text" => (Head, OnePlus, 1e-6, true),
        "olmo2" | "olmo3" | "olmoe" => (Heads, Plain, 1e-5, true),
        t if gemma3n_or_4(t) => (Head, Plain, 1e-6, true),
        // Their config calls the eps `norm_eps` (LFM3 maps `rms_norm_eps` onto it).
        "lfm2" | "lfm2_moe" | "lfm2_vl" | "lfm3" | "lfm3_vl" => (Head, Plain, 1e-5, true),
        // Command R+'s LayerNorm of each head, its own weights per head (`layer_norm_eps`).
        "cohere" => (HeadCentred, Plain, 1e-5, flag(root, "use_qk_norm")?.unwrap_or(false)),
        "chameleon" if flag(root, "use_qk_norm")? == Some(true) => {
            return Err(Error::InvalidValue {
                key: "use_qk_norm".into(),
                reason: format!("{model_type:?}'s QK norm is a LayerNorm with a bias, which these kernels do not compute"),
            })
        }
        _ => return Ok(None),
    };
    if !on {
        return Ok(None);
    }
    let eps = eps_of(root, model_type, default_eps)?;
    Ok(Some(HfQkNorm { eps, scope, weight }))
}

/// The norm's eps: `rms_norm_eps`, LFM's `norm_eps`, Cohere's `layer_norm_eps`, else the
/// class's default.
fn eps_of(root: &Obj, model_type: &str, default_eps: f64) -> Result<f64> {
    let key = match model_type {
        "cohere" => "layer_norm_eps",
        t if t.starts_with("lfm") && !root.contains_key("rms_norm_eps") => "norm_eps",
        _ => "rms_norm_eps",
    };
    let eps = f64_of(root, key)?.unwrap_or(default_eps);
    if !eps_is_valid(eps) {
        return Err(Error::InvalidValue { key: key.into(), reason: format!("must be finite and > 0 (in f32 too), got {eps}") });
    }
    Ok(eps)
}

/// The norm of V, for the model types that have one: Gemma 3n's and Gemma 4's `v_norm`, an RMS
/// norm of each head without weights.
pub(super) fn v_norm_of(root: &Obj, model_type: &str) -> Result<Option<HfQkNorm>> {
    if !gemma3n_or_4(model_type) {
        return Ok(None);
    }
    Ok(Some(HfQkNorm { eps: eps_of(root, model_type, 1e-6)?, scope: NormScope::Head, weight: NormWeight::None }))
}
