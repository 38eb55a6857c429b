//! Which rope dict a config's schedule comes from, as transformers' config classes decide it:
//! the config's own (`rope_parameters` or `rope_scaling`, one per layer type or flat), else the
//! defaults of its model type's class (model_defaults.rs, generated from transformers): a
//! default theta and partial factor, a default scaling dict, one dict per layer type, and
//! where a legacy flat config's keys go (Gemma 3's Hub configs).

use super::hf::{bad, parse_root, text_root, Obj};
use crate::error::{Error, Result};
use serde_json::Value;

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
            let spread = key == "rope_scaling" && maps_legacy(layers);
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

/// Whether a class spreads a legacy flat config's keys over its dicts per layer type.
fn maps_legacy(layers: &[LayerDefault]) -> bool {
    layers.iter().any(|l| l.legacy_scaling || l.legacy_theta.is_some())
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
    if layers.is_empty() || (legacy_flat.is_some() && !maps_legacy(layers)) {
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

