//! A layer's heads, head size and softmax scale as transformers' attention modules take them
//! from a `config.json`: per-layer overrides (`per_layer_config`, and the Gemma 4 family's
//! `global_head_dim` / `num_global_key_value_heads` that become one on its full layers), and
//! the scale rules that are not `1/sqrt(head_dim)` (Gemma 2 / 3's `query_pre_attn_scalar`,
//! Granite's `attention_multiplier`, Gemma 3n's and Gemma 4's 1 after their QK norm, the MLA
//! models' YaRN `mscale²`). tests/hf_fixtures.rs checks them against the modules themselves.

use super::hf::{bad, f64_of, usize_of, Obj};
use crate::error::{Error, Result};
use serde_json::Value;

/// One layer's query heads, KV heads and head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerHeads {
    /// `num_attention_heads` (all of the model's, before any sharding over devices).
    pub num_q_heads: usize,
    /// `num_key_value_heads` (`num_attention_heads` when absent).
    pub num_kv_heads: usize,
    /// The head size Q, K and V share (`head_dim`, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
}

/// The Gemma 4 family: one head size on the sliding layers, `global_head_dim` on the full ones.
pub(super) fn gemma4_family(model_type: &str) -> bool {
    model_type.starts_with("gemma4") || model_type.starts_with("diffusion_gemma")
}

/// Gemma 3n and the Gemma 4 family, whose attention is alike: QK norms with plain weights that
/// leave the scores unscaled, a V norm, a 512-key window by default.
pub(super) fn gemma3n_or_4(model_type: &str) -> bool {
    gemma4_family(model_type) || model_type.starts_with("gemma3n")
}

/// How a class with `global_head_dim` takes `num_global_key_value_heads` for its full layers.
enum GlobalKv {
    /// Gemma 4: only with `attention_k_eq_v`.
    IfKEqV,
    /// DiffusionGemma: whenever given.
    IfGiven,
    /// EmbeddingGemma 2: 1 when absent.
    DefaultOne,
}

/// The classes whose full layers take `global_head_dim` (512 when absent).
fn global_sizes(model_type: &str) -> Option<GlobalKv> {
    match model_type {
        t if t.starts_with("diffusion_gemma") => Some(GlobalKv::IfGiven),
        t if t.starts_with("embedding_gemma2") => Some(GlobalKv::DefaultOne),
        t if gemma4_family(t) => Some(GlobalKv::IfKEqV),
        _ => None,
    }
}

/// Whether a layer type's head size may differ from the model's `head_dim`.
pub(super) fn sizes_per_layer(root: &Obj, model_type: &str) -> bool {
    root.contains_key("per_layer_config") || global_sizes(model_type).is_some()
}

/// The MLA models (DeepSeek-V2 style), whose scale is `qk_head_dim^-0.5 · mscale²`.
fn mla(model_type: &str) -> bool {
    matches!(
        model_type,
        "deepseek_v2" | "deepseek_v3" | "deepseek_v32" | "kimi_k2" | "mistral4" | "mistral_large4" | "longcat_flash" | "glm4_moe_lite"
            | "glm_moe_dsa" | "youtu" | "minicpm3" | "axk1" | "axk2" | "hy_v4" | "hy_v4_vl" | "bailing_hybrid"
    )
}

/// Each layer's own keys (`head_dim`, `num_key_value_heads`, ...), empty where it takes the
/// model's: `per_layer_config` (keys are layer indices, sometimes zero-padded: `"05"`), else,
/// for the Gemma 4 family and EmbeddingGemma 2, `global_head_dim` (512 when absent) on their
/// full layers and `num_global_key_value_heads` there ([`GlobalKv`]; `k_eq_v`: the config's
/// `attention_k_eq_v`).
pub(super) fn overrides(root: &Obj, model_type: &str, layer_types: &[&str], k_eq_v: bool) -> Result<Vec<Obj>> {
    let mut out = vec![Obj::new(); layer_types.len()];
    match root.get("per_layer_config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(per)) => {
            for (key, v) in per {
                let i: usize = key.parse().map_err(|_| bad("per_layer_config", format!("key {key:?} is not a layer index")))?;
                let slot = out.get_mut(i).ok_or_else(|| bad("per_layer_config", format!("layer {i} of {}", layer_types.len())))?;
                match v {
                    Value::Object(o) => *slot = o.clone(),
                    other => return Err(bad("per_layer_config", format!("layer {i}: expected an object, got {other}"))),
                }
            }
            return Ok(out);
        }
        Some(other) => return Err(bad("per_layer_config", format!("expected an object, got {other}"))),
    }
    if let Some(kv_rule) = global_sizes(model_type) {
        let head_dim = usize_of(root, "global_head_dim")?.unwrap_or(512);
        let given = usize_of(root, "num_global_key_value_heads")?;
        let kv = match kv_rule {
            GlobalKv::IfKEqV => given.filter(|_| k_eq_v),
            GlobalKv::IfGiven => given,
            GlobalKv::DefaultOne => Some(given.unwrap_or(1)),
        };
        for (o, t) in out.iter_mut().zip(layer_types) {
            if *t == "full_attention" {
                o.insert("head_dim".into(), head_dim.into());
                if let Some(kv) = kv {
                    o.insert("num_key_value_heads".into(), kv.into());
                }
            }
        }
    }
    Ok(out)
}

/// `key` of the layer's overrides, else of the config.
fn layer_usize(own: &Obj, root: &Obj, key: &str) -> Result<Option<usize>> {
    Ok(usize_of(own, key)?.or(usize_of(root, key)?))
}

/// The layer's heads; `None` where the config does not give them, or for an MLA model (its
/// queries and keys are wider than its values, which these kernels do not take).
pub(super) fn heads(own: &Obj, root: &Obj, model_type: &str) -> Result<Option<LayerHeads>> {
    if mla(model_type) || root.contains_key("qk_rope_head_dim") {
        return Ok(None);
    }
    let Some(q) = layer_usize(own, root, "num_attention_heads")? else { return Ok(None) };
    if q == 0 {
        return Err(bad("num_attention_heads", "must be > 0"));
    }
    let kv = layer_usize(own, root, "num_key_value_heads")?.unwrap_or(q);
    let head_dim = match layer_usize(own, root, "head_dim")? {
        Some(d) => d,
        None => match usize_of(root, "hidden_size")? {
            Some(h) => h / q,
            None => return Ok(None),
        },
    };
    Ok(Some(LayerHeads { num_q_heads: q, num_kv_heads: kv, head_dim }))
}

/// The number under `key` (`None` when absent or null), an error unless finite and > 0.
fn positive_at(root: &Obj, key: &str) -> Result<Option<f64>> {
    match f64_of(root, key)? {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(bad(key, format!("must be finite and > 0, got {v}"))),
        v => Ok(v),
    }
}

/// The softmax scale where the model's attention does not take `1/sqrt(head_dim)`; `rope` is
/// the effective rope dict (the MLA models' `mscale_all_dim`).
pub(super) fn scale(root: &Obj, model_type: &str, rope: Option<&Obj>) -> Result<Option<f64>> {
    Ok(Some(match model_type {
        // `query_pre_attn_scalar ** -0.5` (Step 3.7's defaults to its head_dim).
        "gemma2" | "gemma3" | "gemma3_text" | "vaultgemma" => positive_at(root, "query_pre_attn_scalar")?.unwrap_or(256.0).powf(-0.5),
        "step3p7" => match positive_at(root, "query_pre_attn_scalar")? {
            Some(v) => v.powf(-0.5),
            None => return Ok(None),
        },
        // Their QK norm (and V norm) leaves the scores unscaled.
        t if gemma3n_or_4(t) => 1.0,
        // `attention_multiplier` (1 when absent, except HyperCLOVA X's head_dim^-0.5).
        "granite" | "granitemoe" | "granitemoeshared" | "granitemoehybrid" | "granite_swa" | "granitemoe_swa" => {
            positive_at(root, "attention_multiplier")?.unwrap_or(1.0)
        }
        "hyperclovax" => match positive_at(root, "attention_multiplier")? {
            Some(v) => v,
            None => return Ok(None),
        },
        t if mla(t) => {
            let nope = usize_of(root, "qk_nope_head_dim")?.ok_or(Error::MissingKey("qk_nope_head_dim"))?;
            let rot = usize_of(root, "qk_rope_head_dim")?.ok_or(Error::MissingKey("qk_rope_head_dim"))?;
            let mut s = ((nope + rot) as f64).powf(-0.5);
            // transformers' `yarn_apply_mscale`: any scaled rope type with a nonzero mscale_all_dim.
            if let Some(r) = rope {
                let scaled = match r.get("rope_type").or(r.get("type")) {
                    None | Some(Value::Null) => false,
                    Some(v) => v.as_str() != Some("default"),
                };
                let all_dim = f64_of(r, "mscale_all_dim")?.unwrap_or(0.0);
                if scaled && all_dim != 0.0 {
                    let factor = f64_of(r, "factor")?.ok_or(Error::MissingKey("factor"))?;
                    let m = if factor <= 1.0 { 1.0 } else { 0.1 * all_dim * factor.ln() + 1.0 };
                    s = s * m * m;
                }
            }
            s
        }
        _ => return Ok(None),
    }))
}

/// Logit soft-capping (`attn_logit_softcapping`: Gemma 2's 50 by default, Gemma 3's off).
pub(super) fn softcap(root: &Obj, model_type: &str) -> Result<Option<f64>> {
    let default = match model_type {
        "gemma2" | "vaultgemma" => Some(50.0),
        "gemma3" | "gemma3_text" => None,
        _ => return Ok(None),
    };
    match root.get("attn_logit_softcapping") {
        Some(Value::Null) => Ok(None),
        None => Ok(default),
        Some(_) => positive_at(root, "attn_logit_softcapping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hf::parse_root;

    fn obj(json: &str) -> Obj {
        parse_root(json).unwrap()
    }

    /// Each scale rule's key read once: present, absent (a default, or no rule), and refused
    /// when not finite and > 0.
    #[test]
    fn scale_keys_present_absent_and_refused() {
        let s = |json: &str, t: &str| scale(&obj(json), t, None);
        assert_eq!(s("{}", "gemma2").unwrap(), Some(256f64.powf(-0.5)));
        assert_eq!(s(r#"{"query_pre_attn_scalar": 64}"#, "step3p7").unwrap(), Some(0.125));
        assert_eq!(s("{}", "step3p7").unwrap(), None);
        assert_eq!(s("{}", "granite").unwrap(), Some(1.0));
        assert_eq!(s(r#"{"attention_multiplier": 0.5}"#, "hyperclovax").unwrap(), Some(0.5));
        assert_eq!(s("{}", "hyperclovax").unwrap(), None);
        assert_eq!(s("{}", "gemma3n_text").unwrap(), Some(1.0));
        for (json, t) in [(r#"{"query_pre_attn_scalar": 0}"#, "step3p7"), (r#"{"attention_multiplier": -1}"#, "hyperclovax"), (r#"{"attention_multiplier": 0}"#, "granite")] {
            assert!(matches!(s(json, t), Err(Error::InvalidValue { .. })), "{t} {json}");
        }
        assert_eq!(softcap(&obj("{}"), "gemma2").unwrap(), Some(50.0));
        assert_eq!(softcap(&obj(r#"{"attn_logit_softcapping": null}"#), "gemma2").unwrap(), None);
        assert_eq!(softcap(&obj(r#"{"attn_logit_softcapping": 30}"#), "gemma3").unwrap(), Some(30.0));
        assert!(matches!(softcap(&obj(r#"{"attn_logit_softcapping": 0}"#), "gemma2"), Err(Error::InvalidValue { .. })));
    }
}
