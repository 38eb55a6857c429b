//! Bad `config.json` files are refused with a typed [`Error`] that names the offending key —
//! never a panic, never a silently wrong schedule (SPEC §2, last paragraph).

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rope_attn::{Error, RopeConfig};
use serde_json::{json, Value};

fn parse(v: &Value) -> Result<RopeConfig, Error> {
    RopeConfig::from_hf_config_json(&v.to_string())
}

/// A minimal valid config around a `rope_scaling` block (head_dim 64).
fn with_scaling(scaling: Value) -> Value {
    json!({
        "hidden_size": 512,
        "num_attention_heads": 8,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": scaling,
    })
}

fn phi3() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/phi-3-mini-128k-instruct.json")).unwrap()
}

fn gemma3() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/gemma-3-12b-it-text-transformers5.json"))
        .unwrap()
}

#[track_caller]
fn assert_invalid(r: Result<RopeConfig, Error>, key: &str) {
    match r {
        Err(Error::InvalidValue { key: k, reason }) => {
            assert_eq!(k, key, "wrong key named ({reason})");
            let msg = Error::InvalidValue { key: k.clone(), reason }.to_string();
            assert!(msg.contains(key), "message does not name `{key}`: {msg}");
        }
        other => panic!("expected InvalidValue naming `{key}`, got {other:?}"),
    }
}

#[track_caller]
fn assert_parameter(r: Result<RopeConfig, Error>, key: &str) {
    match r {
        Err(e @ Error::Parameter { name, .. }) => {
            assert_eq!(name, key);
            assert!(e.to_string().contains(key), "{e}");
        }
        other => panic!("expected Parameter naming `{key}`, got {other:?}"),
    }
}

#[track_caller]
fn assert_missing(r: Result<RopeConfig, Error>, key: &str) {
    match r {
        Err(e @ Error::MissingKey(k)) => {
            assert_eq!(k, key);
            assert!(e.to_string().contains(key), "{e}");
        }
        other => panic!("expected MissingKey({key}), got {other:?}"),
    }
}

#[test]
fn the_valid_base_configs_parse() {
    // Every negative test below mutates one of these; they must be valid to begin with.
    for s in [
        json!({"type": "linear", "factor": 2.0}),
        json!({"rope_type": "dynamic", "factor": 2.0}),
        json!({"type": "ntk", "factor": 2.0}),
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}),
        json!({"rope_type": "longrope", "short_factor": vec![1.0; 32], "long_factor": vec![2.0; 32],
               "original_max_position_embeddings": 1024}),
    ] {
        let cfg = parse(&with_scaling(s.clone())).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(cfg.rotary_dim, 64);
        cfg.schedule(Some(8192)).unwrap();
    }
    RopeConfig::from_hf_config_json(&phi3()).unwrap();
}

/// Gemma 4's and LFM3's proportional RoPE: pairs across the whole head, the first
/// `⌊factor·d/2⌋` turning at `theta^(-2i/d) / factor`, the rest with frequency 0; its factor read
/// from the rope dict only; bad factors refused.
#[test]
fn proportional_rope_spans_the_head_and_zeroes_the_rest() {
    let cfg = parse(&json!({"hidden_size": 512, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25, "factor": 2.0}})).unwrap();
    let s = cfg.schedule(None).unwrap();
    assert_eq!((s.rope_type, s.rotary_dim, s.inv_freq.len()), ("proportional", 128, 64));
    for (i, &f) in s.inv_freq.iter().enumerate() {
        let want = if i < 16 { 1.0 / 1e6f64.powf((2 * i) as f64 / 128.0) / 2.0 } else { 0.0 };
        assert_eq!(f, want, "pair {i}");
    }
    // Without a factor in the dict, every pair turns (the top-level factor is not read).
    let all = parse(&json!({"hidden_size": 512, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6}})).unwrap().schedule(None).unwrap();
    assert!(all.inv_freq.iter().all(|&f| f > 0.0));
    for bad in [json!(1.5), json!(-0.25)] {
        let r = parse(&json!({"hidden_size": 512, "num_attention_heads": 4, "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": bad}}));
        assert!(matches!(r, Err(Error::InvalidValue { ref key, .. }) if key == "partial_rotary_factor"), "{r:?}");
    }
    let r = parse(&json!({"hidden_size": 512, "num_attention_heads": 4, "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 0.0}}));
    assert!(matches!(r, Err(Error::Parameter { name: "factor", .. }) | Err(Error::InvalidValue { .. })), "{r:?}");
}

#[test]
fn unknown_rope_type() {
    for (key, t) in [("type", "fancy"), ("rope_type", "yarn2"), ("rope_type", "")] {
        let r = parse(&with_scaling(json!({key: t, "factor": 2.0})));
        assert_eq!(r.unwrap_err(), Error::UnknownRopeType(t.to_string()));
    }
    // transformers-5 form, flat.
    let r = parse(&json!({"hidden_size": 64, "num_attention_heads": 1, "rope_parameters": {"rope_type": "axial", "rope_theta": 1e4}}));
    assert_eq!(r.unwrap_err(), Error::UnknownRopeType("axial".into()));
    assert!(Error::UnknownRopeType("fancy".into()).to_string().contains("fancy"));
}

#[test]
fn missing_required_keys() {
    for t in ["linear", "dynamic", "ntk", "llama3"] {
        let mut s = json!({"rope_type": t, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024});
        s.as_object_mut().unwrap().remove("factor");
        assert_missing(parse(&with_scaling(s)), "factor");
    }
    assert_missing(
        parse(&with_scaling(json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}))),
        "low_freq_factor",
    );
    assert_missing(
        parse(&with_scaling(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 1024}))),
        "high_freq_factor",
    );
    assert_missing(parse(&with_scaling(json!({"rope_type": "longrope", "long_factor": vec![1.0; 32]}))), "short_factor");
    assert_missing(parse(&with_scaling(json!({"rope_type": "longrope", "short_factor": vec![1.0; 32]}))), "long_factor");
    // No head size at all.
    assert_missing(parse(&json!({"num_attention_heads": 8})), "hidden_size");
    assert_missing(parse(&json!({"hidden_size": 512})), "num_attention_heads");
    // Dynamic NTK needs max_position_embeddings; YaRN needs some original length.
    let mut v = with_scaling(json!({"rope_type": "dynamic", "factor": 2.0}));
    v.as_object_mut().unwrap().remove("max_position_embeddings");
    assert_missing(parse(&v), "max_position_embeddings");
    let mut v = with_scaling(json!({"rope_type": "yarn", "factor": 2.0}));
    v.as_object_mut().unwrap().remove("max_position_embeddings");
    assert_missing(parse(&v), "original_max_position_embeddings");
}

#[test]
fn non_positive_factor_and_base() {
    for t in ["linear", "dynamic", "ntk", "yarn", "llama3", "longrope"] {
        for bad in [0.0, -1.0, -0.5] {
            let s = json!({"rope_type": t, "factor": bad, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024,
                           "short_factor": vec![1.0; 32], "long_factor": vec![1.0; 32]});
            assert_parameter(parse(&with_scaling(s)), "factor");
        }
    }
    for bad in [0.0, -10000.0] {
        let mut v = with_scaling(json!({"type": "linear", "factor": 2.0}));
        v["rope_theta"] = json!(bad);
        assert_parameter(parse(&v), "rope_theta");
    }
    let mut v = json!({"hidden_size": 512, "num_attention_heads": 8, "rotary_emb_base": -1});
    assert_parameter(parse(&v), "rope_theta");
    v["rotary_emb_base"] = json!(10000);
    parse(&v).unwrap();
    // YaRN's other scalars.
    let s = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": -32});
    assert_parameter(parse(&with_scaling(s)), "beta_fast");
    let s = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": -1.0});
    assert_parameter(parse(&with_scaling(s)), "attention_factor");
    let s = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024});
    assert_parameter(parse(&with_scaling(s)), "low_freq_factor");
}

#[test]
fn nan_and_infinity_as_python_writes_them() {
    // Python's json.dump writes float('nan') as a bare NaN, which is not JSON: the parser must
    // still say which key holds it.
    let cases = [
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "rope_scaling": {"type": "linear", "factor": NaN}}"#, "factor"),
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "rope_scaling": {"type": "linear", "factor": Infinity}}"#, "factor"),
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "rope_scaling": {"type": "linear", "factor": -Infinity}}"#, "factor"),
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "rope_theta": NaN}"#, "rope_theta"),
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "partial_rotary_factor": NaN}"#, "partial_rotary_factor"),
        (r#"{"hidden_size": NaN, "num_attention_heads": 8}"#, "hidden_size"),
        (r#"{"hidden_size": 512, "num_attention_heads": 8, "max_position_embeddings": 4096,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": NaN, "mscale_all_dim": 1}}"#, "mscale"),
    ];
    for (json, key) in cases {
        assert_invalid(RopeConfig::from_hf_config_json(json), key);
    }
    // In a list.
    let json = phi3().replacen("1.3500000000000003", "NaN", 1);
    assert_invalid(RopeConfig::from_hf_config_json(&json), "short_factor");
    let json = phi3().replacen("64.76000213623047", "Infinity", 1);
    assert_invalid(RopeConfig::from_hf_config_json(&json), "long_factor");
    // "NaN" inside a string is just a string, not a number.
    let r = RopeConfig::from_hf_config_json(r#"{"hidden_size": 512, "num_attention_heads": 8, "_name_or_path": "NaN Infinity", "rope_theta": 500.0}"#);
    assert_eq!(r.unwrap().theta, 500.0);
}

#[test]
fn odd_or_impossible_rotary_dim() {
    // Fully rotated odd head.
    let r = parse(&json!({"hidden_size": 63 * 4, "num_attention_heads": 4}));
    assert_eq!(r.unwrap_err(), Error::RotaryDim { rotary_dim: 63, head_dim: 63 });
    let r = parse(&json!({"head_dim": 63, "hidden_size": 4096, "num_attention_heads": 32}));
    assert_eq!(r.unwrap_err(), Error::RotaryDim { rotary_dim: 63, head_dim: 63 });
    // Partial rotary rounding to an odd count: 64 * 0.3 = 19.2 -> 19.
    let r = parse(&json!({"hidden_size": 512, "num_attention_heads": 8, "partial_rotary_factor": 0.3}));
    assert_eq!(r.unwrap_err(), Error::RotaryDim { rotary_dim: 19, head_dim: 64 });
    // ... and to nothing at all.
    let r = parse(&json!({"hidden_size": 512, "num_attention_heads": 8, "rotary_pct": 0.01}));
    assert_eq!(r.unwrap_err(), Error::RotaryDim { rotary_dim: 0, head_dim: 64 });
    assert!(Error::RotaryDim { rotary_dim: 19, head_dim: 64 }.to_string().contains("19"));
    // Out of (0, 1]: the key is named.
    for bad in [0.0, -0.25, 1.5] {
        assert_invalid(parse(&json!({"hidden_size": 512, "num_attention_heads": 8, "partial_rotary_factor": bad})), "partial_rotary_factor");
    }
    assert_invalid(parse(&json!({"hidden_size": 512, "num_attention_heads": 0})), "num_attention_heads");
    assert_invalid(parse(&json!({"hidden_size": 512, "num_attention_heads": 8, "head_dim": 0})), "head_dim");
}

#[test]
fn longrope_lists_of_the_wrong_length() {
    let mut cfg: Value = serde_json::from_str(&phi3()).unwrap();
    let short = cfg["rope_scaling"]["short_factor"].as_array().unwrap().clone();
    assert_eq!(short.len(), 48);
    cfg["rope_scaling"]["short_factor"] = Value::Array(short[..47].to_vec());
    assert_invalid(parse(&cfg), "short_factor");
    let mut cfg: Value = serde_json::from_str(&phi3()).unwrap();
    cfg["rope_scaling"]["long_factor"].as_array_mut().unwrap().push(json!(1.0));
    assert_invalid(parse(&cfg), "long_factor");
    let mut cfg: Value = serde_json::from_str(&phi3()).unwrap();
    cfg["rope_scaling"]["long_factor"] = json!([]);
    assert_invalid(parse(&cfg), "long_factor");
    // Right length, wrong contents.
    for bad in [json!(0.0), json!(-1.0), json!("1.0"), json!(null), json!([1.0])] {
        let mut cfg: Value = serde_json::from_str(&phi3()).unwrap();
        cfg["rope_scaling"]["short_factor"][3] = bad.clone();
        assert_invalid(parse(&cfg), "short_factor");
    }
    let mut cfg: Value = serde_json::from_str(&phi3()).unwrap();
    cfg["rope_scaling"]["short_factor"] = json!(1.0);
    assert_invalid(parse(&cfg), "short_factor");
}

#[test]
fn per_layer_config_needs_a_layer_type() {
    let json = gemma3();
    match RopeConfig::from_hf_config_json(&json) {
        Err(e @ Error::LayerType { requested: None, .. }) => {
            let Error::LayerType { available, .. } = &e else { unreachable!() };
            assert_eq!(available, &vec!["full_attention".to_string(), "sliding_attention".to_string()]);
            assert!(e.to_string().contains("full_attention"), "{e}");
        }
        other => panic!("expected LayerType, got {other:?}"),
    }
    match RopeConfig::from_hf_config_json_layer(&json, Some("chunked_attention")) {
        Err(e @ Error::LayerType { requested: Some(_), .. }) => assert!(e.to_string().contains("chunked_attention"), "{e}"),
        other => panic!("expected LayerType, got {other:?}"),
    }
    assert_eq!(RopeConfig::hf_layer_types(&json).unwrap(), vec!["full_attention", "sliding_attention"]);
    let full = RopeConfig::from_hf_config_json_layer(&json, Some("full_attention")).unwrap();
    let sliding = RopeConfig::from_hf_config_json_layer(&json, Some("sliding_attention")).unwrap();
    assert_eq!((full.theta, sliding.theta), (1e6, 1e4));
    assert_eq!(full.scaling.name(), "linear");
    assert_eq!(sliding.scaling.name(), "default");
    // A single-schedule config ignores the layer type.
    assert!(RopeConfig::from_hf_config_json_layer(&phi3(), Some("full_attention")).is_ok());
}

#[test]
fn malformed_json_and_wrong_types() {
    assert!(matches!(RopeConfig::from_hf_config_json("{"), Err(Error::Json(_))));
    assert!(matches!(RopeConfig::from_hf_config_json(""), Err(Error::Json(_))));
    assert!(matches!(RopeConfig::from_hf_config_json("[1, 2]"), Err(Error::Json(_))));
    assert!(matches!(RopeConfig::from_hf_config_json("NaN"), Err(Error::Json(_))));
    assert_invalid(parse(&with_scaling(json!({"type": "linear", "factor": "2"}))), "factor");
    assert_invalid(parse(&with_scaling(json!({"type": 3, "factor": 2.0}))), "rope_type");
    assert_invalid(parse(&with_scaling(json!("linear"))), "rope_scaling");
    assert_invalid(parse(&json!({"hidden_size": 512, "num_attention_heads": 8, "rope_parameters": [1]})), "rope_parameters");
    assert_invalid(parse(&json!({"hidden_size": "512", "num_attention_heads": 8})), "hidden_size");
    assert_invalid(parse(&json!({"hidden_size": 512.5, "num_attention_heads": 8})), "hidden_size");
    assert_invalid(parse(&json!({"hidden_size": -512, "num_attention_heads": 8})), "hidden_size");
    let s = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": "no"});
    assert_invalid(parse(&with_scaling(s)), "truncate");
    let s = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 1024});
    assert_invalid(parse(&with_scaling(s)), "high_freq_factor");
}

/// Valid configs to mutate: the real ones and the minimal ones above.
fn seeds() -> Vec<Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs");
    let mut out: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect();
    out.push(with_scaling(json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": false})));
    out.push(with_scaling(json!({"type": "ntk", "factor": 2.0})));
    assert!(out.len() >= 10);
    out
}

const KEYS: [&str; 24] = [
    "rope_type", "type", "factor", "rope_theta", "rotary_emb_base", "hidden_size", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "partial_rotary_factor", "rotary_pct", "max_position_embeddings",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
    "truncate", "low_freq_factor", "high_freq_factor", "short_factor", "long_factor", "rope_scaling",
];

fn random_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..17) {
        0 => Value::Null,
        1 => json!(0),
        2 => json!(-1),
        3 => json!(rng.random_range(-10.0..10.0)),
        4 => json!(1e300),
        5 => json!(1e-300),
        6 => json!(u64::MAX),
        7 => json!(rng.random_range(0..70000)),
        8 => json!("yarn"),
        9 => json!(["dynamic", "linear", "ntk", "llama3", "longrope", "su", "default", "bogus"].choose(rng).unwrap()),
        10 => json!([]),
        11 => json!({}),
        12 => json!(true),
        13 => json!(vec![rng.random_range(0.5..3.0); rng.random_range(0..70)]),
        14 => json!(f64::MIN_POSITIVE),
        15 => json!(99_999_999_999_999u64),
        _ => json!(0.5),
    }
}

/// Set, replace or delete a random key at the top level or inside the rope dict.
fn mutate(v: &mut Value, rng: &mut StdRng) {
    let key = *KEYS.choose(rng).unwrap();
    let target = if rng.random_bool(0.5) {
        let inner = ["rope_scaling", "rope_parameters"].into_iter().find(|k| v[*k].is_object());
        match inner {
            Some(k) => &mut v[k],
            None => v,
        }
    } else {
        v
    };
    let Some(obj) = target.as_object_mut() else { return };
    if rng.random_bool(0.2) {
        obj.remove(key);
    } else {
        obj.insert(key.to_string(), random_value(rng));
    }
}

/// Text-level damage: non-finite literals, truncation, byte noise.
fn damage(text: &str, rng: &mut StdRng) -> String {
    let mut t = text.to_string();
    match rng.random_range(0..4) {
        0 => {
            let lit = ["NaN", "Infinity", "-Infinity"].choose(rng).unwrap();
            let nums: Vec<usize> = t.match_indices(": ").map(|(i, _)| i + 2).collect();
            if let Some(&at) = nums.choose(rng) {
                let end = t[at..].find([',', '}', '\n']).map_or(t.len(), |e| at + e);
                t.replace_range(at..end, lit);
            }
        }
        1 => {
            let mut cut = rng.random_range(0..=t.len());
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
        }
        2 => {
            let mut at = rng.random_range(0..=t.len());
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            t.insert(at, *['"', '{', ']', ',', 'N', '-', '\\', 'é'].choose(rng).unwrap());
        }
        _ => {}
    }
    t
}

#[test]
fn random_mutations_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x5eed_c0f1);
    let seeds = seeds();
    let (mut ok, mut refused) = (0usize, 0usize);
    for round in 0..600 {
        let mut v = seeds.choose(&mut rng).unwrap().clone();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut v, &mut rng);
        }
        let text = damage(&serde_json::to_string_pretty(&v).unwrap(), &mut rng);
        let layers = ["full_attention", "sliding_attention", "nope"];
        let layer = if rng.random_bool(0.3) { Some(*layers.choose(&mut rng).unwrap()) } else { None };
        let seq_len = [None, Some(0), Some(1), Some(4097), Some(1 << 20), Some(usize::MAX)][rng.random_range(0..6)];
        let outcome = std::panic::catch_unwind(|| {
            let cfg = RopeConfig::from_hf_config_json_layer(&text, layer)?;
            let s = cfg.schedule(seq_len)?;
            Ok::<_, Error>((cfg, s))
        });
        match outcome {
            Err(_) => panic!("round {round}: parsing panicked on\n{text}\nlayer {layer:?} seq_len {seq_len:?}"),
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(Ok((cfg, s))) => {
                // Accepted: the schedule must be usable as it stands.
                assert_eq!(s.inv_freq.len() * 2, s.rotary_dim, "round {round}");
                assert!(s.rotary_dim > 0 && s.rotary_dim % 2 == 0 && s.rotary_dim <= cfg.head_dim, "round {round}");
                assert!(
                    s.inv_freq.iter().all(|f| f.is_finite() && *f >= 0.0) && s.attention_factor.is_finite() && s.attention_factor > 0.0,
                    "round {round}: accepted config gives an unusable schedule {s:?}\n{text}"
                );
                ok += 1;
            }
        }
    }
    // The mutations must exercise both outcomes, or this test proves little.
    assert!(ok > 50 && refused > 50, "{ok} accepted, {refused} refused");
}

#[test]
fn absurd_dimensions_are_refused_not_allocated() {
    // A head dimension read from a hostile or corrupt config must not make the schedule try to
    // allocate terabytes (an allocation failure aborts the process: it is not even a panic).
    for v in [
        json!({"head_dim": 999_999_999_999_998u64, "hidden_size": 4096, "num_attention_heads": 32}),
        json!({"hidden_size": 999_999_999_999_998u64, "num_attention_heads": 1}),
        json!({"qk_rope_head_dim": 1u64 << 40, "hidden_size": 4096, "num_attention_heads": 32}),
    ] {
        assert_invalid(parse(&v), "head_dim");
    }
    // The largest real heads (512) are fine.
    let cfg = parse(&json!({"head_dim": 512, "hidden_size": 4096, "num_attention_heads": 32})).unwrap();
    assert_eq!(cfg.schedule(None).unwrap().inv_freq.len(), 256);
}

/// Which QK norm each model type's config asks for (`hf_layers`' `HfQkNorm`), as transformers'
/// modeling code applies it: the scope, the weight form, eps (the config's or the class's
/// default), which layers; the flags that switch it; the configs refused.
#[test]
fn qk_norm_by_model_type() {
    use rope_attn::{hf_layers, HfQkNorm, NormScope::*, NormWeight};
    use NormWeight::{OnePlus, Plain};
    let norms = |v: Value| hf_layers(&v.to_string()).map(|l| l.iter().map(|l| l.qk_norm).collect::<Vec<_>>());
    let n = |eps, scope, weight| Some(HfQkNorm { eps, scope, weight });
    let cases = [
        (json!({"model_type": "qwen3", "num_hidden_layers": 2}), vec![n(1e-6, Head, Plain); 2]),
        (json!({"model_type": "qwen3_moe", "num_hidden_layers": 1, "rms_norm_eps": 1e-5}), vec![n(1e-5, Head, Plain)]),
        (json!({"model_type": "qwen3_vl", "text_config": {"model_type": "qwen3_vl_text", "num_hidden_layers": 1}}), vec![n(1e-6, Head, Plain)]),
        (json!({"model_type": "gemma3_text", "num_hidden_layers": 1, "sliding_window": 512}), vec![n(1e-6, Head, OnePlus)]),
        (json!({"model_type": "olmo2", "num_hidden_layers": 1}), vec![n(1e-5, Heads, Plain)]),
        (json!({"model_type": "olmoe", "num_hidden_layers": 1, "rms_norm_eps": 1e-6}), vec![n(1e-6, Heads, Plain)]),
        (json!({"model_type": "glm4_moe", "num_hidden_layers": 1}), vec![None]),
        (json!({"model_type": "glm4_moe", "num_hidden_layers": 1, "use_qk_norm": true}), vec![n(1e-5, Head, Plain)]),
        // Qwen3-Next: the linear-attention layers (their own norms) take none.
        (json!({"model_type": "qwen3_next", "num_hidden_layers": 4}), vec![None, None, None, n(1e-6, Head, OnePlus)]),
        // Llama 4: the RoPE layers only; use_qk_norm false switches it off.
        (json!({"model_type": "llama4_text", "num_hidden_layers": 4}), vec![n(1e-5, Head, NormWeight::None); 3].into_iter().chain([None]).collect()),
        (json!({"model_type": "llama4_text", "num_hidden_layers": 1, "use_qk_norm": false}), vec![None]),
        (json!({"model_type": "llama", "num_hidden_layers": 1}), vec![None]),
        (json!({"model_type": "cohere", "num_hidden_layers": 1}), vec![None]),
        // Command R+: a LayerNorm of each head, its weights per head, layer_norm_eps.
        (json!({"model_type": "cohere", "num_hidden_layers": 1, "use_qk_norm": true}), vec![n(1e-5, HeadCentred, Plain)]),
        (json!({"model_type": "cohere", "num_hidden_layers": 1, "use_qk_norm": true, "layer_norm_eps": 1e-6}), vec![n(1e-6, HeadCentred, Plain)]),
        (json!({"model_type": "gemma3n_text", "num_hidden_layers": 5, "num_kv_shared_layers": 0}), vec![n(1e-6, Head, Plain); 5]),
    ];
    for (cfg, want) in cases {
        assert_eq!(norms(cfg.clone()).unwrap(), want, "{cfg}");
    }
    for (cfg, key) in [
        (json!({"model_type": "chameleon", "num_hidden_layers": 1, "use_qk_norm": true}), "use_qk_norm"),
        (json!({"model_type": "cohere", "num_hidden_layers": 1, "use_qk_norm": true, "layer_norm_eps": 0.0}), "layer_norm_eps"),
        (json!({"model_type": "qwen3", "num_hidden_layers": 1, "rms_norm_eps": 0.0}), "rms_norm_eps"),
        (json!({"model_type": "qwen3", "num_hidden_layers": 1, "rms_norm_eps": -1e-6}), "rms_norm_eps"),
        (json!({"model_type": "olmo2", "num_hidden_layers": 1, "rms_norm_eps": 1e-60}), "rms_norm_eps"),
        (json!({"model_type": "llama4_text", "num_hidden_layers": 1, "use_qk_norm": "yes"}), "use_qk_norm"),
    ] {
        match norms(cfg.clone()) {
            Err(Error::InvalidValue { key: k, .. }) => assert_eq!(k, key, "{cfg}"),
            other => panic!("{cfg}: expected an error naming {key}, got {other:?}"),
        }
    }
    // NaN as Python writes it.
    let nan = r#"{"model_type": "qwen3", "num_hidden_layers": 1, "rms_norm_eps": NaN}"#;
    assert!(matches!(hf_layers(nan), Err(Error::InvalidValue { .. }) | Err(Error::Json(_))), "{:?}", hf_layers(nan));
}

/// The gated query: Qwen3-Next's and Qwen3.5's attention layers (text_config or not), never
/// their linear-attention layers, and no other model's.
#[test]
fn gated_query_by_model_type() {
    use rope_attn::hf_layers;
    let gated = |v: Value| hf_layers(&v.to_string()).unwrap().iter().map(|l| l.gated_query).collect::<Vec<_>>();
    let (f, t) = (false, true);
    for (cfg, want) in [
        (json!({"model_type": "qwen3_next", "num_hidden_layers": 4}), vec![f, f, f, t]),
        (json!({"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text", "num_hidden_layers": 2, "full_attention_interval": 2}}), vec![f, t]),
        (json!({"model_type": "qwen3_5_text", "layer_types": ["full_attention", "linear_attention"]}), vec![t, f]),
        (json!({"model_type": "qwen3", "num_hidden_layers": 2}), vec![f, f]),
        (json!({"model_type": "llama4_text", "num_hidden_layers": 4}), vec![f; 4]),
    ] {
        assert_eq!(gated(cfg.clone()), want, "{cfg}");
    }
}

/// Keys a config.json leaves out take its model type's defaults, as transformers' config
/// class fills them in (tests/hf_fixtures.rs checks all of them against transformers): a few
/// spelled out. Unknown model types keep the generic defaults (theta 1e4, the whole head).
#[test]
fn model_type_defaults_fill_missing_rope_keys() {
    use rope_attn::RopeConfig;
    let sizes = |mt: &str, extra: Value| {
        let mut v = json!({"model_type": mt, "hidden_size": 1024, "num_attention_heads": 8, "head_dim": 128, "max_position_embeddings": 4096});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        RopeConfig::from_hf_config_json(&v.to_string()).unwrap().schedule(None).unwrap()
    };
    let none = json!({});
    let theta = |s: &rope_attn::RopeSchedule| 1.0 / s.inv_freq[1].powf(s.rotary_dim as f64 / 2.0);
    for (mt, want_theta, want_rotary) in
        [("llama", 1e4, 128), ("llama4_text", 5e5, 128), ("qwen2_vl_text", 1e6, 128), ("glm4_moe", 1e4, 64), ("qwen3_next", 1e4, 32), ("not_a_model", 1e4, 128)]
    {
        let s = sizes(mt, none.clone());
        assert_eq!(s.rotary_dim, want_rotary, "{mt}");
        assert!((theta(&s) / want_theta - 1.0).abs() < 1e-9, "{mt}: theta {}", theta(&s));
    }
    // GPT-OSS without a rope dict: its class's YaRN (factor 32 over 4096, so attention factor 0.1 ln 32 + 1).
    let g = sizes("gpt_oss", none.clone());
    assert_eq!(g.rope_type, "yarn");
    assert!((g.attention_factor - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12, "{}", g.attention_factor);
    // GPT-NeoX reads rotary_pct, not a top-level partial_rotary_factor.
    assert_eq!(sizes("gpt_neox", json!({"partial_rotary_factor": 0.5})).rotary_dim, 32);
    assert_eq!(sizes("gpt_neox", json!({"rotary_pct": 0.5})).rotary_dim, 64);
    // Llama's unscaled rotation takes the whole head whatever the factor says; scaled, it honours it.
    assert_eq!(sizes("llama", json!({"partial_rotary_factor": 0.5})).rotary_dim, 128);
    assert_eq!(sizes("llama", json!({"partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})).rotary_dim, 64);
    // A config's own keys win over the class's defaults.
    assert_eq!(sizes("glm4_moe", json!({"partial_rotary_factor": 1.0})).rotary_dim, 128);
    assert!((theta(&sizes("llama4_text", json!({"rope_theta": 1e4}))) / 1e4 - 1.0).abs() < 1e-9);
}

/// Gemma 3's configs as the Hub holds them (transformers 4's form: `rope_theta`,
/// `rope_local_base_freq` and a flat `rope_scaling`, here under a `text_config` as in
/// google/gemma-3-12b-it) give each layer type the schedule of the dict-per-layer-type form
/// transformers 5 writes for the same model (examples/configs/gemma-3-12b-it-text-transformers5.json):
/// the linear factor on the full layers only, the sliding ones unscaled at their own theta.
#[test]
fn gemma3_legacy_config_spreads_over_its_layer_types() {
    use rope_attn::{hf_layers, RopeConfig};
    let new = std::fs::read_to_string("examples/configs/gemma-3-12b-it-text-transformers5.json").unwrap();
    let mut text: serde_json::Map<String, Value> = serde_json::from_str(&new).unwrap();
    text.remove("rope_parameters").expect("the transformers 5 form has rope_parameters");
    text.insert("rope_theta".into(), json!(1e6));
    text.insert("rope_local_base_freq".into(), json!(1e4));
    text.insert("rope_scaling".into(), json!({"factor": 8.0, "rope_type": "linear"}));
    let legacy = json!({"model_type": "gemma3", "text_config": text}).to_string();
    assert_eq!(RopeConfig::hf_layer_types(&legacy).unwrap(), ["sliding_attention", "full_attention"]);
    for lt in ["sliding_attention", "full_attention"] {
        let a = RopeConfig::from_hf_config_json_layer(&new, Some(lt)).unwrap().schedule(None).unwrap();
        let b = RopeConfig::from_hf_config_json_layer(&legacy, Some(lt)).unwrap().schedule(None).unwrap();
        assert_eq!((a.rope_type, &a.inv_freq, a.rotary_dim, a.attention_factor), (b.rope_type, &b.inv_freq, b.rotary_dim, b.attention_factor), "{lt}");
    }
    let full = RopeConfig::from_hf_config_json_layer(&legacy, Some("full_attention")).unwrap().schedule(None).unwrap();
    assert_eq!(full.rope_type, "linear");
    // Which layer: required, as for the transformers 5 form.
    assert!(matches!(RopeConfig::from_hf_config_json(&legacy), Err(Error::LayerType { requested: None, .. })));
    assert_eq!(hf_layers(&legacy).unwrap(), hf_layers(&new).unwrap());
    // Without any rope key, the class's defaults per layer type: 1e6 full, 1e4 sliding.
    let mut bare = text.clone();
    for k in ["rope_theta", "rope_local_base_freq", "rope_scaling"] {
        bare.remove(k);
    }
    let bare = json!({"model_type": "gemma3", "text_config": bare}).to_string();
    let theta = |lt| {
        let s = RopeConfig::from_hf_config_json_layer(&bare, Some(lt)).unwrap().schedule(None).unwrap();
        (1.0 / s.inv_freq[1].powf(s.rotary_dim as f64 / 2.0), s.rope_type)
    };
    let ((ts, rs), (tf, rf)) = (theta("sliding_attention"), theta("full_attention"));
    assert!((ts / 1e4 - 1.0).abs() < 1e-9 && (tf / 1e6 - 1.0).abs() < 1e-9 && rs == "default" && rf == "default", "{ts} {tf}");
}

/// Which layers slide and which rotate, as transformers 5.24's config classes and attention
/// code have it (probed there): Cohere 2 rotates its sliding layers only (its full layers are
/// NoPE; `sliding_window_pattern` 4 and window 4096 by default), SmolLM3 has a NoPE layer every
/// `no_rope_layer_interval` (or as `no_rope_layers` lists them) and slides them only when
/// `use_sliding_window` is set. Layers: S sliding, F full; rope: 1 rotates.
#[test]
fn nope_layers_by_model_type() {
    use rope_attn::{hf_layers, LayerAttention};
    let cases = [
        (json!({"model_type": "cohere2", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 8}), "SSSFSSSF", "11101110", 4096),
        (json!({"model_type": "cohere2", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 6, "sliding_window_pattern": 3, "sliding_window": 512}), "SSFSSF", "110110", 512),
        (json!({"model_type": "cohere2_moe", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 5}), "SSSFS", "11101", 4096),
        (json!({"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 8}), "FFFFFFFF", "11101110", 0),
        (json!({"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 8, "use_sliding_window": true, "sliding_window": 256}), "FFFSFFFS", "11101110", 256),
        (json!({"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 6, "no_rope_layer_interval": 3}), "FFFFFF", "110110", 0),
        (json!({"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 4, "no_rope_layers": [1, 0, 0, 1]}), "FFFF", "1001", 0),
    ];
    for (cfg, kinds, rope, window) in cases {
        let layers = hf_layers(&cfg.to_string()).unwrap_or_else(|e| panic!("{cfg}: {e}"));
        let got_kinds: String = layers.iter().map(|l| if matches!(l.attention, LayerAttention::Sliding(_)) { 'S' } else { 'F' }).collect();
        let got_rope: String = layers.iter().map(|l| if l.rope { '1' } else { '0' }).collect();
        assert_eq!((got_kinds.as_str(), got_rope.as_str()), (kinds, rope), "{cfg}");
        for l in &layers {
            if let LayerAttention::Sliding(w) = l.attention {
                assert_eq!(w, window, "{cfg}");
            }
        }
    }
}
