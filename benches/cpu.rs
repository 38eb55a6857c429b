//! CPU benchmarks (run anywhere): HF config parsing of the real configs in examples/configs,
//! schedule evaluation per rope type, and the f64 reference (rotate, scores, attention) at small
//! sizes. Short measurement windows: `cargo bench --bench cpu` takes about a minute on 2 cores.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use rope_attn::{reference, Alibi, AttentionParams, Layout, Relative, RopeConfig, RopeScaling, Rotary};
use std::path::Path;
use std::time::Duration;

/// Llama 3.1 8B, used when examples/configs is absent.
const LLAMA31: &str = r#"{"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
  "max_position_embeddings": 131072, "rope_theta": 500000.0,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;

/// (name, json, layer type to pick) for every config in examples/configs.
fn configs() -> Vec<(String, String, Option<String>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> =
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        paths.sort();
        for p in paths {
            let Ok(json) = std::fs::read_to_string(&p) else {
                continue;
            };
            let layer = RopeConfig::hf_layer_types(&json).ok().and_then(|t| t.into_iter().next());
            if RopeConfig::from_hf_config_json_layer(&json, layer.as_deref()).is_ok() {
                out.push((p.file_stem().unwrap().to_string_lossy().into_owned(), json, layer));
            }
        }
    }
    if out.is_empty() {
        eprintln!("examples/configs not found: benchmarking an inline Llama-3.1 config");
        out.push(("llama-3.1-8b (inline)".into(), LLAMA31.into(), None));
    }
    out
}

fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn config_parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("config_parse");
    for (name, json, layer) in configs() {
        g.bench_with_input(BenchmarkId::from_parameter(&name), &json, |b, json| {
            b.iter(|| RopeConfig::from_hf_config_json_layer(black_box(json), layer.as_deref()).unwrap())
        });
    }
    g.finish();
}

/// One config per rope type (head_dim 128), evaluated at a sequence length past the original.
fn schedules(c: &mut Criterion) {
    let d = 128;
    let yarn = RopeScaling::yarn(4.0, 32768);
    let longrope = RopeScaling::LongRope {
        short_factor: (0..d / 2).map(|i| 1.0 + i as f64 * 0.01).collect(),
        long_factor: (0..d / 2).map(|i| 1.0 + i as f64 * 0.5).collect(),
        original_max_position_embeddings: 4096,
        factor: 32.0,
        attention_factor: None,
    };
    let types = [
        RopeScaling::Default,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Dynamic { factor: 2.0, max_position_embeddings: 8192 },
        RopeScaling::Ntk { factor: 4.0 },
        yarn,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
        longrope,
    ];
    let mut g = c.benchmark_group("schedule");
    for scaling in types {
        let name = scaling.name();
        let cfg = RopeConfig::with_scaling(10000.0, d, d, Some(131072), scaling).unwrap();
        g.bench_function(name, |b| b.iter(|| cfg.schedule(black_box(Some(200_000))).unwrap()));
    }
    g.finish();
}

fn reference_ops(c: &mut Criterion) {
    let d = 128;
    let cfg = RopeConfig::from_hf_config_json(LLAMA31).unwrap();
    let rot = Rotary::from_schedule(&cfg.schedule(None).unwrap(), Layout::Half);
    let mut g = c.benchmark_group("reference");

    let (tokens, heads) = (64usize, 40usize);
    let x0 = uniform(tokens * heads * d, 1);
    let pos: Vec<i64> = (0..tokens as i64).map(|t| t * 1000).collect();
    g.bench_function(format!("rotate/{tokens}x{heads}x{d}"), |b| {
        let mut x = x0.clone();
        b.iter(|| {
            x.copy_from_slice(&x0);
            reference::rotate(&mut x, tokens, heads, d, heads * d, &pos, &rot).unwrap();
            black_box(&x);
        })
    });

    // Scores and attention: 64 queries over 64 keys, GQA 4/1, d 64, causal, RoPE + ALiBi;
    // and Leaky ReRoPE (two rotated copies per pair).
    let (n, hq, hkv, d) = (64usize, 4usize, 1usize, 64usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(Rotary::from_schedule(&RopeConfig::new(10000.0, d).unwrap().schedule(None).unwrap(), Layout::Half));
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let leaky = AttentionParams { relative: Relative::Leaky { window: 16, k: 8.0 }, alibi: None, ..p.clone() };
    let (q, k, v) = (uniform(n * hq * d, 2), uniform(n * hkv * d, 3), uniform(n * hkv * d, 4));
    let pos: Vec<i64> = (0..n as i64).collect();
    g.bench_function(format!("scores/rope+alibi/{n}x{n}/gqa{hq}-{hkv}/d{d}"), |b| {
        b.iter(|| reference::scores(black_box(&q), &k, &pos, &pos, &p).unwrap())
    });
    g.bench_function(format!("attention/rope+alibi/{n}x{n}/gqa{hq}-{hkv}/d{d}"), |b| {
        b.iter(|| reference::attention(black_box(&q), &k, &v, &pos, &pos, &p).unwrap())
    });
    g.bench_function(format!("attention/leaky-rerope/{n}x{n}/gqa{hq}-{hkv}/d{d}"), |b| {
        b.iter(|| reference::attention(black_box(&q), &k, &v, &pos, &pos, &leaky).unwrap())
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = config_parsing, schedules, reference_ops
}
criterion_main!(benches);
