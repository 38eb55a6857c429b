//! Reading `config.json` files into named, evaluated RoPE schedules.

use rope_attn::{RopeConfig, RopeSchedule};
use std::path::Path;

/// One model as the CLI shows it: its name (the file stem), parsed config and schedule.
pub struct Model {
    pub path: String,
    pub name: String,
    pub layer_type: Option<String>,
    pub config: RopeConfig,
    pub schedule: RopeSchedule,
}

/// Parse `path`, picking `layer_type` when its `rope_parameters` is keyed by layer type, and
/// evaluate the schedule at `seq_len`. Errors name the file (and, from the library, the key).
pub fn model(path: &str, layer_type: Option<&str>, seq_len: Option<usize>) -> Result<Model, String> {
    let json = std::fs::read_to_string(path).map_err(|e| format!("{path}: cannot read: {e}"))?;
    let config = RopeConfig::from_hf_config_json_layer(&json, layer_type).map_err(|e| match e {
        rope_attn::Error::LayerType { requested: None, .. } => {
            format!("{path}: {e} (pass --layer-type NAME)")
        }
        e => format!("{path}: {e}"),
    })?;
    let per_layer = !RopeConfig::hf_layer_types(&json).map_err(|e| format!("{path}: {e}"))?.is_empty();
    if layer_type.is_some() && !per_layer {
        eprintln!("note: {path} has a single RoPE schedule; --layer-type is ignored for it");
    }
    let schedule = config.schedule(seq_len).map_err(|e| format!("{path}: {e}"))?;
    let name = Path::new(path).file_stem().map_or_else(|| path.to_string(), |s| s.to_string_lossy().into_owned());
    Ok(Model {
        path: path.to_string(),
        name,
        layer_type: if per_layer { layer_type.map(str::to_string) } else { None },
        config,
        schedule,
    })
}

/// Plain RoPE with the model's base over its rotary dimension: what ratios are taken against.
pub fn plain_of(config: &RopeConfig) -> Result<RopeSchedule, String> {
    RopeSchedule::plain(config.theta, config.rotary_dim).map_err(|e| e.to_string())
}
