//! One Llama-style attention block run the way an LLM server runs it: a prompt prefilled, then
//! N decode steps over a paged KV cache of *unrotated* keys, with the positions and RoPE schedule
//! of a real `config.json` (dynamic NTK recomputed at every length, as it should be).
//!
//! On a GPU: bf16 projections uploaded, fused prefill (`attention_fwd`), `paged_append` of each new
//! token's K/V, paged `attention_decode`, and checked mode confirming every step against the f64
//! CPU reference. Without one: the same block on the CPU reference path.
//!
//! ```text
//! cargo run --release --example decoder -- examples/configs/llama-3.1-8b.json [--prompt 128] [--steps 32] [--cpu]
//! ```

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::cuda::{self, AttentionBatch, DecodeBatch, Gpu, PagedKvCache};
use rope_attn::{reference, AttentionParams, Layout, RopeConfig, Rotary};
use std::io::Write;
use std::time::Instant;

struct Args {
    config: String,
    layer_type: Option<String>,
    prompt: usize,
    steps: usize,
    force_cpu: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { config: "examples/configs/llama-3.1-8b.json".into(), layer_type: None, prompt: 128, steps: 32, force_cpu: false };
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match x.as_str() {
            "--prompt" => a.prompt = val("--prompt")?.parse().map_err(|e| format!("--prompt: {e}"))?,
            "--steps" => a.steps = val("--steps")?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--layer-type" => a.layer_type = Some(val("--layer-type")?),
            "--cpu" => a.force_cpu = true,
            "-h" | "--help" => return Err("usage: decoder [CONFIG] [--prompt N] [--steps N] [--layer-type T] [--cpu]".into()),
            s if !s.starts_with('-') => a.config = s.to_string(),
            s => return Err(format!("unknown option {s}")),
        }
    }
    if a.prompt == 0 {
        return Err("--prompt must be >= 1".into());
    }
    Ok(a)
}

/// The block's geometry, from the same config.json.
struct Model {
    hidden: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    rope: RopeConfig,
}

fn load_model(a: &Args) -> Result<Model, String> {
    let text = std::fs::read_to_string(&a.config).map_err(|e| format!("{}: {e}", a.config))?;
    let rope = RopeConfig::from_hf_config_json_layer(&text, a.layer_type.as_deref()).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
    let hq = get("num_attention_heads").ok_or("config has no num_attention_heads")?;
    let hkv = get("num_key_value_heads").unwrap_or(hq);
    let hidden = get("hidden_size").ok_or("config has no hidden_size")?;
    Ok(Model { hidden, hq, hkv, d: rope.head_dim, rope })
}

/// y = x W for row-major x [n, k] and W [k, m] (f32; the demo's projections).
fn matmul(x: &[f32], w: &[f32], k: usize, m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut y = vec![0f32; n * m];
    for i in 0..n {
        for (kk, &xv) in x[i * k..(i + 1) * k].iter().enumerate() {
            let wr = &w[kk * m..(kk + 1) * m];
            for (yv, &wv) in y[i * m..(i + 1) * m].iter_mut().zip(wr) {
                *yv += xv * wv;
            }
        }
    }
    y
}

fn random(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0) * scale).collect()
}

/// Round through bf16, the dtype the GPU path computes in, so both paths see the same inputs.
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn progress(done: usize, total: usize, what: &str) {
    let w = 30;
    let filled = w * done / total.max(1);
    let _ = write!(std::io::stderr(), "\r[{}{}] {done}/{total} {what}   ", "#".repeat(filled), " ".repeat(w - filled));
    if done == total {
        let _ = writeln!(std::io::stderr());
    }
}

struct Weights {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let m = load_model(a)?;
    let total = a.prompt + a.steps;
    let s0 = m.rope.schedule(Some(total)).map_err(|e| e.to_string())?;
    println!(
        "{}: hidden {}, {} query heads / {} KV heads, head_dim {}, rope {} (rotary {}, attention factor {:.4})",
        a.config, m.hidden, m.hq, m.hkv, m.d, s0.rope_type, s0.rotary_dim, s0.attention_factor
    );
    let gpu = if a.force_cpu {
        None
    } else {
        match cuda::device_status() {
            Ok(_) => Some(Gpu::new(0).map_err(|e| e.to_string())?),
            Err(why) => {
                println!("no GPU ({why}): running the CPU reference path");
                None
            }
        }
    };
    if let Some(g) = &gpu {
        println!("running on {} with checked mode against the f64 CPU reference", g.describe());
    }
    let mut r = StdRng::seed_from_u64(2024);
    let scale = 1.0 / (m.hidden as f32).sqrt();
    let w = Weights {
        wq: bf16_round(&random(&mut r, m.hidden * m.hq * m.d, scale)),
        wk: bf16_round(&random(&mut r, m.hidden * m.hkv * m.d, scale)),
        wv: bf16_round(&random(&mut r, m.hidden * m.hkv * m.d, scale)),
        wo: bf16_round(&random(&mut r, m.hq * m.d * m.hidden, 1.0 / ((m.hq * m.d) as f32).sqrt())),
    };
    let prompt = random(&mut r, a.prompt * m.hidden, 1.0);
    let params_at = |len: usize| -> Result<AttentionParams, String> {
        let s = m.rope.schedule(Some(len)).map_err(|e| e.to_string())?;
        let mut p = AttentionParams::new(m.hq, m.hkv, m.d);
        p.rope = Some(Rotary::from_schedule(&s, Layout::Half));
        Ok(p)
    };
    let t0 = Instant::now();
    let outputs = match &gpu {
        Some(g) => run_gpu(g, a, &m, &w, &prompt, &params_at)?,
        None => run_cpu(a, &m, &w, &prompt, &params_at)?,
    };
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    println!(
        "done: prompt {} + {} decode steps in {:.2?}; last output row norm {:.6}",
        a.prompt,
        a.steps,
        t0.elapsed(),
        norm(&outputs[outputs.len() - m.hidden..])
    );
    Ok(())
}

/// Q, K, V of rows x [n, hidden], bf16-rounded like the GPU path's inputs.
fn qkv(m: &Model, w: &Weights, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let f = |wm: &[f32], width: usize| bf16_round(&matmul(x, wm, m.hidden, width));
    (f(&w.wq, m.hq * m.d), f(&w.wk, m.hkv * m.d), f(&w.wv, m.hkv * m.d))
}

/// The next decode step's input: the previous token's block output (residual + attention).
fn next_input(m: &Model, w: &Weights, x_last: &[f32], attn_last: &[f32]) -> Vec<f32> {
    let o = matmul(attn_last, &w.wo, m.hq * m.d, m.hidden);
    let y: Vec<f32> = x_last.iter().zip(&o).map(|(a, b)| a + b).collect();
    let rms = (y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32).sqrt().max(1e-6);
    y.iter().map(|v| v / rms).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

type ParamsAt<'a> = dyn Fn(usize) -> Result<AttentionParams, String> + 'a;

fn run_cpu(a: &Args, m: &Model, w: &Weights, prompt: &[f32], params_at: &ParamsAt) -> Result<Vec<f32>, String> {
    let (mut q, mut k, mut v) = qkv(m, w, prompt);
    let pos: Vec<i64> = (0..a.prompt as i64).collect();
    let p = params_at(a.prompt)?;
    let o = reference::attention(&to64(&q), &to64(&k), &to64(&v), &pos, &pos, &p).map_err(|e| e.to_string())?;
    let mut attn: Vec<f32> = o.out.iter().map(|&x| x as f32).collect();
    let row = m.hq * m.d;
    let mut x_last = prompt[(a.prompt - 1) * m.hidden..].to_vec();
    for step in 0..a.steps {
        let len = a.prompt + step + 1;
        let x = next_input(m, w, &x_last, &attn[attn.len() - row..]);
        let (qn, kn, vn) = qkv(m, w, &x);
        k.extend_from_slice(&kn);
        v.extend_from_slice(&vn);
        q = qn;
        let k_pos: Vec<i64> = (0..len as i64).collect();
        let o = reference::attention(&to64(&q), &to64(&k), &to64(&v), &[len as i64 - 1], &k_pos, &params_at(len)?)
            .map_err(|e| e.to_string())?;
        attn = o.out.iter().map(|&x| x as f32).collect();
        x_last = x;
        progress(step + 1, a.steps, "decode steps (CPU reference)");
    }
    Ok(next_input(m, w, &x_last, &attn))
}

fn run_gpu(g: &Gpu, a: &Args, m: &Model, w: &Weights, prompt: &[f32], params_at: &ParamsAt) -> Result<Vec<f32>, String> {
    let e = |e: rope_attn::Error| e.to_string();
    let d = |e: cudarc::driver::DriverError| e.to_string();
    let stream = g.context().default_stream();
    let up = |x: &[f32]| stream.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).map_err(d);
    let (hq, hkv, dd) = (m.hq, m.hkv, m.d);
    let (q, k, v) = qkv(m, w, prompt);
    let (qd, kd, vd) = (up(&q)?, up(&k)?, up(&v)?);
    let p = params_at(a.prompt)?;
    let mut out = stream.alloc_zeros::<bf16>(a.prompt * hq * dd).map_err(d)?;
    let mut lse = stream.alloc_zeros::<f32>(a.prompt * hq).map_err(d)?;
    let cu = stream.clone_htod(&[0i32, a.prompt as i32]).map_err(d)?;
    let batch = AttentionBatch::single(&p, a.prompt, a.prompt);
    let (path, rep) = cuda::attention_fwd_checked(g, &stream, &qd, &kd, &vd, &mut out, &mut lse, &cu, &cu, &batch, &p, None).map_err(e)?;
    println!("prefill {} tokens ({path:?} path): max abs error vs reference {:.2e} (tolerance {:.1e})", a.prompt, rep.max_abs, rep.tolerance.abs);

    // The paged cache: pages of 16 tokens handed out back to front, so the block table really indirects.
    let page = 16;
    let total = a.prompt + a.steps;
    let max_pages = total.div_ceil(page);
    let cache = PagedKvCache { num_pages: max_pages, page_size: page, kv_heads: hkv, head_dim: dd };
    let table: Vec<i32> = (0..max_pages as i32).rev().collect();
    let slot = |t: usize| table[t / page] * page as i32 + (t % page) as i32;
    let table_d = stream.clone_htod(&table).map_err(d)?;
    let mut kc = stream.alloc_zeros::<bf16>(cache.len()).map_err(d)?;
    let mut vc = stream.alloc_zeros::<bf16>(cache.len()).map_err(d)?;
    let slots = stream.clone_htod(&(0..a.prompt).map(slot).collect::<Vec<_>>()).map_err(d)?;
    cuda::paged_append(g, &stream, &kd, &vd, &mut kc, &mut vc, &slots, a.prompt, hkv * dd, hkv * dd, &cache).map_err(e)?;

    let row = hq * dd;
    let mut attn: Vec<f32> = stream.clone_dtoh(&out).map_err(d)?[(a.prompt - 1) * row..].iter().map(|x| x.to_f32()).collect();
    let mut x_last = prompt[(a.prompt - 1) * m.hidden..].to_vec();
    let mut worst = 0f64;
    for step in 0..a.steps {
        let len = a.prompt + step + 1;
        let x = next_input(m, w, &x_last, &attn);
        let (qn, kn, vn) = qkv(m, w, &x);
        let (qd, kd, vd) = (up(&qn)?, up(&kn)?, up(&vn)?);
        let s = stream.clone_htod(&[slot(len - 1)]).map_err(d)?;
        cuda::paged_append(g, &stream, &kd, &vd, &mut kc, &mut vc, &s, 1, hkv * dd, hkv * dd, &cache).map_err(e)?;
        let p = params_at(len)?;
        let lens = stream.clone_htod(&[len as i32]).map_err(d)?;
        let batch = DecodeBatch::contiguous(&p, 1, 1, max_pages, len);
        let mut o = stream.alloc_zeros::<bf16>(row).map_err(d)?;
        let mut l = stream.alloc_zeros::<f32>(hq).map_err(d)?;
        let rep = cuda::attention_decode_checked(g, &stream, &qd, &kc, &vc, &table_d, &lens, &mut o, &mut l, &cache, &batch, &p, 1, None)
            .map_err(e)?;
        worst = worst.max(rep.max_abs);
        attn = stream.clone_dtoh(&o).map_err(d)?.iter().map(|x| x.to_f32()).collect();
        x_last = x;
        progress(step + 1, a.steps, "decode steps (GPU, checked)");
    }
    println!("{} decode steps checked against the CPU reference: max abs error {worst:.2e}", a.steps);
    Ok(next_input(m, w, &x_last, &attn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU path end to end on a real config (CI runs this: `cargo test` builds examples).
    #[test]
    fn decoder_runs_on_the_cpu_reference_path() {
        for config in ["examples/configs/llama-3.1-8b.json", "examples/configs/qwen2.5-7b-instruct-yarn.json"] {
            let a = Args { config: config.into(), layer_type: None, prompt: 12, steps: 3, force_cpu: true };
            run(&a).unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(["--prompt".to_string(), "0".to_string()].into_iter()).is_err());
        assert!(parse_args(["--steps".to_string()].into_iter()).is_err());
        assert!(parse_args(["--bogus".to_string()].into_iter()).is_err());
    }
}
