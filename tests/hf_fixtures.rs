//! rope-attn against Hugging Face transformers itself.
//!
//! `tests/fixtures/hf_rope.json` is written by `tests/fixtures/gen_hf_fixtures.py` (transformers
//! 5.24, forced to float64) from the real `config.json` files in `examples/configs/`. These tests
//! parse the same files with [`RopeConfig::from_hf_config_json_layer`] and demand:
//!
//! * inverse frequencies equal to 1e-12 relative (LongRoPE 1e-6: transformers computes its
//!   exponent in float32, SPEC §2), attention factor to 1e-12, same rotary dim and rope type;
//! * [`reference::rotate`] equal to transformers' `apply_rotary_pos_emb` to 1e-12 absolute;
//! * [`reference::attention`] equal to a torch float64 softmax over transformers-rotated Q/K,
//!   and to transformers' own attention modules (GPT-OSS's sinks, Gemma 2's soft-capping,
//!   Llama 4's chunks, QK norm and query temperature, the QK norms of Qwen3, Gemma 3 and OLMo 2).
//!
//! Every test also asserts how many cases it checked, so an emptied fixture file fails.

use rope_attn::{
    hf_layers, reference, AttentionParams, HfQkNorm, LayerAttention, Layout, MRope, Mask, NormScope, NormWeight, QueryTemperature, RopeConfig, RopeSchedule,
    Rotary,
};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

const FIXTURES: &str = include_str!("fixtures/hf_rope.json");

fn fixtures() -> Value {
    serde_json::from_str(FIXTURES).expect("tests/fixtures/hf_rope.json parses")
}

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join("configs")
}

/// The text of `examples/configs/<name>`, with `override` (an object or null) merged into its
/// top level, as the fixture generator did.
fn config_text(name: &str, override_: &Value) -> String {
    let path = configs_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match override_ {
        Value::Null => text,
        Value::Object(o) => {
            let mut cfg: Map<String, Value> = serde_json::from_str(&text).expect("config is JSON");
            for (k, v) in o {
                cfg.insert(k.clone(), v.clone());
            }
            Value::Object(cfg).to_string()
        }
        other => panic!("override must be an object or null, got {other}"),
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

/// The float list `key` of case `idx` in fixture section `section`, parsed *exactly* from the
/// fixture text. serde_json's default float parsing (without its `float_roundtrip` feature) is
/// not correctly rounded: it misreads about one 17-digit float in ten by an ulp, which at
/// position 2^24 moves an angle by 1e-9 rad. Rust's `str::parse::<f64>` is correctly rounded, and
/// the generator writes one case per line with Python's exact float repr.
fn exact_f64s(section: &str, idx: usize, key: &str) -> Vec<f64> {
    let mut lines = FIXTURES.lines().skip_while(|l| !l.starts_with(&format!(" \"{section}\": [")));
    let header = lines.next().unwrap_or_else(|| panic!("no section {section}"));
    assert!(header.ends_with('['), "{header}");
    let line = lines.nth(idx).unwrap_or_else(|| panic!("{section} has no case {idx}"));
    let start = line.find(&format!("\"{key}\": [")).unwrap_or_else(|| panic!("{section}[{idx}] has no {key}"));
    let body = &line[start + key.len() + 5..];
    let body = &body[..body.find(']').expect("list end")];
    let out: Vec<f64> = body.split(", ").map(|t| t.parse::<f64>().unwrap_or_else(|e| panic!("{t}: {e}"))).collect();
    // Same values as the JSON parse, up to serde_json's one-ulp misreads.
    let loose = f64s(&fixtures()[section][idx][key]);
    assert_eq!(out.len(), loose.len(), "{section}[{idx}].{key}");
    for (a, b) in out.iter().zip(&loose) {
        assert!(a == b || rel_err(*b, *a) <= 2.0 * f64::EPSILON, "{section}[{idx}].{key}: {a} vs {b}");
    }
    out
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("integer")).collect()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().expect("unsigned integer") as usize
}

fn rel_err(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

fn cases<'a>(f: &'a Value, key: &str) -> &'a Vec<Value> {
    f[key].as_array().unwrap_or_else(|| panic!("fixture has no `{key}` list"))
}

#[test]
fn fixture_file_records_its_generator() {
    let f = fixtures();
    assert_eq!(f["generator"], "tests/fixtures/gen_hf_fixtures.py");
    assert!(f["transformers"].as_str().is_some_and(|v| v.starts_with("5.")), "{}", f["transformers"]);
}

#[test]
fn schedules_match_transformers() {
    let f = fixtures();
    let cases = cases(&f, "schedules");
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut types = BTreeSet::new();
    let mut configs = BTreeSet::new();
    for (idx, case) in cases.iter().enumerate() {
        let name = case["config"].as_str().expect("config name");
        let layer = case["layer_type"].as_str();
        let seq_len = case["seq_len"].as_u64().map(|s| s as usize);
        let label = format!("{name} layer={layer:?} seq_len={seq_len:?}");
        let json = config_text(name, &case["override"]);
        let cfg = match RopeConfig::from_hf_config_json_layer(&json, layer) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{label}: does not parse: {e}"));
                continue;
            }
        };
        let s = match cfg.schedule(seq_len) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{label}: schedule fails: {e}"));
                continue;
            }
        };
        let want_type = case["rope_type"].as_str().expect("rope_type");
        let want = exact_f64s("schedules", idx, "inv_freq");
        let tol = case["tolerance"].as_f64().expect("tolerance");
        assert!(tol == 1e-12 || (want_type == "longrope" && tol == 1e-6), "{label}: tolerance {tol}");
        if s.rope_type != want_type {
            failures.push(format!("{label}: rope_type {} != transformers {want_type}", s.rope_type));
        }
        if s.rotary_dim != usize_of(&case["rotary_dim"]) {
            failures.push(format!("{label}: rotary_dim {} != {}", s.rotary_dim, case["rotary_dim"]));
        }
        if s.inv_freq.len() != want.len() || want.len() * 2 != s.rotary_dim {
            failures.push(format!("{label}: {} frequencies, transformers has {}", s.inv_freq.len(), want.len()));
            continue;
        }
        let (worst_i, worst) = s
            .inv_freq
            .iter()
            .zip(&want)
            .map(|(g, w)| rel_err(*g, *w))
            .enumerate()
            .fold((0, 0.0), |acc, (i, e)| if e > acc.1 { (i, e) } else { acc });
        if worst.is_nan() || worst > tol {
            failures.push(format!(
                "{label}: inv_freq[{worst_i}] = {:e}, transformers {:e} (rel err {worst:e} > {tol:e})",
                s.inv_freq[worst_i], want[worst_i]
            ));
        }
        let want_mrope = mrope_of(&case["mrope"]);
        if s.mrope != want_mrope {
            failures.push(format!("{label}: M-RoPE {:?} != transformers' {want_mrope:?}", s.mrope));
        }
        let af = case["attention_factor"].as_f64().expect("attention_factor");
        let af_err = rel_err(s.attention_factor, af);
        if af_err.is_nan() || af_err > 1e-12 {
            failures.push(format!("{label}: attention_factor {} != transformers {af}", s.attention_factor));
        }
        types.insert(want_type.to_string());
        configs.insert(name.to_string());
        checked += 1;
    }
    assert!(failures.is_empty(), "{} of {} schedule cases fail:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(checked >= 24, "only {checked} schedule cases checked");
    for t in ["default", "linear", "dynamic", "ntk", "yarn", "llama3", "longrope"] {
        assert!(types.contains(t), "no fixture case exercises rope_type {t}");
    }
    // Every real config shipped in examples/configs has transformers' numbers checked.
    for entry in std::fs::read_dir(configs_dir()).expect("examples/configs") {
        let file = entry.expect("dir entry").file_name().into_string().expect("utf-8 name");
        if file.ends_with(".json") {
            assert!(configs.contains(&file), "examples/configs/{file} has no fixture case");
        }
    }
}

#[test]
fn dynamic_ntk_fixture_grows_with_sequence_length() {
    // The dynamic cases must actually differ above max_position_embeddings, or the test above
    // would not notice a schedule that ignores seq_len.
    let f = fixtures();
    let dynamic: Vec<&Value> = cases(&f, "schedules").iter().filter(|c| c["rope_type"] == "dynamic").collect();
    assert!(dynamic.len() >= 5, "{} dynamic cases", dynamic.len());
    let at = |len: Option<u64>| {
        dynamic.iter().find(|c| c["seq_len"].as_u64() == len).map(|c| f64s(&c["inv_freq"])).expect("case")
    };
    let base = at(None);
    assert_eq!(at(Some(32768)), base, "at max_position_embeddings dynamic NTK is plain RoPE");
    let long = at(Some(131072));
    assert!(long[long.len() - 1] < base[base.len() - 1] * 0.5, "low frequencies must shrink");
    assert_eq!(long[0], 1.0);

    let cfg = RopeConfig::from_hf_config_json(&config_text("internlm2-chat-1_8b-dynamic.json", &Value::Null)).unwrap();
    let rust = |len| cfg.schedule(len).unwrap().inv_freq;
    assert_eq!(rust(None), rust(Some(2048)), "below the trained length the schedule is fixed");
    assert_ne!(rust(Some(32769)), rust(Some(32768)));
}

/// A fixture's `mrope` entry (null: no M-RoPE).
fn mrope_of(v: &Value) -> Option<MRope> {
    if v.is_null() {
        return None;
    }
    let s = i64s(&v["sections"]);
    Some(MRope { sections: [s[0] as usize, s[1] as usize, s[2] as usize], interleaved: v["interleaved"].as_bool().expect("interleaved") })
}

/// M-RoPE against the models' own rotary embeddings (Qwen2.5-VL's sections, the Qwen3.5 stack's
/// interleaving) and apply_rotary_pos_emb, at text, image and video positions: the reference
/// with the schedule and sections rope-attn parses from the same config.json.
#[test]
fn rotate_mrope_matches_the_models_rotary_embedding() {
    let f = fixtures();
    let cases = cases(&f, "mrope_rotations");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (d, r) = (usize_of(&case["head_dim"]), usize_of(&case["rotary_dim"]));
        let cfg = RopeConfig::from_hf_config_json(&config_text(case["config"].as_str().unwrap(), &Value::Null)).unwrap();
        let sched = cfg.schedule(None).unwrap();
        assert_eq!((sched.rotary_dim, sched.mrope), (r, mrope_of(&case["mrope"])), "{label}");
        let rot = Rotary::from_schedule(&sched, Layout::Half);
        let pos: Vec<[i64; 3]> = case["positions"].as_array().unwrap().iter().map(|p| { let p = i64s(p); [p[0], p[1], p[2]] }).collect();
        assert!(pos.iter().any(|p| p[0] != p[1]) && pos.iter().any(|p| p[1] != p[2]), "{label}: image positions");
        let m = sched.mrope.unwrap();
        for (x, want, heads) in [("q", "q_out", usize_of(&case["q_heads"])), ("k", "k_out", usize_of(&case["k_heads"]))] {
            let (x, want) = (exact_f64s("mrope_rotations", idx, x), exact_f64s("mrope_rotations", idx, want));
            let mut got = x.clone();
            reference::rotate_mrope(&mut got, pos.len(), heads, d, heads * d, &pos, &rot, &m).unwrap();
            // The frequencies agree to a few ulps; at position m an error df moves an angle by m*df.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let t = i / (heads * d);
                let bound = 1e-12 + 4.0 * f64::EPSILON * pos[t].iter().max().copied().unwrap() as f64;
                assert!((g - w).abs() <= bound, "{label}: token {t} {:?} component {}: {g} vs transformers {w}", pos[t], i % d);
            }
        }
    }
    assert_eq!(cases.len(), 2, "both M-RoPE constructions");
}

#[test]
fn longrope_fixture_switches_factors_above_original_length() {
    let f = fixtures();
    let lr: Vec<&Value> = cases(&f, "schedules").iter().filter(|c| c["rope_type"] == "longrope").collect();
    assert!(lr.len() >= 4);
    let at = |len: Option<u64>| lr.iter().find(|c| c["seq_len"].as_u64() == len).map(|c| f64s(&c["inv_freq"])).unwrap();
    assert_eq!(at(None), at(Some(4096)), "short factors up to and at original_max_position_embeddings");
    assert_eq!(at(Some(4097)), at(Some(131072)), "long factors above it");
    assert_ne!(at(Some(4096)), at(Some(4097)));
    // Phi-3's attention factor sqrt(1 + ln(32)/ln(4096)), which the GGUF metadata also records (f32).
    let af = lr[0]["attention_factor"].as_f64().unwrap();
    assert!((af - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-15);
    assert!((af - 1.190238118171692).abs() < 1e-7);
}

#[test]
fn every_example_config_parses_for_every_layer_type() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).expect("examples/configs") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let json = std::fs::read_to_string(&path).unwrap();
        let layers = RopeConfig::hf_layer_types(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if layers.is_empty() {
            let cfg = RopeConfig::from_hf_config_json(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cfg.schedule(None).unwrap();
        } else {
            let err = RopeConfig::from_hf_config_json(&json).unwrap_err();
            assert!(matches!(err, rope_attn::Error::LayerType { requested: None, .. }), "{}: {err:?}", path.display());
            for layer in &layers {
                let cfg = RopeConfig::from_hf_config_json_layer(&json, Some(layer)).unwrap();
                cfg.schedule(None).unwrap();
            }
        }
        n += 1;
    }
    assert!(n >= 10, "only {n} example configs");
}

/// Rotate `x` (`[tokens, heads, d]`) with `rot` and compare with transformers' output.
#[allow(clippy::too_many_arguments)]
fn check_rotation(label: &str, x: &[f64], want: &[f64], heads: usize, d: usize, pos: &[i64], rot: &Rotary, tol: &dyn Fn(usize, usize) -> f64) -> f64 {
    assert_eq!(x.len(), pos.len() * heads * d, "{label}: fixture shape");
    assert_eq!(want.len(), x.len(), "{label}: fixture shape");
    let mut got = x.to_vec();
    reference::rotate(&mut got, pos.len(), heads, d, heads * d, pos, rot).unwrap();
    let mut worst: f64 = 0.0;
    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
        let (t, c) = (idx / (heads * d), idx % d);
        let err = (g - w).abs();
        assert!(err <= tol(t, c), "{label}: token {t} (position {}) component {c}: {g} vs transformers {w} (|err| {err:e} > {:e})", pos[t], tol(t, c));
        worst = worst.max(err);
    }
    worst
}

#[test]
fn rotate_matches_apply_rotary_pos_emb() {
    let f = fixtures();
    let cases = cases(&f, "rotations");
    let mut partial = 0;
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (d, r) = (usize_of(&case["head_dim"]), usize_of(&case["rotary_dim"]));
        let (hq, hk) = (usize_of(&case["q_heads"]), usize_of(&case["k_heads"]));
        let pos = i64s(&case["positions"]);
        assert!(pos.contains(&(1 << 24)), "{label}: positions must reach 2^24");
        assert_eq!(case["layout"], "half");
        let exact = |key| exact_f64s("rotations", idx, key);
        let (q, k, q_out, k_out) = (exact("q"), exact("k"), exact("q_out"), exact("k_out"));
        let af = case["attention_factor"].as_f64().unwrap();
        if r < d {
            partial += 1;
            // transformers leaves the pass-through part alone; so must we.
            for t in 0..pos.len() {
                for h in 0..hq {
                    let s = (t * hq + h) * d;
                    assert_eq!(&q_out[s + r..s + d], &q[s + r..s + d], "{label}: pass-through changed");
                }
            }
        }

        // 1. With transformers' own frequencies the angle m*f is the same f64 product on both
        //    sides; only sin/cos and the final multiply-adds may differ, by a few ulps.
        let hf = Rotary { inv_freq: exact("inv_freq"), rotary_dim: r, layout: Layout::Half, attention_factor: af };
        let tight = |_: usize, _: usize| 1e-12;
        check_rotation(label, &q, &q_out, hq, d, &pos, &hf, &tight);
        check_rotation(label, &k, &k_out, hk, d, &pos, &hf, &tight);

        // 2. With the schedule rope-attn computes from the same config.json. The frequencies
        //    agree to a few ulps, but at position m a frequency error df moves the angle by m*df,
        //    so the bound grows with the position: |err| <= |pair| * af * m * |df| + 1e-12.
        let cfg = RopeConfig::from_hf_config_json(&config_text(case["config"].as_str().unwrap(), &Value::Null)).unwrap();
        let sched = cfg.schedule(None).unwrap();
        let ours = Rotary::from_schedule(&sched, Layout::Half);
        let df: Vec<f64> = ours.inv_freq.iter().zip(&hf.inv_freq).map(|(a, b)| (a - b).abs()).collect();
        for (x, want, heads) in [(&q, &q_out, hq), (&k, &k_out, hk)] {
            let bound = |t: usize, c: usize| {
                if c >= r {
                    return 0.0; // pass-through: bit-identical
                }
                let i = if c < r / 2 { c } else { c - r / 2 };
                let base = (t * heads) * d; // any head: use the largest pair norm over heads
                let pair = (0..heads)
                    .map(|h| {
                        let s = base + h * d;
                        x[s + i].hypot(x[s + i + r / 2])
                    })
                    .fold(0.0, f64::max);
                2.0 * pair * af * pos[t] as f64 * df[i] + 1e-12
            };
            check_rotation(label, x, want, heads, d, &pos, &ours, &bound);
        }
    }
    assert_eq!(cases.len(), 3, "rotation cases");
    assert_eq!(partial, 1, "one partial-rotary (GPT-NeoX) case");
}

/// The reference's O and LSE against a fixture's, within `tol` (relative above magnitude 1).
#[track_caller]
fn assert_matches(label: &str, o: &reference::AttentionOutput, out: &[f64], lse: &[f64], tol: f64) {
    for (what, got, want) in [("out", &o.out, out), ("lse", &o.lse, lse)] {
        assert_eq!(got.len(), want.len(), "{label} {what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "{label}: {what}[{i}] {g} vs transformers {w}");
        }
    }
}

/// GPT-OSS's learned sinks: the reference (YaRN from the config.json as rope-attn parses it,
/// `sink_logits`, a sliding window) against transformers' gpt_oss attention in float64.
#[test]
fn attention_with_learned_sinks_matches_gpt_oss() {
    let f = fixtures();
    let cases = cases(&f, "sink_attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let pos = i64s(&case["positions"]);
        let cfg = RopeConfig::from_hf_config_json(&config_text(case["config"].as_str().unwrap(), &Value::Null)).unwrap();
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(Rotary::from_schedule(&cfg.schedule(None).unwrap(), Layout::Half));
        p.mask = Mask { causal: true, window: case["window"].as_u64().map(|w| w as usize), sinks: 0, chunk: None };
        let exact = |key| exact_f64s("sink_attention", idx, key);
        p.sink_logits = Some(exact("sinks"));
        let o = reference::attention(&exact("q"), &exact("k"), &exact("v"), &pos, &pos, &p).unwrap();
        // YaRN's frequencies agree with transformers' to a few ulps; at positions < 16 that moves
        // no angle by more than ~1e-14.
        assert_matches(label, &o, &exact("out"), &exact("lse"), 1e-12);
        // The sinks matter here: without them the answer moves.
        p.sink_logits = None;
        let none = reference::attention(&exact("q"), &exact("k"), &exact("v"), &pos, &pos, &p).unwrap();
        assert!(none.out.iter().zip(&o.out).any(|(a, b)| (a - b).abs() > 1e-3), "{label}");
    }
    assert_eq!(cases.len(), 1, "sink attention cases");
}

/// Gemma 2's logit soft-capping: the reference (cap and scale as its config.json gives them)
/// against transformers' gemma2 attention in float64, with scores large enough to bend.
#[test]
fn attention_with_softcap_matches_gemma2() {
    let f = fixtures();
    let cases = cases(&f, "softcap_attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let cfg: Value = serde_json::from_str(&config_text(case["config"].as_str().unwrap(), &Value::Null)).unwrap();
        let (cap, scalar) = (cfg["attn_logit_softcapping"].as_f64().unwrap(), cfg["query_pre_attn_scalar"].as_f64().unwrap());
        assert_eq!((cap, 1.0 / scalar.sqrt()), (case["softcap"].as_f64().unwrap(), case["scale"].as_f64().unwrap()), "{label}");
        let pos = i64s(&case["positions"]);
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(Rotary::from_schedule(&RopeSchedule::plain(case["rope_theta"].as_f64().unwrap(), d).unwrap(), Layout::Half));
        p.mask = Mask { causal: true, window: case["window"].as_u64().map(|w| w as usize), sinks: 0, chunk: None };
        p.scale = Some(1.0 / scalar.sqrt());
        p.softcap = Some(cap);
        let exact = |key| exact_f64s("softcap_attention", idx, key);
        let o = reference::attention(&exact("q"), &exact("k"), &exact("v"), &pos, &pos, &p).unwrap();
        // Scores reach ~50 here: the bound is relative above 1.
        assert_matches(label, &o, &exact("out"), &exact("lse"), 1e-12);
        // The cap matters here: without it the answer moves.
        p.softcap = None;
        let plain = reference::attention(&exact("q"), &exact("k"), &exact("v"), &pos, &pos, &p).unwrap();
        assert!(plain.lse.iter().zip(&o.lse).any(|(a, b)| (a - b).abs() > 1.0), "{label}");
    }
    assert_eq!(cases.len(), 1, "soft-capping cases");
}

/// Q or K (`heads` per token) normalised as the layer's [`HfQkNorm`] says, by
/// `reference::qk_norm_row`, with the kernels' weights made from the checkpoint's.
fn qk_normalised(x: &[f64], heads: usize, d: usize, norm: &HfQkNorm, checkpoint: Option<&[f32]>) -> Vec<f64> {
    let w = checkpoint.and_then(|c| norm.weights(c));
    let mut y = x.to_vec();
    for row in y.chunks_mut(heads * d) {
        reference::qk_norm_row(row, d, norm.eps, norm.scope, w.as_deref()).unwrap();
    }
    y
}

/// Llama 4's attention module (transformers' Llama4TextAttention, float64) against the
/// reference run as the config tells it through `hf_layers` and `RopeConfig`: the RoPE layer's
/// interleaved pairs, chunks and QK norm (applied here to the *unrotated* Q and K, as a server
/// applies it before the cache: the rotation keeps the norm), the NoPE layer's query temperature
/// in a prefill and in decode steps over a cache (positions 37..39).
#[test]
fn attention_matches_llama4_attention_module() {
    let f = fixtures();
    let cases = cases(&f, "llama4_attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let cfg = case["config"].to_string();
        let layer = hf_layers(&cfg).unwrap()[usize_of(&case["layer"])];
        match usize_of(&case["layer"]) {
            0 => assert_eq!(
                (layer.attention, layer.rope, layer.query_temperature, layer.qk_norm),
                (LayerAttention::Chunked(16), true, None, Some(HfQkNorm { eps: 1e-5, scope: NormScope::Head, weight: NormWeight::None }))
            ),
            _ => assert_eq!(
                (layer.attention, layer.rope, layer.query_temperature, layer.qk_norm),
                (LayerAttention::Full, false, Some(QueryTemperature::llama4(4, 0.3)), None)
            ),
        }
        let rope = RopeConfig::from_hf_config_json(&cfg).unwrap();
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = layer.rope.then(|| Rotary::from_schedule(&rope.schedule(None).unwrap(), Layout::Interleaved));
        let p = layer.apply(p).unwrap();
        let exact = |key| exact_f64s("llama4_attention", idx, key);
        let (mut q, mut k) = (exact("q"), exact("k"));
        if let Some(norm) = &layer.qk_norm {
            (q, k) = (qk_normalised(&q, hq, d, norm, None), qk_normalised(&k, hkv, d, norm, None));
        }
        let (q_pos, k_pos) = (i64s(&case["q_pos"]), i64s(&case["k_pos"]));
        let o = reference::attention(&q, &k, &exact("v"), &q_pos, &k_pos, &p).unwrap();
        let want = exact("out");
        assert_eq!(o.out.len(), want.len(), "{label}");
        for (i, (g, w)) in o.out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{label}: out[{i}] {g} vs transformers {w}");
        }
        // What the case is about matters: without it the answer moves.
        let without = match layer.qk_norm {
            Some(_) => reference::attention(&exact("q"), &exact("k"), &exact("v"), &q_pos, &k_pos, &p).unwrap(),
            None => reference::attention(&q, &k, &exact("v"), &q_pos, &k_pos, &AttentionParams { query_temperature: None, ..p.clone() }).unwrap(),
        };
        assert!(without.out.iter().zip(&o.out).any(|(a, b)| (a - b).abs() > 1e-2), "{label}");
    }
    assert_eq!(cases.len(), 3, "llama4 attention cases");
}

/// The QK norm by transformers' own attention modules (float64): Qwen3 (each head, `w·x̂`),
/// Gemma 3 (each head, `(1 + w)·x̂`, its sliding layer and its linearly scaled full layer, with
/// query_pre_attn_scalar), OLMo 2 (all heads together, eps from the config class's default),
/// against the reference run as the config tells it: `hf_layers`' [`HfQkNorm`] on the
/// unrotated Q and K with the checkpoint's weights through [`HfQkNorm::weights`], then
/// `reference::attention` with the layer's mask and RoPE. Equal to 1e-12; a norm over the
/// wrong scope, or the weights taken plainly where they are offsets from one, moves it.
#[test]
fn attention_matches_qk_norm_attention_modules() {
    let f = fixtures();
    let cases = cases(&f, "qk_norm_attention");
    let mut seen = BTreeSet::new();
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let cfg = case["config"].to_string();
        let model_type = case["config"]["model_type"].as_str().unwrap();
        let layer = hf_layers(&cfg).unwrap()[usize_of(&case["layer"])];
        let norm = layer.qk_norm.unwrap_or_else(|| panic!("{label}: hf_layers gives no QK norm"));
        let want_norm = match model_type {
            "qwen3" => HfQkNorm { eps: 1e-6, scope: NormScope::Head, weight: NormWeight::Plain },
            "gemma3_text" => HfQkNorm { eps: 1e-6, scope: NormScope::Head, weight: NormWeight::OnePlus },
            "olmo2" => HfQkNorm { eps: 1e-5, scope: NormScope::Heads, weight: NormWeight::Plain },
            other => panic!("unexpected model {other}"),
        };
        assert_eq!(norm, want_norm, "{label}");
        seen.insert(model_type.to_string());
        let rope = RopeConfig::from_hf_config_json_layer(&cfg, case["layer_type"].as_str()).unwrap();
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(Rotary::from_schedule(&rope.schedule(None).unwrap(), Layout::Half));
        // The module's scale, as hf_layers gives it (Gemma 3's query_pre_attn_scalar).
        let p = layer.apply(p).unwrap();
        assert!(rel_err(p.softmax_scale(), case["scale"].as_f64().unwrap()) <= 1e-15, "{label}: scale {}", p.softmax_scale());
        let exact = |key| exact_f64s("qk_norm_attention", idx, key);
        let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (qw, kw) = (f32s("q_norm_weight"), f32s("k_norm_weight"));
        assert!(qw.iter().zip(exact("q_norm_weight")).all(|(&a, b)| a as f64 == b), "{label}: weights exact in f32");
        // Under another scope than the checkpoint's, its weights are cut to one head or repeated.
        let fit = |w: &[f32], heads: usize, scope: NormScope| match scope {
            NormScope::Head => w[..d].to_vec(),
            NormScope::Heads | NormScope::HeadCentred => w.iter().cycle().take(heads * d).copied().collect(),
        };
        let norm_with = |norm: &HfQkNorm| {
            let (qw, kw) = (fit(&qw, hq, norm.scope), fit(&kw, hkv, norm.scope));
            (qk_normalised(&exact("q"), hq, d, norm, Some(&qw)), qk_normalised(&exact("k"), hkv, d, norm, Some(&kw)))
        };
        let (q, k) = norm_with(&norm);
        let (q_pos, k_pos): (Vec<i64>, Vec<i64>) = ((0..q.len() / (hq * d)).map(|i| i as i64).collect(), (0..k.len() / (hkv * d)).map(|i| i as i64).collect());
        let o = reference::attention(&q, &k, &exact("v"), &q_pos, &k_pos, &p).unwrap();
        let want = exact("out");
        assert_eq!(o.out.len(), want.len(), "{label}");
        for (i, (g, w)) in o.out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{label}: out[{i}] {g} vs transformers {w}");
        }
        // The norm's form matters: the other scope, or the other weight form, moves the answer.
        let other_scope = HfQkNorm { scope: if norm.scope == NormScope::Head { NormScope::Heads } else { NormScope::Head }, ..norm };
        let other_weight = HfQkNorm { weight: if norm.weight == NormWeight::Plain { NormWeight::OnePlus } else { NormWeight::Plain }, ..norm };
        for wrong in [other_scope, other_weight] {
            let (q, k) = norm_with(&wrong);
            let moved = reference::attention(&q, &k, &exact("v"), &q_pos, &k_pos, &p).unwrap();
            assert!(moved.out.iter().zip(&o.out).any(|(a, b)| (a - b).abs() > 1e-3), "{label}: {wrong:?}");
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["gemma3_text", "olmo2", "qwen3"]);
    assert_eq!(cases.len(), 4, "qk norm attention cases");
}

#[test]
fn attention_matches_torch_softmax_over_transformers_rope() {
    let f = fixtures();
    let cases = cases(&f, "attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let (q_pos, k_pos) = (i64s(&case["q_pos"]), i64s(&case["k_pos"]));
        let mut p = AttentionParams::new(hq, hkv, d);
        p.mask = Mask { causal: true, window: case["window"].as_u64().map(|w| w as usize), sinks: usize_of(&case["sinks"]), chunk: None };
        let sched = RopeSchedule::plain(case["rope_theta"].as_f64().unwrap(), d).unwrap();
        p.rope = Some(Rotary::from_schedule(&sched, Layout::Half));
        let exact = |key| exact_f64s("attention", idx, key);
        let o = reference::attention(&exact("q"), &exact("k"), &exact("v"), &q_pos, &k_pos, &p).unwrap();
        let (want_o, want_lse) = (exact("out"), exact("lse"));
        assert_eq!(o.out.len(), want_o.len(), "{label}");
        assert_eq!(o.lse.len(), want_lse.len(), "{label}");
        for (i, (g, w)) in o.out.iter().zip(&want_o).enumerate() {
            assert!((g - w).abs() <= 1e-12, "{label}: out[{i}] {g} vs torch {w}");
        }
        for (i, (g, w)) in o.lse.iter().zip(&want_lse).enumerate() {
            assert!((g - w).abs() <= 1e-12, "{label}: lse[{i}] {g} vs torch {w}");
        }
    }
    assert_eq!(cases.len(), 2, "attention cases");
}

/// Every example config's layers as transformers' config class has them: its `layer_types`
/// (or, for the classes without one, every layer sliding when `sliding_window` is set, which is
/// what their models do), the window, Llama 4's chunk and which layers rotate.
#[test]
fn layer_patterns_match_transformers() {
    use rope_attn::{hf_layers, LayerAttention};
    let f = fixtures();
    let mut checked = 0;
    let mut kinds = BTreeSet::new();
    for case in cases(&f, "layers") {
        let name = case["config"].as_str().expect("config name");
        let got = hf_layers(&config_text(name, &Value::Null)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let n = usize_of(&case["num_hidden_layers"]);
        let window = case["sliding_window"].as_u64().map(|w| w as usize);
        let types: Vec<String> = match &case["layer_types"] {
            Value::Array(t) => t.iter().map(|x| x.as_str().expect("layer type").to_string()).collect(),
            _ => vec![if window.is_some() { "sliding_attention" } else { "full_attention" }.to_string(); n],
        };
        assert_eq!(got.len(), n, "{name}: layer count");
        for (i, (layer, want)) in got.iter().zip(&types).enumerate() {
            assert_eq!(layer.layer_type(), want, "{name}: layer {i}");
            let want_attention = match want.as_str() {
                "sliding_attention" => LayerAttention::Sliding(window.expect("a sliding layer has a window")),
                "chunked_attention" => LayerAttention::Chunked(usize_of(&case["attention_chunk_size"])),
                "linear_attention" => LayerAttention::Linear,
                _ => LayerAttention::Full,
            };
            assert_eq!(layer.attention, want_attention, "{name}: layer {i}");
            let rope = case["no_rope_layers"].as_array().is_none_or(|r| r[i].as_i64() != Some(0));
            assert_eq!(layer.rope, rope, "{name}: layer {i} rope");
            kinds.insert(want.clone());
            checked += 1;
        }
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert!(checked > 400, "{checked} layers");
}

/// `Mask::visible` against transformers' own mask functions (masking_utils): causal, sliding
/// window and chunked, over positions 0..70.
#[test]
fn masks_match_transformers_mask_functions() {
    let f = fixtures();
    let mut checked = 0;
    for case in cases(&f, "masks") {
        let mut m = Mask { causal: true, window: None, sinks: 0, chunk: None };
        match case["kind"].as_str() {
            Some("sliding") => m.window = Some(usize_of(&case["window"])),
            Some("chunked") => m.chunk = Some(usize_of(&case["chunk"])),
            Some("causal") => {}
            other => panic!("unknown mask kind {other:?}"),
        }
        let range = i64s(&case["positions"]);
        let want: BTreeSet<(i64, i64)> = case["visible"].as_array().expect("pairs").iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap())).collect();
        for i in range[0]..range[1] {
            for j in range[0]..range[1] {
                assert_eq!(m.visible(i, j), want.contains(&(i, j)), "{m:?} i={i} j={j}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 6 * 70 * 70);
}

/// The kernel's side of the same check: the rope kernel (run by the SIMT emulator, f32)
/// normalises and rotates transformers' Q and K in one pass (`rope_inplace_normed`, the
/// checkpoint's weights through `HfQkNorm::weights`), and attention over its output without
/// further RoPE gives transformers' own Qwen3, Gemma 3 and OLMo 2 attention output to f32
/// accuracy (inputs rounded to f32 once, the kernel's f32 norm and angles; seen 1.2e-7 to
/// 1.8e-7, 2e-6 allowed; a norm over the wrong scope moves it past 1e-3).
#[cfg(feature = "emulator")]
#[test]
fn rope_kernel_qk_norm_feeds_transformers_attention() {
    use rope_attn::cuda::RopeShape;
    use rope_attn::emulator::Emulator;
    let f = fixtures();
    let cases = cases(&f, "qk_norm_attention");
    let emu = Emulator::new();
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let cfg = case["config"].to_string();
        let layer = hf_layers(&cfg).unwrap()[usize_of(&case["layer"])];
        let norm = layer.qk_norm.unwrap();
        let rope = RopeConfig::from_hf_config_json_layer(&cfg, case["layer_type"].as_str()).unwrap();
        let rot = Rotary::from_schedule(&rope.schedule(None).unwrap(), Layout::Half);
        let exact = |key| exact_f64s("qk_norm_attention", idx, key);
        let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (qw, kw) = (norm.weights(&f32s("q_norm_weight")), norm.weights(&f32s("k_norm_weight")));
        let n = exact("q").len() / (hq * d);
        let shape = RopeShape::contiguous(n, hq, hkv, d);
        let pos: Vec<i32> = (0..n as i32).collect();
        let mut p = AttentionParams::new(hq, hkv, d);
        p.scale = Some(case["scale"].as_f64().unwrap());
        let p = layer.apply(p).unwrap(); // rope: None, the kernel rotated
        let k_pos: Vec<i64> = (0..n as i64).collect();
        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let attend = |q: &[f32], k: &[f32]| reference::attention(&wide(q), &wide(k), &exact("v"), &k_pos, &k_pos, &p).unwrap().out;
        let run = |norm: &HfQkNorm| {
            let (mut q, mut k) = (f32s("q"), f32s("k"));
            emu.rope_inplace_normed_checked(&mut q, &mut k, &pos, &shape, &rot, &norm.with(qw.as_deref(), kw.as_deref())).unwrap();
            attend(&q, &k)
        };
        let want = exact("out");
        let worst = run(&norm).iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f64::max);
        assert!(worst <= 2e-6, "{label}: the kernel's path is {worst:e} from transformers");
        if norm.scope == NormScope::Head {
            // Over all heads instead (and unweighted): the answer moves.
            let heads = HfQkNorm { scope: NormScope::Heads, weight: NormWeight::None, ..norm };
            let (mut q, mut k) = (f32s("q"), f32s("k"));
            emu.rope_inplace_normed(&mut q, &mut k, &pos, &shape, &rot, &heads.with(None::<&[f32]>, None)).unwrap();
            let moved = attend(&q, &k);
            assert!(moved.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3), "{label}");
        }
        println!("{label}: kernel path within {worst:.1e} of transformers");
    }
    assert_eq!(cases.len(), 4);
}

/// One "gated_attention" case as the config tells it: the layer (gated, with its QK norm), the
/// rotation with the model's M-RoPE sections if any, the three position rows (time, height,
/// width: equal for Qwen3-Next's plain positions), the kernel's norm weights (`1 + w`), and the
/// attention parameters without RoPE (the rotation happens before).
struct GatedFixture {
    label: String,
    hq: usize,
    hkv: usize,
    d: usize,
    n: usize,
    norm: HfQkNorm,
    rot: Rotary,
    mrope: Option<rope_attn::MRope>,
    rows: Vec<i32>,
    /// The checkpoint's norm weights (offsets from 1), and the kernel's (`HfQkNorm::weights`).
    ckpt: (Vec<f32>, Vec<f32>),
    #[cfg_attr(not(feature = "emulator"), allow(dead_code))]
    weights: (Option<Vec<f32>>, Option<Vec<f32>>),
    p: AttentionParams,
}

fn gated_fixture(case: &Value, idx: usize) -> GatedFixture {
    let label = case["name"].as_str().unwrap().to_string();
    let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
    let cfg = case["config"].to_string();
    let layer = hf_layers(&cfg).unwrap()[usize_of(&case["layer"])];
    assert!(layer.gated_query, "{label}: hf_layers says the query is not gated");
    let norm = layer.qk_norm.unwrap_or_else(|| panic!("{label}: no QK norm"));
    assert_eq!(norm, HfQkNorm { eps: 1e-6, scope: NormScope::Head, weight: NormWeight::OnePlus }, "{label}");
    let rope = RopeConfig::from_hf_config_json(&cfg).unwrap();
    let sched = rope.schedule(None).unwrap();
    assert_eq!(sched.rotary_dim, if rope.mrope.is_some() { d / 2 } else { d / 4 }, "{label}: partial_rotary_factor");
    let n = exact_f64s("gated_attention", idx, "k").len() / (hkv * d);
    let pos = i64s(&case["positions"]);
    let rows: Vec<i32> = match pos.len() {
        l if l == n => pos.iter().chain(&pos).chain(&pos).map(|&p| p as i32).collect(),
        l => {
            assert_eq!(l, 3 * n, "{label}");
            pos.iter().map(|&p| p as i32).collect()
        }
    };
    let f32s = |key| exact_f64s("gated_attention", idx, key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let ckpt = (f32s("q_norm_weight"), f32s("k_norm_weight"));
    let weights = (norm.weights(&ckpt.0), norm.weights(&ckpt.1));
    let mut p = AttentionParams::new(hq, hkv, d);
    p.scale = Some(case["scale"].as_f64().unwrap());
    let p = layer.apply(p).unwrap();
    GatedFixture { label, hq, hkv, d, n, norm, rot: Rotary::from_schedule(&sched, Layout::Half), mrope: rope.mrope, rows, ckpt, weights, p }
}

impl GatedFixture {
    /// Attention over rotated Q and K (keys at 0..n for the causal mask), times sigmoid(gate)
    /// with the gates from `gated`: transformers' o_proj input.
    fn attend_gated(&self, q: &[f64], k: &[f64], v: &[f64], gated: &[f64]) -> Vec<f64> {
        let pos: Vec<i64> = (0..self.n as i64).collect();
        let mut o = reference::attention(q, k, v, &pos, &pos, &self.p).unwrap().out;
        for (t, row) in o.chunks_mut(self.hq * self.d).enumerate() {
            for (h, head) in row.chunks_mut(self.d).enumerate() {
                let gate = &gated[t * 2 * self.hq * self.d + h * 2 * self.d + self.d..][..self.d];
                head.iter_mut().zip(gate).for_each(|(o, g)| *o /= 1.0 + (-g).exp());
            }
        }
        o
    }

    /// Rotate every head of `x` (`heads` per token) to its token's positions, in f64.
    fn rotate(&self, x: &mut [f64], heads: usize) {
        for (t, row) in x.chunks_mut(heads * self.d).enumerate() {
            let at = [0, 1, 2].map(|c| self.rows[c * self.n + t] as f64);
            for head in row.chunks_mut(self.d) {
                match &self.mrope {
                    Some(m) => reference::rotate_head_mrope(head, at, &self.rot, m),
                    None => reference::rotate_head(head, at[0], &self.rot),
                }
            }
        }
    }
}

/// transformers' own gated attention (fixture section "gated_attention": Qwen3NextAttention,
/// and Qwen3_5Attention with M-RoPE over three different position rows), float64, against the
/// reference as the config tells it: the queries taken from q_proj's rows as `hf_layers`'
/// `gated_query` says (per head, query then gate), the QK norm (`1 + w`), the rotation
/// (RopeConfig's partial rotary and sections), attention, and the output times sigmoid(gate):
/// 1e-12. Reading the rows the other way (all queries, then all gates) is far off.
#[test]
fn attention_matches_gated_attention_modules() {
    let f = fixtures();
    let cases = cases(&f, "gated_attention");
    let mut mrope = 0;
    for (idx, case) in cases.iter().enumerate() {
        let g = gated_fixture(case, idx);
        let exact = |key| exact_f64s("gated_attention", idx, key);
        let (gated, want) = (exact("q"), exact("out"));
        let (hq, d) = (g.hq, g.d);
        let per_head: Vec<f64> = gated.chunks(2 * d).flat_map(|h| h[..d].to_vec()).collect();
        let halves: Vec<f64> = gated.chunks(2 * hq * d).flat_map(|r| r[..hq * d].to_vec()).collect();
        let run = |queries: &[f64]| {
            let mut q = qk_normalised(queries, hq, d, &g.norm, Some(&g.ckpt.0));
            let mut k = qk_normalised(&exact("k"), g.hkv, d, &g.norm, Some(&g.ckpt.1));
            g.rotate(&mut q, hq);
            g.rotate(&mut k, g.hkv);
            g.attend_gated(&q, &k, &exact("v"), &gated)
        };
        let got = run(&per_head);
        assert_eq!(got.len(), want.len(), "{}", g.label);
        for (i, (a, w)) in got.iter().zip(&want).enumerate() {
            assert!((a - w).abs() <= 1e-12 * w.abs().max(1.0), "{}: out[{i}] {a} vs transformers {w}", g.label);
        }
        let moved = run(&halves);
        assert!(moved.iter().zip(&want).any(|(a, w)| (a - w).abs() > 1e-3), "{}: the other layout", g.label);
        mrope += g.mrope.is_some() as usize;
    }
    assert_eq!((cases.len(), mrope), (2, 1), "gated attention cases");
}

/// The kernel's side: the rope kernel (SIMT emulator, f32) reads the queries out of
/// transformers' gated q_proj rows, normalises and rotates them (M-RoPE for Qwen3.5) and K in
/// one pass (`qk_norm_rope_gated`, checked), and attention over its output, gated, gives
/// transformers' own o_proj input to f32 accuracy (2e-6 allowed).
#[cfg(feature = "emulator")]
#[test]
fn rope_kernel_gated_query_feeds_transformers_attention() {
    use rope_attn::cuda::{GatedRotation, RopeShape};
    use rope_attn::emulator::Emulator;
    let f = fixtures();
    let cases = cases(&f, "gated_attention");
    let emu = Emulator::new();
    for (idx, case) in cases.iter().enumerate() {
        let g = gated_fixture(case, idx);
        let exact = |key| exact_f64s("gated_attention", idx, key);
        let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (gated, mut k) = (f32s("q"), f32s("k"));
        let shape = RopeShape { q_row_stride: 2 * g.hq * g.d, ..RopeShape::contiguous(g.n, g.hq, g.hkv, g.d) };
        let mut q = vec![0f32; g.n * g.hq * g.d];
        let rotation = match &g.mrope {
            Some(m) => GatedRotation::Mrope { positions: &g.rows[..], stride: g.n, rot: &g.rot, mrope: m },
            None => GatedRotation::Rope { positions: &g.rows[..g.n], rot: &g.rot },
        };
        let norm = g.norm.with(g.weights.0.as_deref(), g.weights.1.as_deref());
        emu.qk_norm_rope_gated_checked(&gated, &mut q, &mut k, &shape, rotation, &norm).unwrap_or_else(|e| panic!("{}: {e}", g.label));
        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let out = g.attend_gated(&wide(&q), &wide(&k), &exact("v"), &exact("q"));
        let want = exact("out");
        let worst = out.iter().zip(&want).map(|(a, w)| (a - w).abs() / w.abs().max(1.0)).fold(0.0, f64::max);
        assert!(worst <= 2e-6, "{}: the kernel's path is {worst:e} from transformers", g.label);
        println!("{}: kernel path within {worst:.1e} of transformers", g.label);
    }
    assert_eq!(cases.len(), 2);
}

/// transformers' own defaults for the rope keys a config.json leaves out (fixture section
/// "model_defaults"): for every model type it builds with one flat rope dict of a type we
/// implement, a config of sizes only, and the same with a top-level rope_theta and
/// partial_rotary_factor (which GPT-NeoX and Bamba ignore) or its own rope dict, give the
/// inv_freq and attention factor the model's own rotary code computes, to 1e-12: each class's
/// default theta (Llama 4's 5e5, Qwen2-VL's 1e6, ...), partial rotary factor (GLM's and Phi's
/// 0.5, Qwen3-Next's 0.25, ...) and default scaling (GPT-OSS's YaRN, Apertus's Llama 3). For the
/// classes with one dict per layer type (Gemma 3, OLMo 3, ...), each layer type's, from sizes
/// alone and from a legacy flat config (Gemma 3's hub configs: `rope_scaling` and `rope_theta`
/// for the full layers, `rope_local_base_freq` for the sliding ones).
#[test]
fn schedules_match_transformers_model_defaults() {
    let f = fixtures();
    let cases = cases(&f, "model_defaults");
    let mut failures = Vec::new();
    for (idx, case) in cases.iter().enumerate() {
        let layer_type = case["layer_type"].as_str();
        let label = format!("{} {} ({})", case["model_type"].as_str().unwrap(), layer_type.unwrap_or(""), case["variant"].as_str().unwrap());
        let want = exact_f64s("model_defaults", idx, "inv_freq");
        let want_af = case["attention_factor"].as_f64().unwrap();
        let s = match RopeConfig::from_hf_config_json_layer(&case["config"].to_string(), layer_type).and_then(|c| c.schedule(None)) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        if s.inv_freq.len() != want.len() {
            failures.push(format!("{label}: rotary dim {}, transformers {} ({})", s.rotary_dim, 2 * want.len(), case["rope_parameters"]));
            continue;
        }
        let worst = s.inv_freq.iter().zip(&want).map(|(g, w)| rel_err(*g, *w)).fold(0.0, f64::max);
        let af_err = rel_err(s.attention_factor, want_af);
        if worst.is_nan() || af_err.is_nan() || worst > 1e-12 || af_err > 1e-12 {
            failures.push(format!(
                "{label}: inv_freq rel err {worst:e}, attention factor {} vs {want_af} ({})",
                s.attention_factor, case["rope_parameters"]
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ from transformers:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(cases.len() > 400, "{} cases", cases.len());
}

/// Ministral 3's query scaling by transformers' own Ministral3Attention (fixture section
/// "ministral3_attention": YaRN over an original 8 positions, `llama_4_scaling_beta` 0.3, a
/// prefill of 29 crossing floors at 8, 16, 24; and one at positions 100..), float64, against
/// the reference as the config tells it: `hf_layers`' query temperature
/// (`QueryTemperature::ministral3`, no `+ 1` in the floor) and RoPE from `RopeConfig`: 1e-12.
/// Llama 4's form of the floor (offset 1), or no scaling, moves it.
#[test]
fn attention_matches_ministral3_attention_module() {
    let f = fixtures();
    let cases = cases(&f, "ministral3_attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let (hq, hkv, d) = (usize_of(&case["num_q_heads"]), usize_of(&case["num_kv_heads"]), usize_of(&case["head_dim"]));
        let cfg = case["config"].to_string();
        let layer = hf_layers(&cfg).unwrap()[0];
        let t = layer.query_temperature.unwrap_or_else(|| panic!("{label}: no query temperature"));
        assert_eq!(t, QueryTemperature::ministral3(0.3, 8), "{label}");
        let rope = RopeConfig::from_hf_config_json(&cfg).unwrap();
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(Rotary::from_schedule(&rope.schedule(None).unwrap(), Layout::Half));
        p.scale = Some(case["scale"].as_f64().unwrap());
        let p = layer.apply(p).unwrap();
        let exact = |key| exact_f64s("ministral3_attention", idx, key);
        let n = exact("k").len() / (hkv * d);
        let start = case["start"].as_i64().unwrap();
        let pos: Vec<i64> = (start..start + n as i64).collect();
        let run = |p: &AttentionParams| reference::attention(&exact("q"), &exact("k"), &exact("v"), &pos, &pos, p).unwrap().out;
        let (got, want) = (run(&p), exact("out"));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{label}: out[{i}] {g} vs transformers {w}");
        }
        for wrong in [Some(QueryTemperature { offset: 1, ..t }), None] {
            let moved = run(&AttentionParams { query_temperature: wrong, ..p.clone() });
            assert!(moved.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-4), "{label}: {wrong:?}");
        }
    }
    assert_eq!(cases.len(), 2);
}

/// Each layer's attention as transformers' own modules take it from a config (fixture section
/// "layer_shapes": tiny text models built from configs of Llama, Gemma 2 / 3 / 3n / 4, VaultGemma,
/// Granite (dense, MoE, shared MoE), HyperCLOVA X, LFM2, LFM3 and DeepSeek-V3, with and
/// without the keys that matter): `hf_layers` gives the same layer types; on each attention
/// layer the module's `scaling` (to 1e-15), heads and head size (q_proj's and k_proj's widths:
/// Gemma 4's full layers take `global_head_dim` and, with `attention_k_eq_v`,
/// `num_global_key_value_heads`), soft-capping, window, V norm, V-is-K, the layer whose K and V
/// it reuses (Gemma 3n's and Gemma 4's KV sharing) and LFM3's head gate; `RopeConfig` the head size
/// the layer type's rotary code is given; and no attention where the model has none (LFM's
/// convolutions).
#[test]
fn layer_shapes_match_transformers_attention_modules() {
    let f = fixtures();
    let cases = cases(&f, "layer_shapes");
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases {
        let mt = case["model_type"].as_str().unwrap();
        let cfg = case["config"].to_string();
        let label = format!("{mt} {}", case["config"]);
        let layers = match hf_layers(&cfg) {
            Ok(l) => l,
            Err(e) => {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        let types: Vec<&str> = case["layer_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let got: Vec<&str> = layers.iter().map(|l| l.layer_type()).collect();
        if got != types {
            failures.push(format!("{label}: layer types {got:?}, transformers {types:?}"));
            continue;
        }
        for (i, (layer, want)) in layers.iter().zip(case["layers"].as_array().unwrap()).enumerate() {
            let mut fail = |what: String| failures.push(format!("{label} layer {i}: {what}"));
            if want.is_null() {
                if layer.params().is_some() || layer.mask().is_some() {
                    fail("attention where the model has none".into());
                }
                continue;
            }
            let window = match layer.attention {
                LayerAttention::Sliding(w) => Some(w as u64),
                _ => None,
            };
            if window != want["sliding_window"].as_u64() {
                fail(format!("window {window:?} vs {}", want["sliding_window"]));
            }
            let d = usize_of(&want["head_dim"]);
            let scale = layer.scale.unwrap_or(1.0 / (d as f64).sqrt());
            if rel_err(scale, want["scaling"].as_f64().unwrap()) > 1e-15 {
                fail(format!("scale {scale} vs scaling {}", want["scaling"]));
            }
            if layer.softcap != want["softcap"].as_f64() {
                fail(format!("softcap {:?} vs {}", layer.softcap, want["softcap"]));
            }
            // A layer that reuses another's K and V has no V norm of its own: the producer's made them.
            let v_norm = want["v_norm"].as_bool().unwrap() || want["kv_shared"].as_bool().unwrap();
            if layer.kv_shared_from != want["kv_source"].as_u64().map(|j| j as usize) || layer.head_gate != want["output_gate"].as_bool().unwrap() {
                fail(format!("kv_shared_from {:?}, head_gate {} vs {} {}", layer.kv_shared_from, layer.head_gate, want["kv_source"], want["output_gate"]));
            }
            if layer.v_norm.is_some() != v_norm || layer.value_is_key != want["value_is_key"].as_bool().unwrap() {
                fail(format!("v_norm {:?}, value_is_key {} vs {} {}", layer.v_norm, layer.value_is_key, want["v_norm"], want["value_is_key"]));
            }
            match (layer.params(), want["num_q_heads"].as_u64()) {
                (Some(p), Some(q)) => {
                    let kv = want["num_kv_heads"].as_u64().map(|k| k as usize).unwrap_or(p.num_kv_heads);
                    if (p.num_q_heads, p.num_kv_heads, p.head_dim) != (q as usize, kv, d) {
                        fail(format!("heads {:?} vs ({q}, {kv}, {d})", (p.num_q_heads, p.num_kv_heads, p.head_dim)));
                    }
                    if (p.scale, p.softcap) != (layer.scale, layer.softcap) || Some(p.mask) != layer.mask() {
                        fail("params() does not carry the layer's scale, softcap and mask".into());
                    }
                    if layer.rope {
                        let rope_d = usize_of(&case["rope_head_dim"][layer.layer_type()]);
                        match RopeConfig::from_hf_config_json_layer(&cfg, Some(layer.layer_type())) {
                            Ok(c) if c.head_dim == rope_d => {}
                            other => fail(format!("rope head dim {:?} vs {rope_d}", other.map(|c| c.head_dim))),
                        }
                    }
                }
                // MLA: q_proj is low-rank, the heads are not the kernels' shape.
                (None, None) => {}
                (got, want) => fail(format!("heads {:?} vs q heads {want:?}", got.map(|p| (p.num_q_heads, p.num_kv_heads, p.head_dim)))),
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    let models: BTreeSet<&str> = cases.iter().map(|c| c["model_type"].as_str().unwrap()).collect();
    assert!(models.len() >= 12 && checked > 100, "{} models, {checked} layers", models.len());
}

/// Proportional RoPE and the layers around it by transformers' own attention modules (fixture
/// section "proportional_attention", float64): Gemma 4's sliding layer and its full layer
/// (global_head_dim 32, a quarter of the pairs turning, V = k_proj's output under its V norm,
/// scale 1) and LFM3's full (proportional over half) and sliding layers, against the reference
/// run entirely as the config tells it: `hf_layers`' params (heads, head size, scale, mask),
/// QK norm, V norm and V-is-K, and `RopeConfig`'s schedule for the layer type. Equal to 1e-12;
/// the same frequencies over a partial rotation (pairs `rotated/2` apart instead of `d/2`) move it.
#[test]
fn attention_matches_proportional_rope_modules() {
    let f = fixtures();
    let cases = cases(&f, "proportional_attention");
    let mut proportional = 0;
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let cfg = case["config"].to_string();
        let layer = hf_layers(&cfg).unwrap()[usize_of(&case["layer"])];
        let mut p = layer.params().unwrap_or_else(|| panic!("{label}: no params"));
        let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
        let rope = RopeConfig::from_hf_config_json_layer(&cfg, case["layer_type"].as_str()).unwrap();
        let sched = rope.schedule(None).unwrap();
        assert_eq!((rope.head_dim, sched.rotary_dim), (d, d), "{label}: rotation over the layer's head");
        p.rope = Some(Rotary::from_schedule(&sched, Layout::Half));
        let exact = |key| exact_f64s("proportional_attention", idx, key);
        let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let norm = layer.qk_norm.unwrap_or_else(|| panic!("{label}: no QK norm"));
        let q = qk_normalised(&exact("q"), hq, d, &norm, Some(&f32s("q_norm_weight")));
        let k_raw = exact("k");
        let k = qk_normalised(&k_raw, hkv, d, &norm, Some(&f32s("k_norm_weight")));
        let v_raw = if layer.value_is_key {
            assert!(case["v"].is_null(), "{label}: the module has a v_proj");
            k_raw.clone()
        } else {
            exact("v")
        };
        let v = match &layer.v_norm {
            Some(vn) => qk_normalised(&v_raw, hkv, d, vn, None),
            None => v_raw,
        };
        let pos: Vec<i64> = (0..q.len() / (hq * d)).map(|i| i as i64).collect();
        let o = reference::attention(&q, &k, &v, &pos, &pos, &p).unwrap();
        let want = exact("out");
        assert_eq!(o.out.len(), want.len(), "{label}");
        for (i, (g, w)) in o.out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{label}: out[{i}] {g} vs transformers {w}");
        }
        if sched.rope_type == "proportional" {
            proportional += 1;
            // The turning pairs as a partial rotation of their own width: a different pairing.
            let turning = sched.inv_freq.iter().take_while(|&&f| f > 0.0).count();
            assert!(turning > 0 && turning < d / 2, "{label}: {turning} pairs turn");
            let mut partial = p.clone();
            partial.rope = Some(Rotary { inv_freq: sched.inv_freq[..turning].to_vec(), rotary_dim: 2 * turning, layout: Layout::Half, attention_factor: 1.0 });
            let moved = reference::attention(&q, &k, &v, &pos, &pos, &partial).unwrap();
            assert!(moved.out.iter().zip(&o.out).any(|(a, b)| (a - b).abs() > 1e-3), "{label}: a partial rotation agrees");
        }
    }
    assert_eq!((cases.len(), proportional), (4, 2), "proportional attention cases");
}

/// Cohere's QK LayerNorm (Command R+) by transformers' own CohereAttention (fixture section
/// "cohere_attention", float64, off-centre projections) against the reference as the config
/// tells it: `hf_layers`' norm ([`NormScope::HeadCentred`], weights per head, layer_norm_eps)
/// on the unrotated Q and K, then interleaved RoPE: 1e-12. The RMS norm of the same weights, or
/// one head's weights for every head, moves it.
#[test]
fn attention_matches_cohere_qk_layer_norm() {
    let f = fixtures();
    let cases = cases(&f, "cohere_attention");
    for (idx, case) in cases.iter().enumerate() {
        let label = case["name"].as_str().unwrap();
        let cfg = case["config"].to_string();
        let layer = hf_layers(&cfg).unwrap()[0];
        let norm = layer.qk_norm.unwrap_or_else(|| panic!("{label}: no QK norm"));
        assert_eq!(norm, HfQkNorm { eps: 1e-5, scope: NormScope::HeadCentred, weight: NormWeight::Plain }, "{label}");
        let mut p = layer.params().unwrap();
        let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
        p.rope = Some(Rotary::from_schedule(&RopeConfig::from_hf_config_json(&cfg).unwrap().schedule(None).unwrap(), Layout::Interleaved));
        let exact = |key| exact_f64s("cohere_attention", idx, key);
        let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (qw, kw) = (f32s("q_norm_weight"), f32s("k_norm_weight"));
        assert_eq!((qw.len(), kw.len()), (hq * d, hkv * d), "{label}: weights per head");
        let run = |norm: &HfQkNorm, qw: &[f32], kw: &[f32]| {
            let q = qk_normalised(&exact("q"), hq, d, norm, Some(qw));
            let k = qk_normalised(&exact("k"), hkv, d, norm, Some(kw));
            let pos: Vec<i64> = (0..q.len() / (hq * d)).map(|i| i as i64).collect();
            reference::attention(&q, &k, &exact("v"), &pos, &pos, &p).unwrap()
        };
        let o = run(&norm, &qw, &kw);
        let want = exact("out");
        assert_eq!(o.out.len(), want.len(), "{label}");
        for (i, (g, w)) in o.out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{label}: out[{i}] {g} vs transformers {w}");
        }
        let rms = HfQkNorm { scope: NormScope::Heads, ..norm };
        let head0 = |w: &[f32]| w[..d].iter().cycle().take(w.len()).copied().collect::<Vec<f32>>();
        for (what, moved) in [("the RMS norm", run(&rms, &qw, &kw)), ("head 0's weights", run(&norm, &head0(&qw), &head0(&kw)))] {
            assert!(moved.out.iter().zip(&o.out).any(|(a, b)| (a - b).abs() > 1e-3), "{label}: {what} agrees");
        }
    }
    assert_eq!(cases.len(), 1, "cohere attention cases");
}

/// The kernel's side of the Cohere check: the rope kernel (SIMT emulator, f32) applies the QK
/// LayerNorm per head and the interleaved rotation to transformers' Q and K in one pass, and
/// attention over its output gives CohereAttention's output to f32 accuracy (2e-6 allowed).
#[cfg(feature = "emulator")]
#[test]
fn rope_kernel_cohere_layer_norm_feeds_transformers_attention() {
    use rope_attn::cuda::RopeShape;
    use rope_attn::emulator::Emulator;
    let f = fixtures();
    let case = &cases(&f, "cohere_attention")[0];
    let cfg = case["config"].to_string();
    let layer = hf_layers(&cfg).unwrap()[0];
    let norm = layer.qk_norm.unwrap();
    let rot = Rotary::from_schedule(&RopeConfig::from_hf_config_json(&cfg).unwrap().schedule(None).unwrap(), Layout::Interleaved);
    let p = layer.params().unwrap(); // rope: None, the kernel rotated
    let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
    let exact = |key| exact_f64s("cohere_attention", 0, key);
    let f32s = |key| exact(key).iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (qw, kw) = (norm.weights(&f32s("q_norm_weight")), norm.weights(&f32s("k_norm_weight")));
    let n = exact("q").len() / (hq * d);
    let pos: Vec<i32> = (0..n as i32).collect();
    let (mut q, mut k) = (f32s("q"), f32s("k"));
    Emulator::new().rope_inplace_normed_checked(&mut q, &mut k, &pos, &RopeShape::contiguous(n, hq, hkv, d), &rot, &norm.with(qw.as_deref(), kw.as_deref())).unwrap();
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let k_pos: Vec<i64> = (0..n as i64).collect();
    let got = reference::attention(&wide(&q), &wide(&k), &exact("v"), &k_pos, &k_pos, &p).unwrap().out;
    let worst = got.iter().zip(&exact("out")).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f64::max);
    assert!(worst <= 2e-6, "the kernel's path is {worst:e} from transformers");
    println!("cohere: kernel path within {worst:.1e} of transformers");
}
