//! Multimodal RoPE on the CPU: which position each pair takes (against a transcription of
//! transformers' two constructions), config parsing (Qwen2.5-VL's flat `rope_scaling`, the
//! nested `text_config` of Qwen3.5 / 3.6), refusals, and the f64 reference against transformers'
//! formula written out here (cos/sin of `cat(freqs, freqs)`, `rotate_half`). The fixture file
//! compares the same reference with transformers itself (tests/hf_fixtures.rs); the kernels
//! are compared with the reference in tests/emu_rope_scores.rs and tests/gpu_rope.rs.

use rope_attn::{reference, Error, Layout, MRope, RopeConfig, Rotary};
use serde_json::{json, Value};

fn config(name: &str) -> String {
    std::fs::read_to_string(format!("{}/examples/configs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Qwen2-VL's `apply_multimodal_rotary_pos_emb`, transcribed: `mrope_section * 2` splits the
/// `2 * pairs` columns of `cat(freqs, freqs)`, and split `k` takes component `k % 3`.
fn chunked_as_transformers(sections: [usize; 3]) -> Vec<usize> {
    let mut cols = Vec::new();
    for (k, &n) in sections.iter().chain(sections.iter()).enumerate() {
        cols.extend(std::iter::repeat_n(k % 3, n));
    }
    let pairs = cols.len() / 2;
    assert_eq!(cols[..pairs], cols[pairs..], "a rotate_half pair is never split");
    cols.truncate(pairs);
    cols
}

/// Qwen3-VL's `apply_interleaved_mrope`, transcribed: start from time everywhere, then for
/// dim 1 and 2, `freqs_t[..., offset:length:3] = freqs[dim]` with length `3 * sections[dim]`.
fn interleaved_as_transformers(sections: [usize; 3]) -> Vec<usize> {
    let pairs: usize = sections.iter().sum();
    let mut cols = vec![0; pairs];
    for (dim, &n) in sections.iter().enumerate().skip(1) {
        for idx in (dim..(3 * n).min(pairs)).step_by(3) {
            cols[idx] = dim;
        }
    }
    cols
}

const SECTIONS: [[usize; 3]; 6] = [[16, 24, 24], [24, 20, 20], [11, 11, 10], [8, 12, 12], [2, 3, 5], [4, 0, 0]];

#[test]
fn pair_components_match_transformers_constructions() {
    for s in SECTIONS {
        let pairs: usize = s.iter().sum();
        for (interleaved, want) in [(false, chunked_as_transformers(s)), (true, interleaved_as_transformers(s))] {
            let m = MRope { sections: s, interleaved };
            let got: Vec<usize> = (0..pairs).map(|i| m.component(i)).collect();
            assert_eq!(got, want, "{s:?} interleaved={interleaved}");
        }
    }
    // Qwen3-VL's pattern, spelled out: T H W T H W ... with the last pairs time.
    let m = MRope { sections: [24, 20, 20], interleaved: true };
    assert_eq!((0..6).map(|i| m.component(i)).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
    assert_eq!((60..64).map(|i| m.component(i)).collect::<Vec<_>>(), [0, 0, 0, 0]);
}

#[test]
fn qwen_vl_configs_parse_with_their_sections() {
    let cfg = RopeConfig::from_hf_config_json(&config("qwen2.5-vl-7b-instruct.json")).unwrap();
    assert_eq!((cfg.head_dim, cfg.rotary_dim, cfg.theta), (128, 128, 1e6));
    assert_eq!(cfg.mrope, Some(MRope { sections: [16, 24, 24], interleaved: false }));
    let s = cfg.schedule(None).unwrap();
    assert_eq!((s.rope_type, s.mrope), ("default", cfg.mrope));
    assert_eq!(s.inv_freq, RopeConfig::new(1e6, 128).unwrap().schedule(None).unwrap().inv_freq, "M-RoPE keeps the frequencies");

    // Qwen3.6 (the Qwen3.5 stack): everything under text_config, partial rotary 1/4 of 256.
    let cfg = RopeConfig::from_hf_config_json(&config("qwen3.6-35b-a3b-text.json")).unwrap();
    assert_eq!((cfg.head_dim, cfg.rotary_dim, cfg.theta), (256, 64, 1e7));
    assert_eq!(cfg.mrope, Some(MRope { sections: [11, 11, 10], interleaved: true }));
}

fn qwen(scaling: Value) -> String {
    json!({"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 5e6, "max_position_embeddings": 262144,
           "rope_scaling": scaling})
    .to_string()
}

#[track_caller]
fn invalid(json: String, key: &str) {
    match RopeConfig::from_hf_config_json(&json) {
        Err(Error::InvalidValue { key: k, .. }) => assert_eq!(k, key),
        other => panic!("expected InvalidValue naming {key}, got {other:?}"),
    }
}

#[test]
fn mrope_config_forms_and_refusals() {
    // Qwen3-VL: rope_type default with the sections; the flag alone means transformers' default sections.
    let c = RopeConfig::from_hf_config_json(&qwen(json!({"rope_type": "default", "mrope_interleaved": true, "mrope_section": [24, 20, 20]}))).unwrap();
    assert_eq!(c.mrope, Some(MRope { sections: [24, 20, 20], interleaved: true }));
    let c = RopeConfig::from_hf_config_json(&qwen(json!({"rope_type": "default", "mrope_interleaved": true}))).unwrap();
    assert_eq!(c.mrope, Some(MRope { sections: MRope::QWEN3_VL_SECTIONS, interleaved: true }));
    // Sections beside a scaled schedule (YaRN over M-RoPE, as Qwen3.5's long-context recipe).
    let c = RopeConfig::from_hf_config_json(&qwen(
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "mrope_section": [16, 24, 24]}),
    ))
    .unwrap();
    assert_eq!((c.scaling.name(), c.mrope.unwrap().interleaved), ("yarn", false));
    // No sections: plain RoPE; `interleaved: false` alone says nothing either.
    assert_eq!(RopeConfig::from_hf_config_json(&qwen(json!({"rope_type": "default", "mrope_interleaved": false}))).unwrap().mrope, None);

    match RopeConfig::from_hf_config_json(&qwen(json!({"type": "mrope"}))) {
        Err(Error::MissingKey("mrope_section")) => {}
        other => panic!("{other:?}"),
    }
    invalid(qwen(json!({"type": "mrope", "mrope_section": [16, 24, 23]})), "mrope_section");
    invalid(qwen(json!({"type": "mrope", "mrope_section": [16, 48]})), "mrope_section");
    invalid(qwen(json!({"type": "mrope", "mrope_section": [16, -24, 72]})), "mrope_section");
    invalid(qwen(json!({"type": "mrope", "mrope_section": [16, 24.5, 23.5]})), "mrope_section");
    invalid(qwen(json!({"type": "mrope", "mrope_section": "16,24,24"})), "mrope_section");
    invalid(qwen(json!({"type": "mrope", "mrope_section": [16, 24, 24], "mrope_interleaved": "yes"})), "mrope_interleaved");
    // By hand: the same check.
    assert!(RopeConfig::new(1e6, 128).unwrap().with_mrope(MRope { sections: [16, 24, 25], interleaved: false }).is_err());
}

/// Transformers' M-RoPE for one head, written out in f64: freqs per component, the sections
/// chosen as transformers chooses them, `cos/sin(cat(freqs, freqs))`, `x·cos + rotate_half(x)·sin`
/// over the rotary part, the rest passed through.
fn hf_formula(x: &[f64], pos: [i64; 3], inv_freq: &[f64], m: &MRope) -> Vec<f64> {
    let pairs = inv_freq.len();
    let comp = if m.interleaved { interleaved_as_transformers(m.sections) } else { chunked_as_transformers(m.sections) };
    let freqs: Vec<f64> = (0..pairs).map(|i| pos[comp[i]] as f64 * inv_freq[i]).collect();
    let emb: Vec<f64> = freqs.iter().chain(freqs.iter()).copied().collect();
    let r = 2 * pairs;
    let rotate_half = |j: usize| if j < pairs { -x[j + pairs] } else { x[j - pairs] };
    let mut out = x.to_vec();
    for j in 0..r {
        out[j] = x[j] * emb[j].cos() + rotate_half(j) * emb[j].sin();
    }
    out
}

#[test]
fn reference_matches_the_transformers_formula() {
    let mut cases = 0;
    for (name, d) in [("qwen2.5-vl-7b-instruct.json", 128), ("qwen3.6-35b-a3b-text.json", 256)] {
        let cfg = RopeConfig::from_hf_config_json(&config(name)).unwrap();
        let sched = cfg.schedule(None).unwrap();
        let m = sched.mrope.unwrap();
        let rot = Rotary::from_schedule(&sched, Layout::Half);
        // Text tokens (three equal positions), an image grid (time fixed), a video frame, and far positions.
        let positions: Vec<[i64; 3]> =
            vec![[0, 0, 0], [5, 5, 5], [6, 6, 6], [6, 6, 7], [6, 7, 6], [6, 7, 9], [8, 40, 33], [1 << 24, (1 << 24) + 17, 3], [100_000, 99_000, 98_765]];
        let (tokens, heads) = (positions.len(), 2);
        let x: Vec<f64> = (0..tokens * heads * d).map(|i| ((i * 7919 % 1013) as f64 / 506.5) - 1.0).collect();
        let mut got = x.clone();
        reference::rotate_mrope(&mut got, tokens, heads, d, heads * d, &positions, &rot, &m).unwrap();
        for (t, p) in positions.iter().enumerate() {
            for h in 0..heads {
                let s = (t * heads + h) * d;
                let want = hf_formula(&x[s..s + d], *p, &sched.inv_freq, &m);
                for (j, (g, w)) in got[s..s + d].iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-12, "{name} token {t} head {h} component {j}: {g} vs {w}");
                }
                cases += 1;
            }
        }
        // A text token is plain RoPE at its position, to the bit.
        let mut plain = x.clone();
        reference::rotate(&mut plain, tokens, heads, d, heads * d, &positions.iter().map(|p| p[0]).collect::<Vec<_>>(), &rot).unwrap();
        for (t, p) in positions.iter().enumerate() {
            let s = t * heads * d..(t + 1) * heads * d;
            assert_eq!(p[0] == p[1] && p[1] == p[2], got[s.clone()] == plain[s], "{name} token {t}");
        }
    }
    assert_eq!(cases, 2 * 9 * 2);
}

#[test]
fn reference_refuses_bad_mrope_inputs() {
    let rot = Rotary::from_schedule(&RopeConfig::new(1e4, 8).unwrap().schedule(None).unwrap(), Layout::Half);
    let m = MRope { sections: [2, 1, 1], interleaved: false };
    let mut x = vec![0.5; 16];
    assert!(reference::rotate_mrope(&mut x, 2, 1, 8, 8, &[[0, 0, 0]], &rot, &m).is_err(), "one position row short");
    assert!(reference::rotate_mrope(&mut x, 2, 1, 8, 8, &[[0, 0, 0], [1, -1, 1]], &rot, &m).is_err(), "negative position");
    let bad = MRope { sections: [2, 1, 2], interleaved: false };
    assert!(reference::rotate_mrope(&mut x, 2, 1, 8, 8, &[[0, 0, 0], [1, 1, 1]], &rot, &bad).is_err(), "sections past the pairs");
    assert_eq!(x, vec![0.5; 16], "nothing rotated on refusal");
}
