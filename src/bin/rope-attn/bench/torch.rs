//! The torch baselines: run `benches/torch_sdpa.py` with the prefill cases as JSON on stdin and
//! read its JSON lines back.

use super::cases::PrefillCase;
use super::device::Settings;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// One timing the script reported.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchResult {
    pub id: String,
    pub implementation: String,
    pub ms_median: f64,
    pub ms_min: f64,
    pub note: String,
}

/// Everything one script run said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TorchRun {
    /// The `env` line: torch, CUDA runtime, device, flash_attn versions.
    pub env: Option<Value>,
    pub results: Vec<TorchResult>,
    /// (case id, implementation, message); id and implementation are empty for global errors.
    pub errors: Vec<(String, String, String)>,
    /// bf16 matmul TFLOP/s (the measured matrix ceiling), if timed.
    pub matmul_tflops: Option<f64>,
}

impl TorchRun {
    /// The timing of `implementation` on case `id`.
    #[cfg(test)]
    pub fn ms(&self, id: &str, implementation: &str) -> Option<&TorchResult> {
        self.results.iter().find(|r| r.id == id && r.implementation == implementation)
    }

    /// "torch 2.5.1 (CUDA 12.4), flash_attn 2.6.3" for the report.
    pub fn versions(&self) -> String {
        let Some(env) = &self.env else {
            return "torch: no env line".into();
        };
        let get = |k: &str| env.get(k).and_then(Value::as_str).map(str::to_string);
        let mut s = match get("torch") {
            Some(t) => format!("torch {t} (CUDA runtime {})", get("cuda_runtime").unwrap_or_else(|| "?".into())),
            None => format!("torch: {}", get("error").unwrap_or_else(|| "not importable".into())),
        };
        for (key, name) in [("flash_attn", "flash_attn"), ("flash_attn3", "flash_attn_interface (FA3)")] {
            match get(key) {
                Some(v) => s += &format!(", {name} {v}"),
                None => s += &format!(", no {name}"),
            }
        }
        s
    }
}

/// Parse the script's stdout (JSON lines; anything else is kept as an error).
pub fn parse(text: &str) -> TorchRun {
    let mut run = TorchRun::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => {
                run.errors.push((String::new(), String::new(), format!("unparsed output: {line}")));
                continue;
            }
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        match v.get("type").and_then(Value::as_str) {
            Some("env") => run.env = Some(v.clone()),
            Some("result") => match (f("ms_median"), f("ms_min")) {
                (Some(med), Some(min)) if med > 0.0 && med.is_finite() => run.results.push(TorchResult {
                    id: s("id"),
                    implementation: s("impl"),
                    ms_median: med,
                    ms_min: min,
                    note: s("note"),
                }),
                _ => run.errors.push((s("id"), s("impl"), format!("result without a positive time: {line}"))),
            },
            Some("error") => run.errors.push((s("id"), s("impl"), s("error"))),
            Some("matmul") => run.matmul_tflops = f("tflops"),
            _ => run.errors.push((String::new(), String::new(), format!("unknown line: {line}"))),
        }
    }
    run
}

/// Where the script is: `benches/torch_sdpa.py` under the working directory, else in the
/// source tree this binary was built from.
pub fn script_path() -> PathBuf {
    let local = PathBuf::from("benches/torch_sdpa.py");
    if local.exists() {
        local
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/torch_sdpa.py")
    }
}

/// `Ok(version)` when `python` imports torch and torch sees a CUDA device.
pub fn probe(python: &str) -> Result<String, String> {
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__, torch.cuda.is_available())"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.split_once(' ') {
        Some((v, "True")) if out.status.success() => Ok(v.to_string()),
        Some((v, _)) if out.status.success() => Err(format!("torch {v} sees no CUDA device")),
        _ => Err(format!("{python} cannot import torch")),
    }
}

/// The request the script reads on stdin.
pub fn request(cases: &[PrefillCase], s: &Settings) -> Value {
    let cases: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"id": c.id(), "dtype": c.dtype.name(), "batch": c.batch, "seqlen": c.seqlen, "q_heads": c.q_heads,
                   "kv_heads": c.kv_heads, "head_dim": c.head_dim, "causal": c.causal})
        })
        .collect();
    json!({
        "cases": cases,
        "settings": {"warmup_ms": s.warmup_ms, "rounds": s.rounds, "round_ms": s.round_ms, "max_iters": s.max_iters},
        "impls": ["sdpa_flash", "sdpa_cudnn", "flash_attn", "flash_attn3", "torch_rope_sdpa"],
        "matmul": true,
        "rope_theta": 500000.0,
    })
}

/// Run the script (its stderr goes to ours) and parse what it printed.
pub fn run(python: &str, cases: &[PrefillCase], s: &Settings) -> Result<TorchRun, String> {
    let script = script_path();
    let mut child = Command::new(python)
        .arg(&script)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {python} {}: {e}", script.display()))?;
    let body = request(cases, s).to_string();
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(body.as_bytes())
        .map_err(|e| format!("writing to the torch script: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("waiting for the torch script: {e}"))?;
    let run = parse(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(format!("{} exited with {} ({} results read)", script.display(), out.status, run.results.len()));
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cases::{DType, PrefillCase};

    #[test]
    fn parses_every_line_kind() {
        let text = r#"{"type": "env", "torch": "2.5.1", "cuda_runtime": "12.4", "flash_attn": null, "flash_attn3": null}
{"type": "matmul", "dtype": "bf16", "n": 8192, "tflops": 700.5, "ms_median": 1.5}
{"type": "result", "id": "bf16-d128-b1-n2048-causal", "impl": "sdpa_flash", "ms_median": 0.25, "ms_min": 0.24, "iters": 20, "sets": 8, "note": "gqa native (enable_gqa)"}
{"type": "result", "id": "x", "impl": "flash_attn", "ms_median": 0.0, "ms_min": 0.0}
{"type": "error", "id": "bf16-d128-b1-n2048-causal", "impl": "flash_attn", "error": "ModuleNotFoundError: No module named 'flash_attn'"}
Traceback (most recent call last):
"#;
        let r = parse(text);
        assert_eq!(r.matmul_tflops, Some(700.5));
        assert_eq!(r.results.len(), 1);
        let sdpa = r.ms("bf16-d128-b1-n2048-causal", "sdpa_flash").unwrap();
        assert_eq!((sdpa.ms_median, sdpa.ms_min, sdpa.note.as_str()), (0.25, 0.24, "gqa native (enable_gqa)"));
        assert!(r.ms("bf16-d128-b1-n2048-causal", "flash_attn").is_none());
        assert_eq!(r.errors.len(), 3, "{:?}", r.errors);
        assert_eq!(r.versions(), "torch 2.5.1 (CUDA runtime 12.4), no flash_attn, no flash_attn_interface (FA3)");
    }

    #[test]
    fn the_request_carries_the_case_ids() {
        let c = PrefillCase {
            dtype: DType::F16,
            head_dim: 64,
            batch: 16,
            seqlen: 2048,
            causal: false,
            q_heads: 32,
            kv_heads: 8,
        };
        let v = request(&[c], &Settings::quick());
        assert_eq!(v["cases"][0]["id"], "f16-d64-b16-n2048-full");
        assert_eq!(v["cases"][0]["kv_heads"], 8);
        assert_eq!(v["settings"]["rounds"], 5);
    }
}
