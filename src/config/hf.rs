//! Reading a Hugging Face `config.json` into a [`RopeConfig`] (SPEC §2, "Config forms").
//!
//! The precedence follows transformers 5's `standardize_rope_params`: values inside
//! `rope_parameters` / `rope_scaling` win over top-level ones, except a top-level
//! `original_max_position_embeddings` (Phi-3), which transformers gives priority. Keys a
//! config leaves out take its model type's defaults, as transformers' config class for it
//! fills them in ([`ModelDefaults`], the generated table in model_defaults.rs).

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

fn bad(key: &str, reason: impl Into<String>) -> Error {
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
const FLAT_KEYS: [&str; 4] = ["rope_type", "type", "rope_theta", "factor"];

/// `rope_parameters` keyed by layer type: a non-empty object of objects, none of them a flat key.
fn nested_layer_types(rp: &Obj) -> Option<Vec<String>> {
    let nested = !rp.is_empty()
        && rp.iter().all(|(k, v)| !FLAT_KEYS.contains(&k.as_str()) && (v.is_object() || v.is_null()));
    nested.then(|| rp.iter().filter(|(_, v)| v.is_object()).map(|(k, _)| k.clone()).collect())
}

pub(super) fn layer_types(json: &str) -> Result<Vec<String>> {
    let top = parse_root(json)?;
    let root = text_root(top.clone());
    let layers = class_layers(&top, &root);
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(Value::Object(rp)) = root.get(key) {
            if let Some(nested) = nested_layer_types(rp) {
                return Ok(nested);
            }
            // A flat dict: one schedule, unless it is a legacy `rope_scaling` that the class
            // spreads over its dicts per layer type (Gemma 3's hub configs).
            let spread = key == "rope_scaling" && layers.iter().any(|l| l.legacy_scaling || l.legacy_theta.is_some());
            return Ok(if spread { layers.iter().map(|l| l.layer_type.to_string()).collect() } else { Vec::new() });
        }
    }
    // No dict at all: the class's own per layer type, if it has them.
    Ok(layers.iter().map(|l| l.layer_type.to_string()).collect())
}

/// One layer type's rope dict of a class that has one per layer type (model_defaults.rs), and
/// where a legacy flat config's keys go: `rope_scaling` into this layer type's dict when
/// `legacy_scaling`, and the top-level key `legacy_theta` names as its theta (Gemma 3: the full
/// layers take `rope_scaling` and `rope_theta`, the sliding ones `rope_local_base_freq`).
pub(super) struct LayerDefault {
    pub layer_type: &'static str,
    /// The default dict (JSON), theta included.
    pub rope: &'static str,
    pub legacy_scaling: bool,
    pub legacy_theta: Option<&'static str>,
}

/// The per-layer-type defaults of the config's model type (empty for a class with one dict).
fn class_layers(top: &Obj, root: &Obj) -> &'static [LayerDefault] {
    model_type_of(top, root).map_or(&[], |t| super::model_defaults::layer_defaults(&t))
}

/// A class's default dict for `layer_type` (its theta from the legacy top-level key, where the
/// class takes one and the config has it), with a legacy flat `rope_scaling` merged in where
/// the class puts it: what transformers' config class builds for a config without a dict per
/// layer type. `None` when the class has no dicts per layer type, or does not map a legacy
/// flat `rope_scaling` onto them (`legacy_flat` set).
fn class_layer_dict(layers: &[LayerDefault], root: &Obj, layer_type: Option<&str>, legacy_flat: Option<&Obj>) -> Result<Option<Obj>> {
    let maps_legacy = layers.iter().any(|l| l.legacy_scaling || l.legacy_theta.is_some());
    if layers.is_empty() || (legacy_flat.is_some() && !maps_legacy) {
        return Ok(None);
    }
    let available = || layers.iter().map(|l| l.layer_type.to_string()).collect::<Vec<_>>();
    let Some(requested) = layer_type else { return Err(Error::LayerType { requested: None, available: available() }) };
    let Some(l) = layers.iter().find(|l| l.layer_type == requested) else {
        return Err(Error::LayerType { requested: Some(requested.to_string()), available: available() });
    };
    let mut dict: Obj = serde_json::from_str(l.rope).expect("model_defaults.rs holds valid JSON");
    if let (true, Some(flat)) = (l.legacy_scaling, legacy_flat) {
        dict.extend(flat.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(theta) = l.legacy_theta.and_then(|key| root.get(key)).filter(|v| !v.is_null()) {
        dict.insert("rope_theta".into(), theta.clone());
    }
    Ok(Some(dict))
}

/// The dict that holds the schedule: `rope_parameters` (picking the layer type) or `rope_scaling`.
fn rope_dict<'a>(root: &'a Obj, layer_type: Option<&str>) -> Result<Option<&'a Obj>> {
    for key in ["rope_parameters", "rope_scaling"] {
        match root.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Object(rp)) => {
                let Some(available) = nested_layer_types(rp) else { return Ok(Some(rp)) };
                let Some(requested) = layer_type else {
                    return Err(Error::LayerType { requested: None, available });
                };
                return match rp.get(requested) {
                    Some(Value::Object(inner)) => Ok(Some(inner)),
                    _ => Err(Error::LayerType { requested: Some(requested.to_string()), available }),
                };
            }
            Some(other) => return Err(bad(key, format!("expected an object, got {other}"))),
        }
    }
    Ok(None)
}

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

/// What transformers' config class for a model type fills in for the rope keys a config.json
/// leaves out, and how its rotary code reads the partial factor (model_defaults.rs, generated
/// from transformers and checked against its rotary code by tests/hf_fixtures.rs).
pub(super) struct ModelDefaults {
    /// `rope_theta` (`default_theta`): Llama 4's 5e5, Qwen2-VL's 1e6, GPT-OSS's 1.5e5, ...
    pub theta: f64,
    /// `partial_rotary_factor`: GLM's and Phi's 0.5, Qwen3-Next's and StableLM's 0.25, ...
    pub partial_rotary_factor: f64,
    /// Whether a top-level `rope_theta` counts (GPT-NeoX reads `rotary_emb_base`; a class
    /// whose default dict holds its own theta keeps that one).
    pub top_level_theta: bool,
    /// Whether a top-level `partial_rotary_factor` counts (GPT-NeoX reads `rotary_pct`, Bamba
    /// fixes 0.5, Qwen2-VL and others only read the rope dict's).
    pub top_level_partial: bool,
    /// Whether its unscaled rotation honours the factor: Llama's and many others'
    /// `compute_default_rope_parameters` rotate the whole head whatever it says (the scaled
    /// types always honour it).
    pub default_partial: bool,
    /// The rope dict (JSON) when the config has none and it is not plain RoPE: GPT-OSS's YaRN,
    /// Apertus's Llama 3 scaling, ...
    pub rope: Option<&'static str>,
}

/// The model type whose code runs: the text config's own, else the top level's.
pub(super) fn model_type_of(top: &Obj, text: &Obj) -> Option<String> {
    text.get("model_type").or(top.get("model_type")).and_then(Value::as_str).map(str::to_string)
}

/// The rope dict transformers' config class ends up with: the config's own (`layer_type`'s,
/// for one dict per layer type; a legacy flat `rope_scaling` of a class with one dict per layer
/// type goes where the class puts it), else its model type's default dict, if it has one.
pub(super) fn effective_rope_dict(top: &Obj, root: &Obj, defaults: Option<&ModelDefaults>, layer_type: Option<&str>) -> Result<Option<Obj>> {
    let layers = class_layers(top, root);
    let legacy_flat = match (root.get("rope_parameters"), root.get("rope_scaling")) {
        (None | Some(Value::Null), Some(Value::Object(flat))) if nested_layer_types(flat).is_none() => Some(flat),
        _ => None,
    };
    let own = if legacy_flat.is_some() && !layers.is_empty() { None } else { rope_dict(root, layer_type)? };
    let nested = ["rope_parameters", "rope_scaling"].iter().any(|k| matches!(root.get(*k), Some(Value::Object(rp)) if nested_layer_types(rp).is_some()));
    Ok(match (own, defaults.and_then(|d| d.rope)) {
        (Some(own), _) => {
            let mut own = own.clone();
            // A dict per layer type that leaves a theta out takes the class's for that layer.
            if nested && !own.contains_key("rope_theta") {
                if let Some(theta) = class_layer_dict(layers, root, layer_type, None)?.and_then(|d| d.get("rope_theta").cloned()) {
                    own.insert("rope_theta".into(), theta);
                }
            }
            Some(own)
        }
        (None, _) if !layers.is_empty() => match class_layer_dict(layers, root, layer_type, legacy_flat)? {
            Some(d) => Some(d),
            None => rope_dict(root, layer_type)?.cloned(),  // a class that does not map the legacy dict: as flat
        },
        (None, Some(text)) => Some(serde_json::from_str(text).expect("model_defaults.rs holds valid JSON")),
        (None, None) => None,
    })
}

/// The defaults of the model type whose code runs for this config.
pub(super) fn defaults_of(top: &Obj, root: &Obj) -> Option<ModelDefaults> {
    model_type_of(top, root).and_then(|t| super::model_defaults::model_defaults(&t))
}

pub(super) fn parse(json: &str, layer_type: Option<&str>) -> Result<RopeConfig> {
    let top = parse_root(json)?;
    let root = text_root(top.clone());
    let defaults = defaults_of(&top, &root);
    let dict = effective_rope_dict(&top, &root, defaults.as_ref(), layer_type)?.unwrap_or_default();
    let p = &dict;
    let either = |key: &str| -> Result<Option<f64>> { Ok(f64_of(p, key)?.or(f64_of(&root, key)?)) };

    let top_level_theta = defaults.as_ref().is_none_or(|d| d.top_level_theta);
    let given_theta = match top_level_theta {
        true => either("rope_theta")?,
        false => f64_of(p, "rope_theta")?,
    };
    let theta = match given_theta {
        Some(t) => t,
        None => f64_of(&root, "rotary_emb_base")?.unwrap_or(defaults.as_ref().map_or(10000.0, |d| d.theta)),
    };
    let head_dim = head_dim(&root)?;
    let top_level_partial = defaults.as_ref().is_none_or(|d| d.top_level_partial);
    let given = match top_level_partial {
        true => either("partial_rotary_factor")?,
        false => f64_of(p, "partial_rotary_factor")?,
    };
    // MiniMax-M2's legacy `rotary_dim` (its config class turns it into the factor).
    let legacy_dim = match model_type_of(&top, &root).as_deref() {
        Some("minimax_m2") => usize_of(&root, "rotary_dim")?.map(|r| r as f64 / head_dim as f64),
        _ => None,
    };
    let prf = match given.or(legacy_dim) {
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
        other => return Err(Error::UnknownRopeType(other.to_string())),
    };
    let cfg = RopeConfig::with_scaling(theta, head_dim, rotary_dim, mpe, scaling)?;
    match mrope_of(p)? {
        Some(m) => cfg.with_mrope(m),
        None if rope_type == "mrope" => Err(Error::MissingKey("mrope_section")),
        None => Ok(cfg),
    }
}
