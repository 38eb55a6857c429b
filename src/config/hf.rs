//! Reading a Hugging Face `config.json` into a [`RopeConfig`] (SPEC §2, "Config forms").
//!
//! The precedence follows transformers 5's `standardize_rope_params`: values inside
//! `rope_parameters` / `rope_scaling` win over top-level ones, except a top-level
//! `original_max_position_embeddings` (Phi-3), which transformers gives priority. Keys a
//! config leaves out take its model type's defaults, as transformers' config class for it
//! fills them in (rope_dict.rs, over the generated table in model_defaults.rs).

use super::layer_shape::sizes_per_layer;
use super::rope_dict::{defaults_of, effective_rope_dict, model_type_of, ModelDefaults};
use super::{MRope, RopeConfig, RopeScaling};
use crate::error::{Error, Result};
use serde_json::{Map, Value};

pub(super) type Obj = Map<String, Value>;

/// Python's `json.dump` writes NaN/Infinity as bare words, which is not JSON. We turn them
/// into marker strings so the error can name the key that holds them instead of failing the parse.
const NON_FINITE: &str = "\u{0}non-finite";
/// How [`NON_FINITE`] is written into the JSON text: a raw NUL inside a JSON string is an error,
/// so it goes in as the `\u0000` escape, which serde_json decodes back to [`NON_FINITE`].
const NON_FINITE_ESCAPED: &str = "\\u0000non-finite";

fn sanitize_non_finite(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let word = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w));
        if let Some(w) = word {
            out.push('"');
            out.push_str(NON_FINITE_ESCAPED);
            out.push('"');
            rest = &rest[w.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

pub(super) fn parse_root(json: &str) -> Result<Obj> {
    let v: Value = serde_json::from_str(&sanitize_non_finite(json)).map_err(|e| Error::Json(e.to_string()))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(Error::Json("the top level is not a JSON object".into())),
    }
}

/// A config key whose value is wrong, and why.
pub(super) fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidValue { key: key.to_string(), reason: reason.into() }
}

/// A number under `key`; `None` when absent or null (Python's `.get()` semantics).
pub(super) fn f64_of(o: &Obj, key: &str) -> Result<Option<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| bad(key, "not representable as f64")),
        Some(Value::String(s)) if s == NON_FINITE => Err(bad(key, "is NaN or infinite")),
        Some(other) => Err(bad(key, format!("expected a number, got {other}"))),
    }
}

/// A bool under `key`, `None` when absent or null.
pub(super) fn flag(o: &Obj, key: &str) -> Result<Option<bool>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(key, format!("expected a bool, got {other}"))),
    }
}

/// A non-negative integer under `key` (integral floats such as `4096.0` are accepted).
pub(super) fn usize_of(o: &Obj, key: &str) -> Result<Option<usize>> {
    match f64_of(o, key)? {
        None => Ok(None),
        Some(v) if v >= 0.0 && v.fract() == 0.0 && v < 1e15 => Ok(Some(v as usize)),
        Some(v) => Err(bad(key, format!("expected a non-negative integer, got {v}"))),
    }
}

fn list_of(o: &Obj, key: &'static str) -> Result<Vec<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Err(Error::MissingKey(key)),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Number(n) => n.as_f64().ok_or_else(|| bad(key, format!("entry {i} is not an f64"))),
                Value::String(s) if s == NON_FINITE => Err(bad(key, format!("entry {i} is NaN or infinite"))),
                other => Err(bad(key, format!("entry {i} is {other}, not a number"))),
            })
            .collect(),
        Some(other) => Err(bad(key, format!("expected a list of numbers, got {other}"))),
    }
}

fn required(v: Option<f64>, key: &'static str) -> Result<f64> {
    v.ok_or(Error::MissingKey(key))
}

/// Keys that only a flat (single-schedule) rope dict holds.
fn head_dim(root: &Obj) -> Result<usize> {
    for key in ["qk_rope_head_dim", "head_dim"] {
        if let Some(d) = usize_of(root, key)? {
            return Ok(d);
        }
    }
    let hidden = usize_of(root, "hidden_size")?.ok_or(Error::MissingKey("hidden_size"))?;
    let heads = usize_of(root, "num_attention_heads")?.ok_or(Error::MissingKey("num_attention_heads"))?;
    if heads == 0 {
        return Err(bad("num_attention_heads", "must be > 0"));
    }
    Ok(hidden / heads)
}

/// The head size of `layer_type`'s layers where it may differ per layer (`per_layer_config`,
/// Gemma 4's `global_head_dim`): `None` when no layer has that type.
fn layer_head_dim(json: &str, layer_type: &str) -> Result<Option<usize>> {
    let dims: Vec<usize> = super::hf_layers(json)?.iter().filter(|l| l.layer_type() == layer_type).filter_map(|l| l.heads.map(|h| h.head_dim)).collect();
    match dims.split_first() {
        Some((&d, rest)) if rest.iter().any(|&o| o != d) => Err(bad("per_layer_config", format!("{layer_type} layers differ in head_dim ({d} and {})", rest.iter().find(|&&o| o != d).unwrap()))),
        first => Ok(first.map(|(&d, _)| d)),
    }
}

/// Multimodal configs (Qwen3-VL, Gemma 3, ...) keep the language model's keys in `text_config`:
/// read those when the top level does not describe the attention itself.
pub(super) fn text_root(root: Obj) -> Obj {
    if root.contains_key("num_attention_heads") {
        return root;
    }
    match root.get("text_config") {
        Some(Value::Object(t)) => t.clone(),
        _ => root,
    }
}

/// `mrope_section` / `mrope_interleaved` of the rope dict (Qwen2-VL writes `type: "mrope"`,
/// which transformers turns into `default`; Qwen3-VL writes `rope_type: "default"` with the
/// sections, and transformers' default sections when `mrope_interleaved` comes alone).
fn mrope_of(p: &Obj) -> Result<Option<MRope>> {
    let interleaved = match p.get("mrope_interleaved") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => return Err(bad("mrope_interleaved", format!("expected a bool, got {other}"))),
    };
    let sections = match p.get("mrope_section") {
        None | Some(Value::Null) => match interleaved {
            Some(true) => MRope::QWEN3_VL_SECTIONS,
            _ => return Ok(None),
        },
        Some(_) => {
            let list = list_of(p, "mrope_section")?;
            if list.len() != 3 {
                return Err(bad("mrope_section", format!("expected 3 entries (time, height, width), got {}", list.len())));
            }
            let mut out = [0usize; 3];
            for (o, v) in out.iter_mut().zip(&list) {
                if !(*v >= 0.0 && v.fract() == 0.0 && *v < 1e9) {
                    return Err(bad("mrope_section", format!("entry {v} is not a non-negative integer")));
                }
                *o = *v as usize;
            }
            out
        }
    };
    Ok(Some(MRope { sections, interleaved: interleaved.unwrap_or(false) }))
}

pub(super) fn parse(json: &str, layer_type: Option<&str>) -> Result<RopeConfig> {
    let top = parse_root(json)?;
    let root = text_root(top.clone());
    let defaults = defaults_of(&top, &root);
    let dict = effective_rope_dict(&top, &root, defaults.as_ref(), layer_type)?.unwrap_or_default();
    let p = &dict;
    // The rope dict's value, else the top-level one where the model type's class reads it there.
    let given = |key: &str, top_level: fn(&ModelDefaults) -> bool| -> Result<Option<f64>> {
        match f64_of(p, key)? {
            Some(v) => Ok(Some(v)),
            None if defaults.as_ref().is_none_or(top_level) => f64_of(&root, key),
            None => Ok(None),
        }
    };

    let theta = match given("rope_theta", |d| d.top_level_theta)? {
        Some(t) => t,
        None => f64_of(&root, "rotary_emb_base")?.unwrap_or(defaults.as_ref().map_or(10000.0, |d| d.theta)),
    };
    let head_dim = match layer_type {
        Some(t) if sizes_per_layer(&root, &model_type_of(&top, &root).unwrap_or_default()) => layer_head_dim(json, t)?,
        _ => None,
    };
    let head_dim = match head_dim {
        Some(d) => d,
        None => self::head_dim(&root)?,
    };
    let given_partial = given("partial_rotary_factor", |d| d.top_level_partial)?;
    // MiniMax-M2's legacy `rotary_dim` (its config class turns it into the factor).
    let legacy_dim = match model_type_of(&top, &root).as_deref() {
        Some("minimax_m2") => usize_of(&root, "rotary_dim")?.map(|r| r as f64 / head_dim as f64),
        _ => None,
    };
    let prf = match given_partial.or(legacy_dim) {
        Some(f) => f,
        None => f64_of(&root, "rotary_pct")?.unwrap_or(defaults.as_ref().map_or(1.0, |d| d.partial_rotary_factor)),
    };
    if !(prf > 0.0 && prf <= 1.0) {
        return Err(bad("partial_rotary_factor", format!("{prf} is not in (0, 1]")));
    }
    let mpe = usize_of(&root, "max_position_embeddings")?;
    let original_max = || -> Result<usize> {
        usize_of(&root, "original_max_position_embeddings")?
            .or(usize_of(p, "original_max_position_embeddings")?)
            .or(mpe)
            .ok_or(Error::MissingKey("original_max_position_embeddings"))
    };
    // Derived factor (DeepSeek / Phi-3 style): max_position_embeddings / original.
    let implicit_factor = |orig: usize| -> Result<f64> {
        Ok(mpe.ok_or(Error::MissingKey("max_position_embeddings"))? as f64 / orig as f64)
    };

    let rope_type = match p.get("rope_type").or(p.get("type")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(bad("rope_type", format!("expected a string, got {other}"))),
    };
    // Unscaled, the model's own rotation may take the whole head whatever the factor says.
    let whole_head = matches!(rope_type.as_str(), "default" | "mrope") && defaults.as_ref().is_some_and(|d| !d.default_partial);
    let rotary_dim = if whole_head { head_dim } else { (head_dim as f64 * prf) as usize };
    let factor = || required(f64_of(p, "factor")?, "factor");
    let scaling = match rope_type.as_str() {
        "default" | "mrope" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "ntk" => RopeScaling::Ntk { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            max_position_embeddings: mpe.ok_or(Error::MissingKey("max_position_embeddings"))?,
        },
        "yarn" => {
            let orig = original_max()?;
            let truncate = match p.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(bad("truncate", format!("expected a bool, got {other}"))),
            };
            // transformers: `get("beta_fast") or 32` — a zero counts as absent.
            let or_default = |key: &str, d: f64| -> Result<f64> {
                Ok(f64_of(p, key)?.filter(|v| *v != 0.0).unwrap_or(d))
            };
            RopeScaling::Yarn {
                factor: match f64_of(p, "factor")? {
                    Some(f) => f,
                    None => implicit_factor(orig)?,
                },
                original_max_position_embeddings: orig,
                beta_fast: or_default("beta_fast", 32.0)?,
                beta_slow: or_default("beta_slow", 1.0)?,
                mscale: f64_of(p, "mscale")?,
                mscale_all_dim: f64_of(p, "mscale_all_dim")?,
                attention_factor: f64_of(p, "attention_factor")?,
                truncate,
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: required(f64_of(p, "low_freq_factor")?, "low_freq_factor")?,
            high_freq_factor: required(f64_of(p, "high_freq_factor")?, "high_freq_factor")?,
            original_max_position_embeddings: original_max()?,
        },
        "longrope" | "su" => {
            let orig = original_max()?;
            RopeScaling::LongRope {
                short_factor: list_of(p, "short_factor")?,
                long_factor: list_of(p, "long_factor")?,
                original_max_position_embeddings: orig,
                factor: match f64_of(p, "factor")? {
                    Some(f) => f,
                    None => implicit_factor(orig)?,
                },
                attention_factor: f64_of(p, "attention_factor")?,
            }
        }
        "proportional" => {
            // transformers reads this one's factor from the rope dict only, and rotates over the head.
            let prf = f64_of(p, "partial_rotary_factor")?.unwrap_or(1.0);
            if !(0.0..=1.0).contains(&prf) {
                return Err(bad("partial_rotary_factor", format!("{prf} is not in [0, 1]")));
            }
            let factor = f64_of(p, "factor")?.unwrap_or(1.0);
            let rotated_pairs = (prf * head_dim as f64 / 2.0).floor() as usize;
            return RopeConfig::with_scaling(theta, head_dim, head_dim, mpe, RopeScaling::Proportional { factor, rotated_pairs });
        }
        other => return Err(Error::UnknownRopeType(other.to_string())),
    };
    let cfg = RopeConfig::with_scaling(theta, head_dim, rotary_dim, mpe, scaling)?;
    match mrope_of(p)? {
        Some(m) => cfg.with_mrope(m),
        None if rope_type == "mrope" => Err(Error::MissingKey("mrope_section")),
        None => Ok(cfg),
    }
}
