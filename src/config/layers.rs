//! Which attention each decoder layer of a Hugging Face `config.json` runs, as transformers 5
//! decides it (`config.layer_types`): full, a sliding window, Llama 4's chunks, or no softmax
//! attention at all (Qwen3-Next's linear layers), and whether the layer applies RoPE (Llama 4's
//! NoPE layers do not), with Llama 4's query temperature and the model's QK norm. [`HfLayer::mask`] is the
//! [`Mask`] to run it with, [`HfLayer::apply`] sets all of it on an [`AttentionParams`].

use super::hf::{bad, f64_of, flag, parse_root, text_root, usize_of, Obj};
use super::rope_dict::{defaults_of, effective_rope_dict, model_type_of};
use super::layer_shape::{gemma3n_or_4, gemma4_family, heads, overrides, scale, softcap, LayerHeads};
use super::qk_norm::{qk_norm_of, v_norm_of, HfQkNorm};
use crate::attention::{AttentionParams, Mask, QueryTemperature};
use crate::error::{Error, Result};
use serde_json::Value;

/// One layer's attention pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    /// Causal attention over every earlier position (`"full_attention"`).
    Full,
    /// A causal sliding window of this many positions, the query's own included
    /// (`"sliding_attention"`, transformers' `sliding_window`: keys with `i - j < window`).
    Sliding(usize),
    /// Causal attention within chunks of this many positions (`"chunked_attention"`, Llama 4's
    /// `attention_chunk_size`).
    Chunked(usize),
    /// Not softmax attention (`"linear_attention"`: Qwen3-Next's and Qwen3.5's Gated DeltaNet
    /// layers); no kernel here runs it.
    Linear,
    /// No attention: LFM2's and LFM3's short-convolution layers (`"conv"`).
    Conv,
}

/// One decoder layer of a config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfLayer {
    /// Its attention pattern.
    pub attention: LayerAttention,
    /// Whether it rotates Q and K: false on Llama 4's and SmolLM3's NoPE layers
    /// (`no_rope_layers[i] == 0`) and on Cohere 2's full layers (it rotates its sliding ones).
    pub rope: bool,
    /// The query temperature: Llama 4's on its NoPE layers (`attn_temperature_tuning`, on by
    /// default, with `floor_scale` and `attn_scale`), Ministral 3's and Mistral 4's on every
    /// layer (`llama_4_scaling_beta` and `original_max_position_embeddings` of the rope dict,
    /// the class's default dict when the config has none): [`AttentionParams::query_temperature`].
    pub query_temperature: Option<QueryTemperature>,
    /// The layer's QK norm, if its model has one: Qwen3 (and its MoE and VL text models),
    /// Qwen3-Next and Qwen3.5 (on their attention layers), Gemma 3, OLMo 2 / 3, OLMoE,
    /// GLM-4-MoE (`use_qk_norm`), and Llama 4 on its RoPE layers (`use_qk_norm`, on by
    /// default: an unweighted L2 norm after the rotation, which equals one before it). The
    /// rope kernel applies it to the unrotated Q and K: `cuda::qk_norm_inplace` (then the
    /// attention kernels rotate; K so normalised enters the cache) or
    /// `cuda::rope_inplace_normed` (a pre-rotated cache). tests/hf_fixtures.rs checks it
    /// against transformers' own Llama 4, Qwen3, Gemma 3 and OLMo 2 attention.
    pub qk_norm: Option<HfQkNorm>,
    /// Whether its `q_proj` emits a gated query (Qwen3-Next, Qwen3.5 and their MoE models, on
    /// their attention layers): per head, head_dim query components then head_dim of the
    /// output gate, the attention's output then multiplied by `sigmoid(gate)` before `o_proj`.
    /// `cuda::qk_norm_rope_gated` reads the queries from there (norm and rotation in the same
    /// pass) into a dense Q and leaves the gates in place, where `OutputGate::after_query`
    /// finds them for `cuda::attention_fwd_gated`, `attention_decode_gated` and
    /// `attention_fwd_paged_gated`.
    pub gated_query: bool,
    /// Its heads and head size, where the config gives them (`per_layer_config`'s, or Gemma 4's
    /// `global_head_dim` and `num_global_key_value_heads` on its full layers, override the
    /// model's); `None` for the MLA models (DeepSeek-V2 style), whose queries and keys are
    /// wider than their values.
    pub heads: Option<LayerHeads>,
    /// The softmax scale where it is not `1/sqrt(head_dim)`: `query_pre_attn_scalar^-0.5`
    /// (Gemma 2, Gemma 3, VaultGemma), `attention_multiplier` (Granite, 1 when absent), 1
    /// (Gemma 3n, Gemma 4: their QK norm sets the scores' size), `qk_head_dim^-0.5 · mscale²`
    /// (DeepSeek-V2 / V3 and the other MLA models under YaRN with `mscale_all_dim`).
    pub scale: Option<f64>,
    /// Logit soft-capping (`attn_logit_softcapping`: Gemma 2's and VaultGemma's, 50 by default).
    pub softcap: Option<f64>,
    /// A norm of V before attention (Gemma 3n's and Gemma 4's `v_norm`: an RMS norm of each
    /// head without weights), fused into the append by `cuda::paged_append_v_normed` (candle:
    /// `paged_append_v_normed`) with this norm's `eps`. A prefill that reads V from its own
    /// tensor normalises it first: `cuda::qk_norm_inplace` with no Q (`q_heads: 0`) and V in
    /// K's place.
    pub v_norm: Option<HfQkNorm>,
    /// Whether V is `k_proj`'s output (before the K norm and RoPE) rather than `v_proj`'s: Gemma
    /// 4's full layers with `attention_k_eq_v`.
    pub value_is_key: bool,
    /// The earlier layer whose K and V (cache included) this one reads instead of computing its
    /// own: the last layer of its type before the shared ones, on the last
    /// `num_kv_shared_layers` layers of Gemma 3n (15 by default) and Gemma 4 (0 by default).
    /// Such a layer has no `k_proj` or `v_proj`; its `v_norm` and QK norm are what made the K
    /// and V it reads (its own QK norm still applies to its queries).
    pub kv_shared_from: Option<usize>,
    /// A sigmoid gate per head on the attention output (LFM3's `g_proj`, with
    /// `use_attention_gate`, on by default): `o_h · sigmoid(g_proj(x)_h)` before `o_proj`,
    /// fused by `cuda::attention_fwd_gated`, `attention_decode_gated` and
    /// `attention_fwd_paged_gated` with `OutputGate::per_head`.
    pub head_gate: bool,
}

impl HfLayer {
    /// The mask to run the layer with; `None` for a linear-attention layer.
    pub fn mask(&self) -> Option<Mask> {
        let causal = Mask { causal: true, window: None, sinks: 0, chunk: None };
        match self.attention {
            LayerAttention::Full => Some(causal),
            LayerAttention::Sliding(w) => Some(Mask { window: Some(w), ..causal }),
            LayerAttention::Chunked(c) => Some(Mask { chunk: Some(c), ..causal }),
            LayerAttention::Linear | LayerAttention::Conv => None,
        }
    }

    /// Set this layer's mask and query temperature on `p` (its RoPE comes from the
    /// [`RopeConfig`](crate::RopeConfig) of the same config: set `p.rope` only when
    /// [`HfLayer::rope`] is true). `None` for a linear-attention layer, which no kernel here runs.
    ///
    /// ```
    /// use rope_attn::{hf_layers, AttentionParams, LayerAttention, Layout, RopeConfig, Rotary};
    /// let json = std::fs::read_to_string("examples/configs/llama-4-scout-text-transformers-defaults.json").unwrap();
    /// let sched = RopeConfig::from_hf_config_json(&json).unwrap().schedule(Some(8192)).unwrap();
    /// for layer in hf_layers(&json).unwrap() {
    ///     let mut p = AttentionParams::new(40, 8, 128);
    ///     p.rope = layer.rope.then(|| Rotary::from_schedule(&sched, Layout::Interleaved)); // Llama 4 pairs
    ///     let Some(p) = layer.apply(p) else { continue }; // None: linear attention
    ///     // Llama 4: chunked RoPE layers (QK norm on the unrotated Q and K first), full NoPE
    ///     // layers with the query temperature.
    ///     assert_eq!(p.mask.chunk.is_some(), layer.rope);
    ///     assert_eq!((p.query_temperature.is_some(), layer.qk_norm.is_some()), (!layer.rope, layer.rope));
    ///     assert!(matches!(layer.attention, LayerAttention::Chunked(8192) | LayerAttention::Full));
    /// }
    /// ```
    pub fn apply(&self, mut p: AttentionParams) -> Option<AttentionParams> {
        p.mask = self.mask()?;
        p.query_temperature = self.query_temperature;
        p.scale = self.scale.or(p.scale);
        p.softcap = self.softcap.or(p.softcap);
        Some(p)
    }

    /// The layer's [`AttentionParams`] over all of its heads ([`HfLayer::heads`]), with its
    /// mask, scale, soft-capping and query temperature ([`HfLayer::apply`]); set `rope` from
    /// the config's [`RopeConfig`](crate::RopeConfig) where [`HfLayer::rope`] is true. `None`
    /// for a layer without softmax attention or a config without the heads.
    pub fn params(&self) -> Option<AttentionParams> {
        let h = self.heads?;
        self.apply(AttentionParams::new(h.num_q_heads, h.num_kv_heads, h.head_dim))
    }

    /// transformers' name of the layer type.
    pub fn layer_type(&self) -> &'static str {
        self.attention.layer_type()
    }
}

impl LayerAttention {
    /// transformers' name of the layer type.
    pub fn layer_type(&self) -> &'static str {
        match self {
            LayerAttention::Full => "full_attention",
            LayerAttention::Sliding(_) => "sliding_attention",
            LayerAttention::Chunked(_) => "chunked_attention",
            LayerAttention::Linear => "linear_attention",
            LayerAttention::Conv => "conv",
        }
    }
}

/// A positive integer key, `None` when absent or null.
fn size_of(root: &Obj, key: &str) -> Result<Option<usize>> {
    match usize_of(root, key)? {
        Some(0) => Err(bad(key, "must be >= 1")),
        v => Ok(v),
    }
}

/// Every decoder layer of a `config.json` (the language model's, under `text_config` for
/// multimodal configs), in order.
///
/// An explicit `layer_types` list wins (transformers 5 writes it into the configs it saves).
/// Without one, transformers' own defaults are followed for the model types whose configs
/// derive it: Llama 4 (`no_rope_layers`, or a NoPE layer every `no_rope_layer_interval`, and
/// `attention_chunk_size`, 8192 when absent), Gemma 2 and GPT-OSS (sliding and full
/// alternating; VaultGemma too), Gemma 3 (`sliding_window_pattern`, 6), Cohere 2
/// (`sliding_window_pattern`, 4, window 4096), SmolLM3 (sliding on its NoPE layers when
/// `use_sliding_window`), Qwen3-Next / Qwen3.5 (`full_attention_interval`, 4), Gemma 4 (a full
/// layer every 6th and the last), LFM2 (attention at `full_attn_idxs`, convolutions elsewhere),
/// LFM3 (full at 2 mod 4, sliding at 0 mod 4 but 0, convolutions elsewhere); Mistral, Mixtral,
/// Phi-3 and Starcoder2 slide every layer when `sliding_window` is set (Mistral's class sets
/// 4096 where the key is absent; a null turns it off). Windows absent from a config take the
/// class's (Gemma 2 / 3 4096, GPT-OSS 128, LFM3 256, Gemma 4 512, Gemma 4 Unified 1024).
///
/// Which layers rotate follows the model's code too: SmolLM3 takes `no_rope_layers` as Llama 4
/// does (1 = RoPE; a NoPE layer every `no_rope_layer_interval`, 4, when absent), and Cohere 2
/// (Command R7B, Command A) rotates its sliding layers only. Any other config is full attention throughout unless it sets a
/// `sliding_window` it uses (`use_sliding_window` not false): its rule is model-specific (Qwen2's
/// `max_window_layers`, ...), so that is an error that asks for `layer_types` rather than a guess.
pub fn hf_layers(json: &str) -> Result<Vec<HfLayer>> {
    let top = parse_root(json)?;
    let root = text_root(top.clone());
    let model_type = model_type_of(&top, &root).unwrap_or_default();
    let llama4 = model_type.starts_with("llama4");
    // no_rope_layers[i] = 1 for a RoPE layer, as Llama 4 has it.
    let nope_list = llama4 || model_type == "smollm3";
    // RoPE on the sliding layers only (`if self.sliding_window is not None: apply_rotary_pos_emb`).
    let rope_if_sliding = matches!(model_type.as_str(), "cohere2" | "cohere2_moe" | "dory" | "flint");
    let chunk = if llama4 && !root.contains_key("attention_chunk_size") { Some(8192) } else { size_of(&root, "attention_chunk_size")? };
    // Gemma 3's embedding variant (`true`) and Gemma 4's `"all"`: a symmetric window, which
    // Mask does not hold. Gemma 4's `"vision"` only opens the image tokens to each other.
    match root.get("use_bidirectional_attention") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::String(s)) if s == "vision" => {}
        Some(other) => return Err(bad("use_bidirectional_attention", format!("{other}: bidirectional attention is not supported"))),
    }
    // SmolLM3's use_sliding_window defaults to false; the others' use a window they set.
    let used = flag(&root, "use_sliding_window")?.unwrap_or(model_type != "smollm3");
    // The config class's window where the key is absent (not where it is null).
    let class_window = match model_type.as_str() {
        "cohere2" | "cohere2_moe" | "gemma2" | "gemma3" | "gemma3_text" | "vaultgemma" | "mistral" => Some(4096),
        "gpt_oss" => Some(128),
        "lfm3" | "lfm3_vl" => Some(256),
        t if t.starts_with("gemma4_unified") => Some(1024),
        t if gemma3n_or_4(t) => Some(512),
        _ => None,
    };
    let window = match root.get("sliding_window") {
        None => class_window,
        Some(_) => size_of(&root, "sliding_window")?,
    }
    .filter(|_| used);
    let n = usize_of(&root, "num_hidden_layers")?;

    // Llama 4: no_rope_layers[i] = 1 for a RoPE layer (chunked), 0 for a NoPE one (full).
    let rope_layers: Option<Vec<bool>> = if nope_list {
        let listed = match root.get("no_rope_layers") {
            Some(Value::Array(a)) if !a.is_empty() => Some(
                a.iter().map(|v| v.as_i64().map(|x| x != 0).ok_or_else(|| bad("no_rope_layers", format!("entry {v} is not an integer")))).collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        match listed {
            Some(l) => Some(l),
            None => {
                let n = n.ok_or(Error::MissingKey("num_hidden_layers"))?;
                let every = size_of(&root, "no_rope_layer_interval")?.unwrap_or(4);
                Some((0..n).map(|i| !(i + 1).is_multiple_of(every)).collect())
            }
        }
    } else {
        None
    };
    let rope_of = |i: usize| rope_layers.as_ref().is_none_or(|r| r.get(i).copied().unwrap_or(true));
    // Llama 4's temperature (NoPE layers), transformers' defaults.
    let temperature = if llama4 {
        match flag(&root, "attn_temperature_tuning")?.unwrap_or(true) {
            false => None,
            true => {
                let floor_scale = size_of(&root, "floor_scale")?.unwrap_or(8192);
                let attn_scale = f64_of(&root, "attn_scale")?.unwrap_or(0.1);
                Some(QueryTemperature::llama4(floor_scale, attn_scale))
            }
        }
    } else {
        None
    };
    // Ministral 3's and Mistral 4's query scaling (`llama_4_scaling_beta` in the rope dict, its
    // floor at original_max_position_embeddings), on every layer.
    let scaled_dict = match model_type.as_str() {
        "ministral3" | "mistral4" => effective_rope_dict(&top, &root, defaults_of(&top, &root).as_ref(), None)?,
        _ => None,
    };
    let scaling_beta = match &scaled_dict {
        Some(d) => f64_of(d, "llama_4_scaling_beta")?
            .map(|beta| {
                let orig = size_of(d, "original_max_position_embeddings")?.ok_or(Error::MissingKey("original_max_position_embeddings"))?;
                Ok::<_, Error>(QueryTemperature::ministral3(beta, orig))
            })
            .transpose()?,
        None => None,
    };
    let qk_norm = qk_norm_of(&root, &model_type)?;
    let gated = matches!(model_type.as_str(), "qwen3_next" | "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text");

    let kinds: Vec<LayerAttention> = match root.get("layer_types") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(LayerAttention::Full),
                Some("sliding_attention") => window.map(LayerAttention::Sliding).ok_or(Error::MissingKey("sliding_window")),
                Some("chunked_attention") => chunk.map(LayerAttention::Chunked).ok_or(Error::MissingKey("attention_chunk_size")),
                Some("linear_attention") => Ok(LayerAttention::Linear),
                Some("conv") => Ok(LayerAttention::Conv),
                _ => Err(bad("layer_types", format!("unknown layer type {t}"))),
            })
            .collect::<Result<_>>()?,
        Some(Value::Null) | None => {
            let n = n.ok_or(Error::MissingKey("num_hidden_layers"))?;
            let every = |k: usize, i: usize| !(i + 1).is_multiple_of(k);
            let sliding = |slide: bool| match (slide, window) {
                (false, _) => Ok(LayerAttention::Full),
                (true, Some(w)) => Ok(LayerAttention::Sliding(w)),
                (true, None) => Err(Error::MissingKey("sliding_window")),
            };
            match model_type.as_str() {
                _ if llama4 => (0..n)
                    .map(|i| match chunk {
                        Some(c) if rope_of(i) => LayerAttention::Chunked(c),
                        _ => LayerAttention::Full,
                    })
                    .collect(),
                "gemma2" | "gpt_oss" | "vaultgemma" => (0..n).map(|i| sliding(every(2, i))).collect::<Result<_>>()?,
                // A full layer every 5th.
                t if t.starts_with("gemma3n") => (0..n).map(|i| sliding(every(5, i))).collect::<Result<_>>()?,
                "gemma3" | "gemma3_text" => {
                    let k = size_of(&root, "sliding_window_pattern")?.unwrap_or(6);
                    (0..n).map(|i| sliding(every(k, i))).collect::<Result<_>>()?
                }
                "cohere2" | "cohere2_moe" => {
                    let k = size_of(&root, "sliding_window_pattern")?.unwrap_or(4);
                    (0..n).map(|i| sliding(every(k, i))).collect::<Result<_>>()?
                }
                // Sliding on the NoPE layers, when the window is used (off by default).
                "smollm3" => (0..n).map(|i| sliding(window.is_some() && !rope_of(i))).collect::<Result<_>>()?,
                "qwen3_next" | "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text" => {
                    let k = size_of(&root, "full_attention_interval")?.unwrap_or(4);
                    (0..n).map(|i| if every(k, i) { LayerAttention::Linear } else { LayerAttention::Full }).collect()
                }
                // A full layer every 6th, and the last one full whatever the pattern says.
                t if gemma4_family(t) => {
                    (0..n).map(|i| sliding(every(6, i) && i + 1 != n)).collect::<Result<_>>()?
                }
                // Attention at `full_attn_idxs` (every layer when absent), convolutions elsewhere.
                "lfm2" | "lfm2_moe" | "lfm2_vl" => match root.get("full_attn_idxs") {
                    None | Some(Value::Null) => vec![LayerAttention::Full; n],
                    Some(Value::Array(idx)) => {
                        let idx: Vec<u64> = idx.iter().map(|v| v.as_u64().ok_or_else(|| bad("full_attn_idxs", format!("entry {v} is not an index")))).collect::<Result<_>>()?;
                        (0..n).map(|i| if idx.contains(&(i as u64)) { LayerAttention::Full } else { LayerAttention::Conv }).collect()
                    }
                    Some(other) => return Err(bad("full_attn_idxs", format!("expected a list, got {other}"))),
                },
                // Full at 2 mod 4, sliding at 0 mod 4 (layer 0 excepted), convolutions elsewhere.
                "lfm3" | "lfm3_vl" => (0..n)
                    .map(|i| match i % 4 {
                        2 => Ok(LayerAttention::Full),
                        0 if i > 0 => sliding(true),
                        _ => Ok(LayerAttention::Conv),
                    })
                    .collect::<Result<_>>()?,
                "mistral" | "mixtral" | "phi3" | "starcoder2" => vec![sliding(window.is_some())?; n],
                _ if window.is_some() => {
                    return Err(bad("layer_types", format!("{model_type:?} sets sliding_window, and which of its layers slide is model-specific: give layer_types")))
                }
                _ => vec![LayerAttention::Full; n],
            }
        }
        Some(other) => return Err(bad("layer_types", format!("expected a list, got {other}"))),
    };
    if let Some(n) = n.filter(|&n| n != kinds.len()) {
        return Err(bad("layer_types", format!("{} entries for {n} layers", kinds.len())));
    }
    let names: Vec<&str> = kinds.iter().map(|k| k.layer_type()).collect();
    let k_eq_v = flag(&root, "attention_k_eq_v")?.unwrap_or(false);
    let own = overrides(&root, &model_type, &names, k_eq_v)?;
    let layer_heads = own.iter().map(|o| heads(o, &root, &model_type)).collect::<Result<Vec<_>>>()?;
    let rope_dict = if model_type.starts_with("deepseek") || root.contains_key("qk_rope_head_dim") {
        effective_rope_dict(&top, &root, defaults_of(&top, &root).as_ref(), None)?
    } else {
        None
    };
    let layer_scale = scale(&root, &model_type, rope_dict.as_ref())?;
    let layer_softcap = softcap(&root, &model_type)?;
    let v_norm = v_norm_of(&root, &model_type)?;
    let kv_sources = kv_sharing(&root, &model_type, &names)?;
    let head_gate = model_type.starts_with("lfm3") && flag(&root, "use_attention_gate")?.unwrap_or(true);
    Ok(kinds
        .into_iter()
        .enumerate()
        .map(|(i, attention)| {
            let rope = if rope_if_sliding { matches!(attention, LayerAttention::Sliding(_)) } else { rope_of(i) };
            let query_temperature = temperature.filter(|_| !rope).or(scaling_beta);
            // Llama 4's NoPE layers have no norm, nor do linear-attention layers (their own).
            let attends = !matches!(attention, LayerAttention::Linear | LayerAttention::Conv);
            let normed = (rope || !llama4) && attends;
            HfLayer {
                attention,
                rope,
                query_temperature,
                qk_norm: qk_norm.filter(|_| normed),
                gated_query: gated && attends,
                heads: layer_heads[i].filter(|_| attends),
                scale: layer_scale.filter(|_| attends),
                softcap: layer_softcap.filter(|_| attends),
                v_norm: v_norm.filter(|_| attends),
                value_is_key: k_eq_v && attention == LayerAttention::Full,
                kv_shared_from: kv_sources[i],
                head_gate: head_gate && attends,
            }
        })
        .collect())
}

/// Which earlier layer each layer takes its K and V from (transformers' `kv_sharing_modes`):
/// the last `num_kv_shared_layers` layers of Gemma 3n and Gemma 4 read what the last layer of
/// their type before them stored.
fn kv_sharing(root: &Obj, model_type: &str, types: &[&str]) -> Result<Vec<Option<usize>>> {
    let default = match model_type {
        t if t.starts_with("gemma3n") => 15,
        t if gemma4_family(t) => 0,
        _ => return Ok(vec![None; types.len()]),
    };
    let shared = usize_of(root, "num_kv_shared_layers")?.unwrap_or(default);
    let n = types.len();
    if shared > n {
        return Err(bad("num_kv_shared_layers", format!("{shared} of {n} layers")));
    }
    let first = n - shared;
    (0..n)
        .map(|i| {
            if i < first {
                return Ok(None);
            }
            match (0..first).rev().find(|&j| types[j] == types[i]) {
                Some(j) => Ok(Some(j)),
                None => Err(bad("num_kv_shared_layers", format!("no layer before {first} of type {} to share K and V from", types[i]))),
            }
        })
        .collect()
}
