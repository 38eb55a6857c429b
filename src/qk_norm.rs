//! The QK norm: each query and key vector over its root mean square, times a learned weight,
//! before the rotation (Qwen3, Gemma 3, OLMo 2; Llama 4's unweighted L2 norm, whose
//! rotate-then-normalise is the same thing, since a rotation keeps every pair's length), or
//! Cohere's LayerNorm of each head ([`NormScope::HeadCentred`]).
//!
//! The rope kernel applies it as it rotates (`cuda::rope_inplace_normed`, and before M-RoPE
//! `cuda::rope_inplace_mrope_normed`: one read and one write of Q and K), or alone
//! (`cuda::qk_norm_inplace`: for the unrotated KV cache, where the attention kernels rotate). Its f64 twin is [`reference::qk_norm_row`](crate::reference::qk_norm_row).
//! [`HfQkNorm`](crate::config::HfQkNorm) reads which norm a `config.json` asks for.

use crate::error::{Error, Result};

/// Most heads (query and key together) one QK-norm launch takes (`RA_MAX_NORM_HEADS`,
/// kernels/rope.cu: a per-head sum in shared memory).
pub const MAX_NORM_HEADS: usize = 256;

/// An eps the kernels can add: finite and > 0 in f64 and once rounded to f32 (the config
/// parser and every launcher ask the same).
pub(crate) fn eps_is_valid(eps: f64) -> bool {
    let e32 = eps as f32;
    eps.is_finite() && e32 > 0.0 && e32.is_finite()
}

/// Which components share one root mean square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormScope {
    /// Each head vector alone (Qwen3, Gemma 3, Llama 4): weights of `head_dim` components,
    /// the same for every head.
    #[default]
    Head,
    /// All of a token's query heads together, and all its key heads together: the norm of the
    /// whole projection before it is split into heads (OLMo 2, OLMoE). Weights of
    /// `heads · head_dim`. Every head of the tensor must be in the one launch (a tensor-parallel
    /// shard of the heads would need the other shards' sums).
    Heads,
    /// Each head alone, as a LayerNorm: centred on its mean first, `(x − mean) / sqrt(mean((x −
    /// mean)²) + eps) · w`, with weights of `heads · head_dim`, one vector per head (Cohere's
    /// `CohereLayerNorm` of Command R+). The kernels take the mean and then the deviations'
    /// squares in two passes over the head, as transformers does.
    HeadCentred,
}

impl NormScope {
    /// Components one weight vector covers for a tensor of `heads` heads.
    pub fn weight_len(self, heads: usize, head_dim: usize) -> usize {
        match self {
            NormScope::Head => head_dim,
            NormScope::Heads | NormScope::HeadCentred => heads * head_dim,
        }
    }
}

/// One launch's QK norm: `x ← x / sqrt(mean(x²) + eps) · w`, the mean over the [`NormScope`],
/// `w` the tensor's weight (all ones when `None`). The weights are f32 as the kernels read
/// them: for Gemma's `(1 + weight)` form pass `1 + weight`
/// ([`HfQkNorm::weights`](crate::config::HfQkNorm::weights) does it). `W` is how the weights
/// are held: `&[f32]` on the host (the emulator, the reference), a device buffer for `cuda`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QkNorm<W> {
    /// Added to the mean square (`rms_norm_eps`); finite and > 0, also in f32.
    pub eps: f64,
    /// What one mean covers.
    pub scope: NormScope,
    /// Q's weights, or `None` for ones.
    pub q_weight: Option<W>,
    /// K's weights, or `None` for ones.
    pub k_weight: Option<W>,
}

impl<W> QkNorm<W> {
    /// A norm without weights (Llama 4's `Llama4TextL2Norm`).
    pub fn unweighted(eps: f64, scope: NormScope) -> Self {
        QkNorm { eps, scope, q_weight: None, k_weight: None }
    }

    /// The same norm with its weights held another way (`f` maps each).
    pub fn map<'a, V>(&'a self, f: impl Fn(&'a W) -> V) -> QkNorm<V> {
        QkNorm { eps: self.eps, scope: self.scope, q_weight: self.q_weight.as_ref().map(&f), k_weight: self.k_weight.as_ref().map(&f) }
    }

    /// Validate against a launch of `q_heads` and `k_heads` heads (weights' lengths by `len`),
    /// as every launcher does before it launches.
    pub fn validate(&self, q_heads: usize, k_heads: usize, head_dim: usize, len: impl Fn(&W) -> usize) -> Result<()> {
        if !eps_is_valid(self.eps) {
            return Err(Error::Parameter { name: "qk_norm eps", value: self.eps, reason: "must be finite and > 0 (in f32 too)" });
        }
        if q_heads + k_heads > MAX_NORM_HEADS {
            return Err(Error::Shape {
                what: "qk_norm heads",
                expected: format!("at most {MAX_NORM_HEADS} query and key heads per launch"),
                got: (q_heads + k_heads).to_string(),
            });
        }
        for (what, w, heads) in [("qk_norm q_weight", &self.q_weight, q_heads), ("qk_norm k_weight", &self.k_weight, k_heads)] {
            let want = self.scope.weight_len(heads, head_dim);
            match w.as_ref().map(&len) {
                Some(got) if heads > 0 && got != want => {
                    return Err(Error::Shape { what, expected: format!("{want} weights ({:?} scope)", self.scope), got: got.to_string() })
                }
                _ => {}
            }
        }
        Ok(())
    }
}
