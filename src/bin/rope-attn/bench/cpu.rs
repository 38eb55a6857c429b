//! CPU mode: time the f64 reference at tiny sizes (what the command can do without a GPU).
//! These are CPU numbers of the exact reference, not of the kernels.

use super::report::Row;
use rope_attn::{reference, Alibi, AttentionParams, Layout, RopeConfig, Rotary};
use std::hint::black_box;
use std::time::Instant;

/// Llama 3.1 8B's `config.json`, RoPE part (inline so that the command works anywhere).
pub const LLAMA31_CONFIG: &str = r#"{"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
  "max_position_embeddings": 131072, "rope_theta": 500000.0,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;

/// (median, min) milliseconds per call: calls batched to >= `batch_ms`, `rounds` batches.
pub fn time_ms(batch_ms: f64, rounds: usize, f: &mut dyn FnMut()) -> (f64, f64) {
    let t0 = Instant::now();
    f();
    let one = t0.elapsed().as_secs_f64() * 1e3;
    let iters = ((batch_ms / one.max(1e-6)).ceil() as usize).clamp(1, 1_000_000);
    let mut per: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / iters as f64
        })
        .collect();
    per.sort_by(f64::total_cmp);
    (per[per.len() / 2], per[0])
}

fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut r = super::device::SplitMix(seed);
    (0..n).map(|_| r.uniform()).collect()
}

/// Time config parsing, schedule evaluation, rotation, scores and attention of the reference.
pub fn run(quick: bool) -> Result<Vec<Row>, String> {
    let (batch_ms, rounds) = if quick { (5.0, 3) } else { (20.0, 5) };
    let mut rows = Vec::new();
    let mut push = |implementation: &str,
                    case: String,
                    pe: &'static str,
                    (d, hq, hkv, n): (usize, usize, usize, usize),
                    t: (f64, f64),
                    flops: Option<f64>,
                    note: String| {
        rows.push(Row {
            section: "cpu",
            case,
            implementation: implementation.into(),
            pe,
            dtype: "f64".into(),
            head_dim: d,
            batch: 1,
            seq: n,
            q_heads: hq,
            kv_heads: hkv,
            causal: None,
            path: "cpu reference".into(),
            ms_median: t.0,
            ms_min: t.1,
            tflops: flops.map(|f| f / (t.0 * 1e-3) / 1e12),
            note,
            ..Row::default()
        });
    };

    let cfg = RopeConfig::from_hf_config_json(LLAMA31_CONFIG).map_err(|e| e.to_string())?;
    let t = time_ms(batch_ms, rounds, &mut || {
        black_box(RopeConfig::from_hf_config_json(black_box(LLAMA31_CONFIG)).unwrap());
    });
    push(
        "RopeConfig::from_hf_config_json",
        "llama-3.1-8b".into(),
        "rope",
        (cfg.head_dim, 32, 8, 0),
        t,
        None,
        String::new(),
    );
    let t = time_ms(batch_ms, rounds, &mut || {
        black_box(cfg.schedule(black_box(Some(200_000))).unwrap());
    });
    push(
        "RopeConfig::schedule",
        "llama-3.1-8b llama3".into(),
        "rope",
        (cfg.head_dim, 32, 8, 0),
        t,
        None,
        String::new(),
    );

    let rot = Rotary::from_schedule(&cfg.schedule(None).map_err(|e| e.to_string())?, Layout::Half);
    let (tokens, heads, d) = (256usize, 40usize, 128usize);
    let x0 = uniform(tokens * heads * d, 1);
    let pos: Vec<i64> = (0..tokens as i64).collect();
    let mut x = x0.clone();
    let t = time_ms(batch_ms, rounds, &mut || {
        x.copy_from_slice(&x0);
        reference::rotate(&mut x, tokens, heads, d, heads * d, &pos, &rot).unwrap();
        black_box(&x);
    });
    push(
        "reference::rotate",
        format!("{tokens} tokens x {heads} heads"),
        "rope",
        (d, 32, 8, tokens),
        t,
        None,
        format!("{:.1} ns per pair", t.0 * 1e6 / (tokens * heads * d / 2) as f64),
    );

    let (n, hq, hkv, d) = if quick { (64usize, 4usize, 1usize, 64usize) } else { (128, 4, 1, 64) };
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(Rotary::from_schedule(
        &RopeConfig::new(10000.0, d).and_then(|c| c.schedule(None)).map_err(|e| e.to_string())?,
        Layout::Half,
    ));
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let (q, k, v) = (uniform(n * hq * d, 2), uniform(n * hkv * d, 3), uniform(n * hkv * d, 4));
    let pos: Vec<i64> = (0..n as i64).collect();
    let flops = 4.0 * (hq * n * n * d) as f64 / 2.0;
    let t = time_ms(batch_ms, rounds, &mut || {
        black_box(reference::scores(&q, &k, &pos, &pos, &p).unwrap());
    });
    push(
        "reference::scores",
        format!("1x{n} causal GQA {hq}/{hkv}"),
        "rope+alibi",
        (d, hq, hkv, n),
        t,
        Some(flops / 2.0),
        String::new(),
    );
    let t = time_ms(batch_ms, rounds, &mut || {
        black_box(reference::attention(&q, &k, &v, &pos, &pos, &p).unwrap());
    });
    push(
        "reference::attention",
        format!("1x{n} causal GQA {hq}/{hkv}"),
        "rope+alibi",
        (d, hq, hkv, n),
        t,
        Some(flops),
        String::new(),
    );
    Ok(rows)
}

/// The CPU table.
pub fn table(rows: &[Row]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.implementation.clone(),
                r.case.clone(),
                format_ms(r.ms_median),
                r.tflops.map_or_else(|| "—".into(), |t| format!("{:.2}", t * 1e3)),
                r.note.clone(),
            ]
        })
        .collect();
    super::report::table(&["f64 reference", "case", "median", "GFLOP/s", "note"], &body)
}

/// `0.0123` ms → "12.3 µs".
pub fn format_ms(ms: f64) -> String {
    if ms < 1e-3 {
        format!("{:.1} ns", ms * 1e6)
    } else if ms < 1.0 {
        format!("{:.1} µs", ms * 1e3)
    } else {
        format!("{ms:.2} ms")
    }
}
