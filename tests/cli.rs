//! The `rope-attn` binary end to end: configs written inline to a scratch folder, plus the
//! Llama 3.1 config shipped under examples/configs/.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_rope-attn");

const LLAMA31: &str = r#"{"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
  "max_position_embeddings": 131072, "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;

const YARN: &str = r#"{"hidden_size": 3584, "num_attention_heads": 28, "max_position_embeddings": 32768,
  "rope_theta": 1000000.0,
  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}"#;

const PER_LAYER: &str = r#"{"hidden_size": 2560, "num_attention_heads": 8, "head_dim": 256,
  "max_position_embeddings": 131072,
  "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}"#;

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, json: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, json).unwrap();
    p.to_str().unwrap().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run rope-attn")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 2, a message naming `needle`, and no panic.
fn assert_fails_naming(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(needle), "stderr does not name `{needle}`: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

fn freqs_json(args: &[&str]) -> Value {
    let o = run(args);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    // Exactly one JSON object: parsing the whole of stdout succeeds.
    serde_json::from_str(stdout(&o).trim()).expect("freqs --json prints one JSON object")
}

#[test]
fn freqs_json_has_the_schedule() {
    let dir = scratch("freqs-json");
    let cfg = write(&dir, "llama31.json", LLAMA31);
    let v = freqs_json(&["freqs", &cfg, "--json"]);
    assert_eq!(v["rope_type"], "llama3");
    assert_eq!(v["rotary_dim"], 128);
    assert_eq!(v["head_dim"], 128);
    assert_eq!(v["theta"], 500000.0);
    assert_eq!(v["attention_factor"], 1.0);
    assert!(v["seq_len"].is_null() && v["layer_type"].is_null());
    let inv: Vec<f64> = v["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(inv.len(), 128 / 2);
    assert_eq!(inv[0], 1.0);
    let plain_last = 500000f64.powf(-126.0 / 128.0);
    assert!((inv[63] * 8.0 / plain_last - 1.0).abs() < 1e-12, "lowest frequency is interpolated by 8");
    assert_eq!(v["ratio_to_plain"][63].as_f64().unwrap().to_string(), "0.125");
    assert_eq!(v["decay"]["distance"].as_array().unwrap().len(), 8); // 0, 1, 10, ..., 1e6
    assert_eq!(v["decay"]["sum_cos"][0], 64.0);

    let y = freqs_json(&["freqs", &write(&dir, "yarn.json", YARN), "--json", "--seq-len", "65536"]);
    assert_eq!(y["rope_type"], "yarn");
    assert_eq!(y["seq_len"], 65536);
    let af = y["attention_factor"].as_f64().unwrap();
    assert!((af - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12, "YaRN mscale, got {af}");
}

/// Multimodal RoPE: the sections and each pair's position row, in JSON and in the table.
#[test]
fn freqs_shows_mrope_sections() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/qwen3.6-35b-a3b-text.json");
    let v = freqs_json(&["freqs", cfg, "--json"]);
    assert_eq!((v["head_dim"].as_u64(), v["rotary_dim"].as_u64()), (Some(256), Some(64)));
    assert_eq!(v["mrope"]["sections"], serde_json::json!([11, 11, 10]));
    assert_eq!(v["mrope"]["interleaved"], true);
    let comp: Vec<u64> = v["mrope"]["component"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert_eq!(comp.len(), 32);
    assert_eq!(&comp[..6], &[0, 1, 2, 0, 1, 2]);
    assert_eq!(&comp[30..], &[0, 1], "pair 30: time (30 % 3 == 0); pair 31: height (31 < 3·11)");
    let plain = freqs_json(&["freqs", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/llama-3.1-8b.json"), "--json"]);
    assert!(plain["mrope"].is_null());

    let o = run(&["freqs", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/qwen2.5-vl-7b-instruct.json")]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("sections [16, 24, 24] (time, height, width), chunked"), "{out}");
    let row = |i: usize| out.lines().find(|l| l.trim_start().starts_with(&format!("{i} "))).unwrap().to_string();
    assert!(row(15).ends_with("time") && row(16).ends_with("height") && row(40).ends_with("width"), "{}\n{}", row(15), row(40));
}

#[test]
fn freqs_table_lists_every_pair_and_the_decay() {
    let dir = scratch("freqs-table");
    let o = run(&["freqs", &write(&dir, "llama31.json", LLAMA31)]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    for needle in ["rope_type                llama3", "rotary_dim               128", "wavelength", "long-range decay"]
    {
        assert!(out.contains(needle), "missing `{needle}` in:\n{out}");
    }
    let pair_rows =
        out.lines().filter(|l| l.split_whitespace().count() == 4 && l.trim_start().starts_with(char::is_numeric));
    assert_eq!(pair_rows.count(), 64);
}

#[test]
fn per_layer_configs_need_a_layer_type() {
    let dir = scratch("layer-type");
    let cfg = write(&dir, "gemma.json", PER_LAYER);
    let o = run(&["freqs", &cfg]);
    assert_fails_naming(&o, "full_attention");
    assert_fails_naming(&o, "sliding_attention");
    assert_fails_naming(&run(&["freqs", &cfg, "--layer-type", "global"]), "global");

    let v = freqs_json(&["freqs", &cfg, "--layer-type", "full_attention", "--json"]);
    assert_eq!(v["rope_type"], "linear");
    assert_eq!(v["layer_type"], "full_attention");
    assert_eq!(v["inv_freq"].as_array().unwrap().len(), 128);
    assert_eq!(v["inv_freq"][0], 0.125);
}

#[test]
fn bad_input_exits_2_naming_the_problem() {
    let dir = scratch("bad");
    let missing_key = LLAMA31.replace(r#""low_freq_factor": 1.0,"#, "");
    assert_fails_naming(&run(&["freqs", &write(&dir, "no-low.json", &missing_key)]), "low_freq_factor");
    let bad_factor = LLAMA31.replace(r#""factor": 8.0"#, r#""factor": -2.0"#);
    assert_fails_naming(&run(&["freqs", &write(&dir, "neg.json", &bad_factor), "--json"]), "factor");
    assert_fails_naming(&run(&["freqs", &write(&dir, "trunc.json", "{\"rope_theta\": ")]), "parse");
    assert_fails_naming(&run(&["decay", dir.join("absent.json").to_str().unwrap()]), "absent.json");
    assert_fails_naming(&run(&["freqs"]), "CONFIG");
    assert_fails_naming(&run(&["freqs", "x.json", "--seq-len", "lots"]), "--seq-len");
    assert_fails_naming(&run(&["freqs", "x.json", "--frobnicate"]), "--frobnicate");
    assert_fails_naming(&run(&["transmogrify"]), "transmogrify");
}

#[test]
fn decay_prints_one_row_per_distance_and_one_column_per_config() {
    let dir = scratch("decay");
    let a = write(&dir, "llama31.json", LLAMA31);
    let b = write(&dir, "gemma.json", PER_LAYER);
    let o = run(&["decay", &a, &b, "--layer-type", "sliding_attention", "--max-distance", "1e4"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("llama31 (llama3)") && out.contains("gemma (default)"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 3 && w[0].parse::<f64>().is_ok())
        .collect();
    let distances: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(distances, ["0", "1", "10", "100", "1000", "10000"]);
    assert_eq!(rows[0][1..], ["64.0000", "128.0000"]); // rel 0: the number of pairs
    let far: f64 = rows[5][1].parse().unwrap();
    assert!(far.abs() < 64.0, "decays: {far}");
}

#[test]
fn the_shipped_llama_3_1_config() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/configs/llama-3.1-8b.json");
    if !Path::new(cfg).exists() {
        eprintln!("SKIP: {cfg} is absent");
        return;
    }
    let v = freqs_json(&["freqs", cfg, "--json"]);
    assert_eq!(v["rope_type"], "llama3");
    assert_eq!(v["inv_freq"].as_array().unwrap().len(), v["rotary_dim"].as_u64().unwrap() as usize / 2);
}

#[test]
fn help_everywhere() {
    for args in [&["--help"][..], &["help"], &["help", "freqs"], &["freqs", "--help"], &["decay", "-h"]] {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("USAGE"), "{args:?}");
    }
    assert!(stdout(&run(&["--help"])).contains("freqs"));
    assert_eq!(run(&[]).status.code(), Some(2));
}

#[cfg(feature = "plot")]
#[test]
fn plot_writes_svg_and_png() {
    let dir = scratch("plot");
    let cfg = write(&dir, "llama31.json", LLAMA31);
    let out = dir.join("out");
    let o = run(&["plot", "--out", out.to_str().unwrap(), &cfg, "--grid", "60", "--points", "120"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("computed on CPU (reference)"));
    for stem in ["decay", "scores_100", "scores_1000", "scores_10000"] {
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{stem}.svg");
        assert!(svg.contains("Llama 3.1") || !stem.starts_with("decay"), "decay legend");
        if stem.starts_with("scores") {
            assert!(svg.contains("\"data:image/png;base64,"), "{stem}.svg embeds its cells as one PNG");
        }
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert!(png.len() > 10_000, "{stem}.png is {} bytes", png.len());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
    }
    assert_fails_naming(&run(&["plot", &cfg]), "--out");
}
