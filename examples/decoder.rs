//! One Llama-style attention block run the way an LLM server runs it: a prompt prefilled, then
//! N decode steps over a paged KV cache of *unrotated* keys, with the positions and RoPE schedule
//! of a real `config.json` (dynamic NTK recomputed at every length, as it should be).
//!
//! The kernels' path: bf16 projections, prefill (`attention_fwd`, with the key workspace when
//! `prefill_prefers_workspace` says so), `paged_append` of each new token's K/V, paged
//! `attention_decode`, with checked mode confirming every step against the f64 CPU reference.
//! `--chunk N` prefills the prompt in chunks of N tokens straight over the paged cache
//! (`attention_fwd_paged`), as a server doing chunked prefill does. A gated query (Qwen3-Next,
//! Qwen3.5) takes the `_gated` forms, which read the gates from q_proj's rows and write O
//! gated. Gemma 4's layers (`examples/shapes/gemma-4-12b-text-shape.json`; `--layer 5` is a
//! full layer, head_dim 512) take V from k_proj where the config says so and normalise it: the
//! norm fused into the cache append (`paged_append_v_normed`), and for the prefill's own dense V
//! `qk_norm_inplace` with no Q. It runs on a GPU when one is present; otherwise, built with
//! `--features emulator`, the same kernels run in the SIMT emulator on the CPU; otherwise (or
//! with `--cpu`) the block runs on the f64 CPU reference alone.
//!
//! ```text
//! cargo run --release --features emulator --example decoder -- examples/configs/llama-3.1-8b.json [--prompt 128] [--steps 32] [--chunk N] [--cpu]
//! ```

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::cuda::{self, AttentionBatch, CheckReport, DecodeBatch, Gpu, PagedKvCache, PagedPrefillBatch, RopeShape};
use rope_attn::{hf_layers, reference, AttentionParams, HfLayer, LayerAttention, Layout, NormScope, NormWeight, OutputGate, QkNorm, RopeConfig, Rotary};
use std::io::Write;
use std::time::Instant;

#[derive(Clone)]
struct Args {
    config: String,
    /// The decoder layer to run (its mask, and whether it rotates); None: the first with softmax attention.
    layer: Option<usize>,
    layer_type: Option<String>,
    prompt: usize,
    steps: usize,
    /// Prefill the prompt in chunks of this many tokens over the paged cache (None: in one call).
    chunk: Option<usize>,
    force_cpu: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { config: "examples/configs/llama-3.1-8b.json".into(), layer: None, layer_type: None, prompt: 128, steps: 32, chunk: None, force_cpu: false };
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match x.as_str() {
            "--prompt" => a.prompt = val("--prompt")?.parse().map_err(|e| format!("--prompt: {e}"))?,
            "--steps" => a.steps = val("--steps")?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--layer" => a.layer = Some(val("--layer")?.parse().map_err(|e| format!("--layer: {e}"))?),
            "--layer-type" => a.layer_type = Some(val("--layer-type")?),
            "--chunk" => a.chunk = Some(val("--chunk")?.parse().map_err(|e| format!("--chunk: {e}"))?),
            "--cpu" => a.force_cpu = true,
            "-h" | "--help" => return Err("usage: decoder [CONFIG] [--prompt N] [--steps N] [--chunk N] [--layer N] [--layer-type T] [--cpu]".into()),
            s if !s.starts_with('-') => a.config = s.to_string(),
            s => return Err(format!("unknown option {s}")),
        }
    }
    if a.prompt == 0 {
        return Err("--prompt must be >= 1".into());
    }
    if a.chunk == Some(0) {
        return Err("--chunk must be >= 1".into());
    }
    Ok(a)
}

/// The block's geometry and attention options, from the same config.json.
struct Model {
    hidden: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    rope: RopeConfig,
    /// The layer run: its index, mask (full, sliding window, Llama 4's chunks) and whether it
    /// rotates (Llama 4's NoPE layers do not), as transformers reads the config (`hf_layers`).
    layer: (usize, HfLayer),
    /// Llama 4 rotates adjacent pairs (its complex `freqs_cis`); the others rotate halves.
    layout: Layout,
    /// Gemma 2's `attn_logit_softcapping` (`HfLayer::softcap`).
    softcap: Option<f64>,
    /// Gemma's `query_pre_attn_scalar^-0.5`, Granite's `attention_multiplier`, ...
    /// (`HfLayer::scale`); else 1/sqrt(head_dim).
    scale: Option<f64>,
    /// GPT-OSS's learned sinks are weights, not config: the demo draws one logit per head.
    sinks: Option<Vec<f64>>,
}

impl Model {
    /// Columns of q_proj: each query head's d, and as many more of output gate where the
    /// layer's query is gated (Qwen3-Next, Qwen3.5: query then gate, per head).
    fn q_width(&self) -> usize {
        self.hq * self.d * if self.layer.1.gated_query { 2 } else { 1 }
    }
}

fn load_model(a: &Args) -> Result<Model, String> {
    let text = std::fs::read_to_string(&a.config).map_err(|e| format!("{}: {e}", a.config))?;
    let layers = hf_layers(&text).map_err(|e| e.to_string())?;
    let index = match a.layer {
        Some(i) if i < layers.len() => i,
        Some(i) => return Err(format!("--layer {i}: the config has {} layers", layers.len())),
        None => layers.iter().position(|l| l.mask().is_some()).ok_or("no layer of the config runs softmax attention")?,
    };
    let layer = layers[index];
    if layer.mask().is_none() {
        return Err(format!("layer {index} is {}, not softmax attention", layer.layer_type()));
    }
    // A per-layer-type rope_parameters (Gemma 3) takes the layer's type unless one is given.
    let per_type = !RopeConfig::hf_layer_types(&text).map_err(|e| e.to_string())?.is_empty();
    let layer_type = a.layer_type.as_deref().or(per_type.then(|| layer.layer_type()));
    let rope = RopeConfig::from_hf_config_json_layer(&text, layer_type).map_err(|e| e.to_string())?;
    let root: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    // Vision-language configs keep the language model's keys in text_config (Qwen3.5/3.6).
    let v = match root.get("text_config") {
        Some(t) if root.get("num_attention_heads").is_none() => t,
        _ => &root,
    };
    let hidden = v.get("hidden_size").and_then(|x| x.as_u64()).ok_or("config has no hidden_size")? as usize;
    // The layer's heads, scale and soft-capping as transformers' attention module takes them.
    // MLA models (DeepSeek) have none the kernels take: the demo runs their rope part's width.
    let (hq, hkv) = match layer.heads {
        Some(h) if h.head_dim != rope.head_dim => {
            return Err(format!("layer {index}: head_dim {} but its rotation covers {}", h.head_dim, rope.head_dim))
        }
        Some(h) => (h.num_q_heads, h.num_kv_heads),
        None => {
            let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
            let hq = get("num_attention_heads").ok_or("config has no num_attention_heads")?;
            (hq, get("num_key_value_heads").unwrap_or(hq))
        }
    };
    let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    let layout = if model_type.starts_with("llama4") { Layout::Interleaved } else { Layout::Half };
    let sinks = (model_type == "gpt_oss")
        .then(|| (0..hq).map(|h| ((h * 37) % 11) as f64 / 5.0 - 1.0).collect());
    Ok(Model {
        hidden,
        hq,
        hkv,
        d: rope.head_dim,
        rope,
        layer: (index, layer),
        layout,
        softcap: layer.softcap,
        scale: layer.scale,
        sinks,
    })
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
    /// The layer's QK norm with the kernels' weights (drawn as a checkpoint's, in its form).
    norm: Option<QkNorm<Vec<f32>>>,
}

impl Weights {
    /// Random projections (bf16 values: Q, K, V of `scale`, O of `out_scale`) for the model,
    /// and its QK norm's weights.
    fn draw(r: &mut StdRng, m: &Model, scale: f32, out_scale: f32) -> Self {
        let (wq, wk, wv) = (m.hidden * m.q_width(), m.hidden * m.hkv * m.d, m.hidden * m.hkv * m.d);
        let (wq, wk, wv) = (bf16_round(&random(r, wq, scale)), bf16_round(&random(r, wk, scale)), bf16_round(&random(r, wv, scale)));
        let wo = bf16_round(&random(r, m.hq * m.d * m.hidden, out_scale));
        let norm = m.layer.1.qk_norm.map(|n| {
            // A checkpoint's weights: about 1 where they multiply, about 0 where they are offsets
            // from 1 (Gemma's, Qwen3.5's), as bf16 values.
            let around = if n.weight == NormWeight::OnePlus { 0.0 } else { 1.0 };
            let mut ckpt = |heads: usize| -> Vec<f32> {
                let len = n.scope.weight_len(heads, m.d);
                bf16_round(&random(r, len, 0.3).iter().map(|v| v + around).collect::<Vec<_>>())
            };
            let (q, k) = (ckpt(m.hq), ckpt(m.hkv));
            n.with(n.weights(&q), n.weights(&k))
        });
        Weights { wq, wk, wv, wo, norm }
    }
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
    let (index, layer) = m.layer;
    let pattern = match layer.attention {
        LayerAttention::Sliding(w) => format!("a sliding window of {w}"),
        LayerAttention::Chunked(c) => format!("attention chunks of {c} (Llama 4)"),
        _ => "full causal attention".to_string(),
    };
    println!("layer {index} ({}): {pattern}, {}", layer.layer_type(), if layer.rope { "RoPE" } else { "no position encoding (NoPE)" });
    if let Some(t) = layer.query_temperature {
        println!("query temperature (Llama 4's attn_temperature_tuning): 1 + {} ln(1 + floor((i + 1) / {})), applied by the kernels and the reference", t.attn_scale, t.floor_scale);
    }
    if let Some(n) = layer.qk_norm {
        let how = match n.weight {
            NormWeight::None => "no weight",
            NormWeight::Plain => "times its weight",
            NormWeight::OnePlus => "times 1 + its weight",
        };
        let call = if layer.gated_query { "qk_norm_rope_gated" } else { "qk_norm_inplace" };
        println!("QK norm ({:?} scope, {how}, eps {}) on the unrotated Q and K by the rope kernel ({call}), then the attention kernels rotate", n.scope, n.eps);
    }
    if layer.gated_query {
        println!("gated query (q_proj emits each head's query, then its gate): the rope kernel reads the queries from between the gates (qk_norm_rope_gated), and the attention kernels write O · sigmoid(gate), the gates read where q_proj left them (attention_fwd_gated, attention_decode_gated, attention_fwd_paged_gated)");
    }
    if layer.value_is_key {
        println!("V = k_proj's output before the K norm and RoPE (attention_k_eq_v): no v_proj");
    }
    if let Some(n) = layer.v_norm {
        println!("V norm (RMS over each head, no weight, eps {}): fused into the cache append (paged_append_v_normed); the prefill's dense V through qk_norm_inplace with no Q", n.eps);
    }
    if let Some(from) = layer.kv_shared_from {
        println!("(in the model this layer reads layer {from}'s K and V cache instead of its own; one layer runs here)");
    }
    if let Some(c) = m.softcap {
        println!("logit soft-capping at {c} (attn_logit_softcapping), score scale {:.6}", m.scale.unwrap_or(1.0 / (m.d as f64).sqrt()));
    }
    if m.sinks.is_some() {
        println!("learned attention sinks (GPT-OSS): one logit per query head, drawn for the demo (they are weights)");
    }
    if let Some(mr) = s0.mrope {
        // A text-only prompt: every token's three positions are equal, where M-RoPE is RoPE.
        println!("M-RoPE sections {:?}: a text-only prompt, so the in-kernel RoPE is exact (images: rope_inplace_mrope, then rope: None)", mr.sections);
    }
    let mut kernels: Option<Box<dyn Kernels>> = None;
    if !a.force_cpu {
        match cuda::device_status() {
            Ok(_) => {
                let g = Gpu::new(0).map_err(|e| e.to_string())?;
                println!("running the kernels on {} with checked mode against the f64 CPU reference", g.describe());
                kernels = Some(Box::new(OnGpu::new(g)));
            }
            Err(why) => kernels = emulated_or_reference(&why),
        }
    }
    let mut r = StdRng::seed_from_u64(2024);
    let w = Weights::draw(&mut r, &m, 1.0 / (m.hidden as f32).sqrt(), 1.0 / ((m.hq * m.d) as f32).sqrt());
    let prompt = random(&mut r, a.prompt * m.hidden, 1.0);
    let params_at = |len: usize| -> Result<AttentionParams, String> {
        let s = m.rope.schedule(Some(len)).map_err(|e| e.to_string())?;
        let mut p = AttentionParams::new(m.hq, m.hkv, m.d);
        p.rope = m.layer.1.rope.then(|| Rotary::from_schedule(&s, m.layout));
        // The layer's mask and (Llama 4's NoPE layers) query temperature.
        let mut p = m.layer.1.apply(p).expect("load_model picked a softmax-attention layer");
        (p.softcap, p.scale, p.sink_logits) = (m.softcap, m.scale, m.sinks.clone());
        Ok(p)
    };
    let t0 = Instant::now();
    let outputs = match kernels {
        Some(k) => run_kernels(k, a, &m, &w, &prompt, &params_at)?,
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

/// Q, K, V of rows x [n, hidden], bf16-rounded like the GPU path's inputs (before any QK or V
/// norm; Q's rows gated where the layer's query is: [`Model::q_width`]; V is k_proj's output
/// where the layer's values are its keys, Gemma 4's full layers with `attention_k_eq_v`).
fn qkv(m: &Model, w: &Weights, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let f = |wm: &[f32], width: usize| matmul(x, wm, m.hidden, width);
    let k = bf16_round(&f(&w.wk, m.hkv * m.d));
    let v = if m.layer.1.value_is_key { k.clone() } else { bf16_round(&f(&w.wv, m.hkv * m.d)) };
    (bf16_round(&f(&w.wq, m.q_width())), k, v)
}

/// The CPU path's V norm (Gemma 3n's and Gemma 4's, the reference's RMS norm of each head
/// without weights, rounded to bf16 like the kernels' output); no-op for the other models.
fn v_norm_cpu(m: &Model, v: &mut [f32]) -> Result<(), String> {
    let Some(n) = m.layer.1.v_norm else { return Ok(()) };
    for row in v.chunks_mut(m.hkv * m.d) {
        let mut y = to64(row);
        reference::qk_norm_row(&mut y, m.d, n.eps, NormScope::Head, None).map_err(|e| e.to_string())?;
        row.iter_mut().zip(y).for_each(|(r, v)| *r = bf16::from_f64(v).to_f32());
    }
    Ok(())
}

/// q_proj's rows as dense queries `[n, Hq·d]` and, for a gated query, the gates (else empty).
fn split_gate(m: &Model, q: &[f32]) -> (Vec<f32>, Vec<f32>) {
    if !m.layer.1.gated_query {
        return (q.to_vec(), Vec::new());
    }
    let (mut queries, mut gates) = (Vec::with_capacity(q.len() / 2), Vec::with_capacity(q.len() / 2));
    for head in q.chunks(2 * m.d) {
        queries.extend_from_slice(&head[..m.d]);
        gates.extend_from_slice(&head[m.d..]);
    }
    (queries, gates)
}

/// transformers' `attn_output * sigmoid(gate)` (Qwen3-Next, Qwen3.5), rounded to bf16; no-op
/// without gates.
fn apply_gate(out: &mut [f32], gates: &[f32]) {
    for (o, g) in out.iter_mut().zip(gates) {
        *o = bf16::from_f32(*o / (1.0 + (-g).exp())).to_f32();
    }
}

/// The CPU path's QK norm (the f64 reference's, rounded to bf16 like the kernels' output), on
/// the unrotated Q and K of `n` tokens: before the cache, as the kernels' path does it.
fn qk_norm_cpu(m: &Model, w: &Weights, q: &mut [f32], k: &mut [f32]) -> Result<(), String> {
    let Some(n) = &w.norm else { return Ok(()) };
    for (x, heads, weight) in [(q, m.hq, &n.q_weight), (k, m.hkv, &n.k_weight)] {
        for row in x.chunks_mut(heads * m.d) {
            let mut y = to64(row);
            reference::qk_norm_row(&mut y, m.d, n.eps, n.scope, weight.as_deref()).map_err(|e| e.to_string())?;
            row.iter_mut().zip(y).for_each(|(r, v)| *r = bf16::from_f64(v).to_f32());
        }
    }
    Ok(())
}

/// The kernels' path's QK norm on `n` tokens (the rope kernel, checked), K in place: returns
/// the dense queries, read from a gated query's rows by the kernel itself (the gates stay
/// there for the attention kernels). The worst error so far in `worst`.
fn qk_norm_kernels(kern: &mut dyn Kernels, m: &Model, w: &Weights, q: &[f32], k: &mut [f32], n: usize, worst: &mut f64) -> Result<Vec<f32>, String> {
    let Some(norm) = &w.norm else { return Ok(split_gate(m, q).0) };
    let shape = RopeShape { q_row_stride: m.q_width(), ..RopeShape::contiguous(n, m.hq, m.hkv, m.d) };
    let (queries, rep) = kern.qk_norm(q, k, &shape, m.layer.1.gated_query, &norm.map(|w| w.as_slice()))?;
    *worst = worst.max(rep.max_abs);
    Ok(queries)
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
    let (q, mut k, mut v) = qkv(m, w, prompt);
    let (mut q, gates) = split_gate(m, &q);
    qk_norm_cpu(m, w, &mut q, &mut k)?;
    v_norm_cpu(m, &mut v)?;
    let pos: Vec<i64> = (0..a.prompt as i64).collect();
    let p = params_at(a.prompt)?;
    let o = reference::attention(&to64(&q), &to64(&k), &to64(&v), &pos, &pos, &p).map_err(|e| e.to_string())?;
    let mut attn: Vec<f32> = o.out.iter().map(|&x| x as f32).collect();
    apply_gate(&mut attn, &gates);
    let row = m.hq * m.d;
    let mut x_last = prompt[(a.prompt - 1) * m.hidden..].to_vec();
    for step in 0..a.steps {
        let len = a.prompt + step + 1;
        let x = next_input(m, w, &x_last, &attn[attn.len() - row..]);
        let (qn, mut kn, mut vn) = qkv(m, w, &x);
        let (mut qn, gn) = split_gate(m, &qn);
        qk_norm_cpu(m, w, &mut qn, &mut kn)?;
        v_norm_cpu(m, &mut vn)?;
        k.extend_from_slice(&kn);
        v.extend_from_slice(&vn);
        q = qn;
        let k_pos: Vec<i64> = (0..len as i64).collect();
        let o = reference::attention(&to64(&q), &to64(&k), &to64(&v), &[len as i64 - 1], &k_pos, &params_at(len)?)
            .map_err(|e| e.to_string())?;
        attn = o.out.iter().map(|&x| x as f32).collect();
        apply_gate(&mut attn, &gn);
        x_last = x;
        progress(step + 1, a.steps, "decode steps (CPU reference)");
    }
    Ok(next_input(m, w, &x_last, &attn))
}

/// What the block needs from the kernels, wherever they run: bf16 inputs (as f32 values already
/// rounded to bf16), every call in checked mode.
trait Kernels {
    /// Prefill attention of the whole prompt; returns O `[n, Hq·d]` and the check against the
    /// reference. With `gate` (a gated query's q_proj rows from element d on: each head's gate
    /// follows its query), the kernel writes O gated (`OutputGate::after_query`).
    fn prefill(&mut self, q: &[f32], k: &[f32], v: &[f32], n: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String>;
    /// Create the paged cache (pages of 16, handed out back to front so the table really indirects).
    fn new_cache(&mut self, cache: PagedKvCache, table: &[i32]) -> Result<(), String>;
    /// Append K/V rows `[n, Hkv·d]` at `slots`, each V head RMS-normalised as it is cached
    /// with `v_norm_eps` (Gemma 3n's and Gemma 4's V norm fused into the append).
    fn append(&mut self, k: &[f32], v: &[f32], slots: &[i32], v_norm_eps: Option<f64>) -> Result<(), String>;
    /// The V norm on a dense V `[n, Hkv·d]` in place (the rope kernel's norm with no Q), checked.
    fn v_norm(&mut self, v: &mut [f32], shape: &RopeShape, eps: f64) -> Result<CheckReport, String>;
    /// Chunked prefill: the `n` queries `[n, Hq·d]` that are the last of the first `len` cached
    /// tokens, attending to all of them through the block table; O (gated as `prefill`) and the check.
    fn prefill_paged(&mut self, q: &[f32], n: usize, len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String>;
    /// One decode step of query `[Hq·d]` over the first `len` cached keys; O (gated as
    /// `prefill`) and the check.
    fn decode(&mut self, q: &[f32], len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String>;
    /// The QK norm (the rope kernel without a rotation), checked: K in place, Q from `q`'s rows
    /// (`shape.q_row_stride` apart; a gated query's when `gated`, each head's query then its
    /// gate: `qk_norm_rope_gated`), returned dense.
    fn qk_norm(&mut self, q: &[f32], k: &mut [f32], shape: &RopeShape, gated: bool, norm: &QkNorm<&[f32]>) -> Result<(Vec<f32>, CheckReport), String>;
    /// Where the kernels run, for the log.
    fn name(&self) -> &'static str;
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// A gated query's gates where q_proj left them: each head's `2·d` slice holds its query, then
/// its gate.
fn gate_layout(p: &AttentionParams) -> OutputGate {
    OutputGate::after_query(p.num_q_heads, p.head_dim)
}

fn run_kernels(mut kern: Box<dyn Kernels>, a: &Args, m: &Model, w: &Weights, prompt: &[f32], params_at: &ParamsAt) -> Result<Vec<f32>, String> {
    let (q, mut k, v) = qkv(m, w, prompt);
    let mut worst_norm = 0f64;
    let q_proj = q;
    let q = qk_norm_kernels(kern.as_mut(), m, w, &q_proj, &mut k, a.prompt, &mut worst_norm)?;
    // Rows start..end of a gated query's gates, left in q_proj's rows for the attention kernels.
    let qw = m.q_width();
    let gate_of = |q_proj: &[f32], start: usize, end: usize| -> Option<Vec<f32>> { m.layer.1.gated_query.then(|| q_proj[start * qw + m.d..end * qw].to_vec()) };
    let page = 16;
    let max_pages = (a.prompt + a.steps).div_ceil(page);
    let table: Vec<i32> = (0..max_pages as i32).rev().collect();
    let slot = |t: usize| table[t / page] * page as i32 + (t % page) as i32;
    kern.new_cache(PagedKvCache { num_pages: max_pages, page_size: page, kv_heads: m.hkv, head_dim: m.d }, &table)?;
    let (row, kv_row) = (m.hq * m.d, m.hkv * m.d);
    let v_eps = m.layer.1.v_norm.map(|n| n.eps);
    let out = match a.chunk {
        None => {
            // The prefill reads its own dense V: normalised by a pass of its own (the cache's
            // copy is normalised by the append).
            let mut v_dense = v.clone();
            if let Some(eps) = v_eps {
                let shape = RopeShape { q_heads: 0, q_row_stride: 0, ..RopeShape::contiguous(a.prompt, 0, m.hkv, m.d) };
                worst_norm = worst_norm.max(kern.v_norm(&mut v_dense, &shape, eps)?.max_abs);
            }
            let (out, rep) = kern.prefill(&q, &k, &v_dense, a.prompt, gate_of(&q_proj, 0, a.prompt).as_deref(), &params_at(a.prompt)?)?;
            println!("prefill {} tokens: max abs error vs reference {:.2e} (tolerance {:.1e})", a.prompt, rep.max_abs, rep.tolerance.abs);
            kern.append(&k, &v, &(0..a.prompt).map(slot).collect::<Vec<_>>(), v_eps)?;
            out
        }
        Some(chunk) => {
            // Each chunk: append its K/V, then attend its queries over everything cached so far
            // (the schedule at the length reached: dynamic NTK rotates every key anew).
            let (mut out, mut worst) = (Vec::with_capacity(q.len()), 0f64);
            for start in (0..a.prompt).step_by(chunk) {
                let end = (start + chunk).min(a.prompt);
                let slots: Vec<i32> = (start..end).map(slot).collect();
                kern.append(&k[start * kv_row..end * kv_row], &v[start * kv_row..end * kv_row], &slots, v_eps)?;
                let (o, rep) = kern.prefill_paged(&q[start * row..end * row], end - start, end, gate_of(&q_proj, start, end).as_deref(), &params_at(end)?)?;
                worst = worst.max(rep.max_abs);
                out.extend_from_slice(&o);
            }
            println!("prefill {} tokens in chunks of {chunk} over the paged cache: max abs error vs reference {worst:.2e}", a.prompt);
            out
        }
    };

    let mut attn = out[(a.prompt - 1) * row..].to_vec();
    let mut x_last = prompt[(a.prompt - 1) * m.hidden..].to_vec();
    let mut worst = 0f64;
    for step in 0..a.steps {
        let len = a.prompt + step + 1;
        let x = next_input(m, w, &x_last, &attn);
        let (qn, mut kn, vn) = qkv(m, w, &x);
        let q_proj = qn;
        let qn = qk_norm_kernels(kern.as_mut(), m, w, &q_proj, &mut kn, 1, &mut worst_norm)?;
        kern.append(&kn, &vn, &[slot(len - 1)], v_eps)?;
        let (o, rep) = kern.decode(&qn, len, gate_of(&q_proj, 0, 1).as_deref(), &params_at(len)?)?;
        worst = worst.max(rep.max_abs);
        attn = o;
        x_last = x;
        progress(step + 1, a.steps, &format!("decode steps ({}, checked)", kern.name()));
    }
    println!("{} decode steps checked against the CPU reference: max abs error {worst:.2e}", a.steps);
    if w.norm.is_some() || v_eps.is_some() {
        println!("QK / V norms through the rope kernel, checked: max abs error {worst_norm:.2e}");
    }
    Ok(next_input(m, w, &x_last, &attn))
}

/// The paged cache on the device: geometry, K pages, V pages, block table.
type DeviceCache = (PagedKvCache, cudarc::driver::CudaSlice<bf16>, cudarc::driver::CudaSlice<bf16>, cudarc::driver::CudaSlice<i32>);

struct OnGpu {
    gpu: Gpu,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    cache: Option<DeviceCache>,
}

impl OnGpu {
    fn new(gpu: Gpu) -> Self {
        let stream = gpu.context().default_stream();
        OnGpu { gpu, stream, cache: None }
    }
    fn up<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<cudarc::driver::CudaSlice<T>, String> {
        self.stream.clone_htod(x).map_err(|e| e.to_string())
    }
    fn down(&self, x: &cudarc::driver::CudaSlice<bf16>) -> Result<Vec<f32>, String> {
        Ok(self.stream.clone_dtoh(x).map_err(|e| e.to_string())?.iter().map(|v| v.to_f32()).collect())
    }
}

impl Kernels for OnGpu {
    fn prefill(&mut self, q: &[f32], k: &[f32], v: &[f32], n: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
        let (qd, kd, vd) = (self.up(&to_bf16(q))?, self.up(&to_bf16(k))?, self.up(&to_bf16(v))?);
        let gd = gate.map(|g| self.up(&to_bf16(g))).transpose()?;
        let mut out = self.up(&vec![bf16::ZERO; q.len()])?;
        let mut lse = self.up(&vec![0f32; n * p.num_q_heads])?;
        let cu = self.up(&[0i32, n as i32])?;
        let batch = AttentionBatch::single(p, n, n);
        let mut ws = match cuda::prefill_prefers_workspace::<bf16>(p, &batch) {
            true => Some(self.stream.alloc_zeros::<bf16>(cuda::attention_fwd_workspace_len(p, n)).map_err(|e| e.to_string())?),
            false => None,
        };
        let mut wsv = ws.as_mut().map(|w| w.as_view_mut());
        let (_, rep) = match &gd {
            Some(g) => cuda::attention_fwd_gated_checked(&self.gpu, &self.stream, &qd, &kd, &vd, g, &gate_layout(p), &mut out, &mut lse, &cu, &cu, &batch, p, wsv.as_mut()),
            None => cuda::attention_fwd_checked(&self.gpu, &self.stream, &qd, &kd, &vd, &mut out, &mut lse, &cu, &cu, &batch, p, wsv.as_mut()),
        }
        .map_err(|e| e.to_string())?;
        Ok((self.down(&out)?, rep))
    }
    fn prefill_paged(&mut self, q: &[f32], n: usize, len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
        let qd = self.up(&to_bf16(q))?;
        let gd = gate.map(|g| self.up(&to_bf16(g))).transpose()?;
        let (lens, cu) = (self.up(&[len as i32])?, self.up(&[0i32, n as i32])?);
        let mut o = self.up(&vec![bf16::ZERO; q.len()])?;
        let mut l = self.up(&vec![0f32; n * p.num_q_heads])?;
        let (cache, kc, vc, table) = self.cache.as_ref().ok_or("no cache")?;
        // The host knows the context: the gather workspace holds it, not the whole table row.
        let batch = PagedPrefillBatch { total_context: Some(len), ..PagedPrefillBatch::contiguous(p, 1, n, n, cache.num_pages) };
        let sms = self.gpu.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| e.to_string())?;
        let splits = cuda::paged_prefill_splits(p, &batch, cache, sms.max(1) as usize);
        let mut ws = match splits > 1 {
            true => Some(self.stream.alloc_zeros::<f32>(cuda::paged_prefill_workspace_len(p, &batch, splits)).map_err(|e| e.to_string())?),
            false => None,
        };
        let mut wsv = ws.as_mut().map(|w| w.as_view_mut());
        // Long chunks gather the context's keys (rotated once) and values, then take the wide kernel.
        let mut gather = match cuda::paged_prefill_prefers_gather(p, &batch) {
            true => Some(self.stream.alloc_zeros::<bf16>(cuda::paged_prefill_gather_len(p, &batch, cache)).map_err(|e| e.to_string())?),
            false => None,
        };
        let mut gv = gather.as_mut().map(|w| w.as_view_mut());
        let rep = match &gd {
            Some(g) => cuda::attention_fwd_paged_gated_checked(&self.gpu, &self.stream, &qd, kc, vc, table, &lens, &cu, g, &gate_layout(p), &mut o, &mut l, cache, &batch, p, splits, wsv.as_mut(), gv.as_mut()),
            None => cuda::attention_fwd_paged_checked(&self.gpu, &self.stream, &qd, kc, vc, table, &lens, &cu, &mut o, &mut l, cache, &batch, p, splits, wsv.as_mut(), gv.as_mut()),
        }
        .map_err(|e| e.to_string())?;
        Ok((self.down(&o)?, rep))
    }
    fn new_cache(&mut self, cache: PagedKvCache, table: &[i32]) -> Result<(), String> {
        self.cache = Some((cache, self.up(&vec![bf16::ZERO; cache.len()])?, self.up(&vec![bf16::ZERO; cache.len()])?, self.up(table)?));
        Ok(())
    }
    fn append(&mut self, k: &[f32], v: &[f32], slots: &[i32], v_norm_eps: Option<f64>) -> Result<(), String> {
        let (kd, vd, sd) = (self.up(&to_bf16(k))?, self.up(&to_bf16(v))?, self.up(slots)?);
        let (cache, kc, vc, _) = self.cache.as_mut().ok_or("no cache")?;
        let row = cache.kv_heads * cache.head_dim;
        match v_norm_eps {
            Some(eps) => cuda::paged_append_v_normed(&self.gpu, &self.stream, &kd, &vd, kc, vc, &sd, slots.len(), row, row, cache, eps),
            None => cuda::paged_append(&self.gpu, &self.stream, &kd, &vd, kc, vc, &sd, slots.len(), row, row, cache),
        }
        .map_err(|e| e.to_string())
    }
    fn v_norm(&mut self, v: &mut [f32], shape: &RopeShape, eps: f64) -> Result<CheckReport, String> {
        // No Q: a one-element buffer stands in for it (the launcher reads none of it).
        let (mut no_q, mut vd) = (self.up(&[bf16::ZERO])?, self.up(&to_bf16(v))?);
        let rep = cuda::qk_norm_inplace_checked(&self.gpu, &self.stream, &mut no_q, &mut vd, shape, &QkNorm::<&cudarc::driver::CudaSlice<f32>>::unweighted(eps, NormScope::Head))
            .map_err(|e| e.to_string())?;
        v.copy_from_slice(&self.down(&vd)?);
        Ok(rep)
    }
    fn decode(&mut self, q: &[f32], len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
        let qd = self.up(&to_bf16(q))?;
        let gd = gate.map(|g| self.up(&to_bf16(g))).transpose()?;
        let lens = self.up(&[len as i32])?;
        let mut o = self.up(&vec![bf16::ZERO; q.len()])?;
        let mut l = self.up(&vec![0f32; p.num_q_heads])?;
        let (cache, kc, vc, table) = self.cache.as_ref().ok_or("no cache")?;
        let batch = DecodeBatch::contiguous(p, 1, 1, cache.num_pages, len);
        let rep = match &gd {
            Some(g) => cuda::attention_decode_gated_checked(&self.gpu, &self.stream, &qd, kc, vc, table, &lens, g, &gate_layout(p), &mut o, &mut l, cache, &batch, p, 1, None),
            None => cuda::attention_decode_checked(&self.gpu, &self.stream, &qd, kc, vc, table, &lens, &mut o, &mut l, cache, &batch, p, 1, None),
        }
        .map_err(|e| e.to_string())?;
        Ok((self.down(&o)?, rep))
    }
    fn qk_norm(&mut self, q: &[f32], k: &mut [f32], shape: &RopeShape, gated: bool, norm: &QkNorm<&[f32]>) -> Result<(Vec<f32>, CheckReport), String> {
        let (mut qd, mut kd) = (self.up(&to_bf16(q))?, self.up(&to_bf16(k))?);
        let (qw, kw) = (norm.q_weight.map(|w| self.up(w)).transpose()?, norm.k_weight.map(|w| self.up(w)).transpose()?);
        let dn = QkNorm { eps: norm.eps, scope: norm.scope, q_weight: qw.as_ref(), k_weight: kw.as_ref() };
        let rep = if gated {
            let mut dense = self.up(&vec![bf16::ZERO; shape.tokens * shape.q_heads * shape.head_dim])?;
            let rep = cuda::qk_norm_rope_gated_checked(&self.gpu, &self.stream, &qd, &mut dense, &mut kd, shape, cuda::GATED_NORM_ONLY, &dn);
            qd = dense;
            rep
        } else {
            cuda::qk_norm_inplace_checked(&self.gpu, &self.stream, &mut qd, &mut kd, shape, &dn)
        };
        let rep = rep.map_err(|e| e.to_string())?;
        k.copy_from_slice(&self.down(&kd)?);
        Ok((self.down(&qd)?, rep))
    }
    fn name(&self) -> &'static str {
        "GPU"
    }
}

#[cfg(feature = "emulator")]
fn emulated_or_reference(why: &str) -> Option<Box<dyn Kernels>> {
    println!("no GPU ({why}): running the kernels in the SIMT emulator, with checked mode against the f64 CPU reference");
    Some(Box::new(emulated::Emulated::default()))
}

#[cfg(not(feature = "emulator"))]
fn emulated_or_reference(why: &str) -> Option<Box<dyn Kernels>> {
    println!("no GPU ({why}): running the f64 CPU reference path (build with --features emulator to run the kernels on the CPU)");
    None
}

#[cfg(feature = "emulator")]
mod emulated {
    use super::*;
    use rope_attn::cuda::GatedRotation;
    use rope_attn::emulator::{DecodeInputs, Emulator, FwdInputs, PagedFwdInputs};

    /// The paged cache in host memory: geometry, K pages, V pages, block table.
    type HostCache = (PagedKvCache, Vec<bf16>, Vec<bf16>, Vec<i32>);

    #[derive(Default)]
    pub struct Emulated {
        emu: Emulator,
        cache: Option<HostCache>,
    }

    fn f32s(x: &[bf16]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    impl Kernels for Emulated {
        fn prefill(&mut self, q: &[f32], k: &[f32], v: &[f32], n: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
            let (q, k, v) = (to_bf16(q), to_bf16(k), to_bf16(v));
            let (mut out, mut lse) = (vec![bf16::ZERO; q.len()], vec![0f32; n * p.num_q_heads]);
            let cu = [0i32, n as i32];
            let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
            let batch = AttentionBatch::single(p, n, n);
            let prefer = cuda::prefill_prefers_workspace::<bf16>(p, &batch);
            let mut ws = if prefer { vec![bf16::ZERO; cuda::attention_fwd_workspace_len(p, n)] } else { Vec::new() };
            let ws = prefer.then_some(&mut ws[..]);
            let (_, rep) = match gate.map(to_bf16) {
                Some(g) => self.emu.attention_fwd_gated_checked(&x, &g, &gate_layout(p), &mut out, &mut lse, &batch, p, ws),
                None => self.emu.attention_fwd_checked(&x, &mut out, &mut lse, &batch, p, ws),
            }
            .map_err(|e| e.to_string())?;
            Ok((f32s(&out), rep))
        }
        fn prefill_paged(&mut self, q: &[f32], n: usize, len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
            let q = to_bf16(q);
            let (cache, kc, vc, table) = self.cache.as_ref().ok_or("no cache")?;
            let (lens, cu) = ([len as i32], [0i32, n as i32]);
            let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cu, k_cache: kc, v_cache: vc, block_table: table, context_lens: &lens };
            let (mut o, mut l) = (vec![bf16::ZERO; q.len()], vec![0f32; n * p.num_q_heads]);
            let batch = PagedPrefillBatch { total_context: Some(len), ..PagedPrefillBatch::contiguous(p, 1, n, n, cache.num_pages) };
            // Split keys as a 132-SM GPU would (the emulator runs them all the same).
            let splits = cuda::paged_prefill_splits(p, &batch, cache, 132);
            let mut ws = vec![0f32; cuda::paged_prefill_workspace_len(p, &batch, splits)];
            let prefer = cuda::paged_prefill_prefers_gather(p, &batch);
            let mut gather = if prefer { vec![bf16::ZERO; cuda::paged_prefill_gather_len(p, &batch, cache)] } else { Vec::new() };
            let g = prefer.then_some(&mut gather[..]);
            let rep = match gate.map(to_bf16) {
                Some(gb) => self.emu.attention_fwd_paged_gated_checked(&x, &gb, &gate_layout(p), &mut o, &mut l, cache, &batch, p, splits, Some(&mut ws[..]), g),
                None => self.emu.attention_fwd_paged_checked(&x, &mut o, &mut l, cache, &batch, p, splits, Some(&mut ws[..]), g),
            }
            .map_err(|e| e.to_string())?;
            Ok((f32s(&o), rep))
        }
        fn new_cache(&mut self, cache: PagedKvCache, table: &[i32]) -> Result<(), String> {
            self.cache = Some((cache, vec![bf16::ZERO; cache.len()], vec![bf16::ZERO; cache.len()], table.to_vec()));
            Ok(())
        }
        fn append(&mut self, k: &[f32], v: &[f32], slots: &[i32], v_norm_eps: Option<f64>) -> Result<(), String> {
            let (cache, kc, vc, _) = self.cache.as_mut().ok_or("no cache")?;
            let row = cache.kv_heads * cache.head_dim;
            let (k, v) = (to_bf16(k), to_bf16(v));
            match v_norm_eps {
                Some(eps) => self.emu.paged_append_v_normed(&k, &v, kc, vc, slots, slots.len(), row, row, cache, eps),
                None => self.emu.paged_append(&k, &v, kc, vc, slots, slots.len(), row, row, cache),
            }
            .map_err(|e| e.to_string())
        }
        fn v_norm(&mut self, v: &mut [f32], shape: &RopeShape, eps: f64) -> Result<CheckReport, String> {
            let mut vb = to_bf16(v);
            let rep = self.emu.qk_norm_inplace_checked(&mut [], &mut vb, shape, &QkNorm::unweighted(eps, NormScope::Head)).map_err(|e| e.to_string())?;
            v.copy_from_slice(&f32s(&vb));
            Ok(rep)
        }
        fn decode(&mut self, q: &[f32], len: usize, gate: Option<&[f32]>, p: &AttentionParams) -> Result<(Vec<f32>, CheckReport), String> {
            let q = to_bf16(q);
            let (cache, kc, vc, table) = self.cache.as_ref().ok_or("no cache")?;
            let lens = [len as i32];
            let x = DecodeInputs { q: &q, k_cache: kc, v_cache: vc, block_table: table, context_lens: &lens };
            let (mut o, mut l) = (vec![bf16::ZERO; q.len()], vec![0f32; p.num_q_heads]);
            let batch = DecodeBatch::contiguous(p, 1, 1, cache.num_pages, len);
            let rep = match gate.map(to_bf16) {
                Some(g) => self.emu.attention_decode_gated_checked(&x, &g, &gate_layout(p), &mut o, &mut l, cache, &batch, p, 1, None),
                None => self.emu.attention_decode_checked(&x, &mut o, &mut l, cache, &batch, p, 1, None),
            }
            .map_err(|e| e.to_string())?;
            Ok((f32s(&o), rep))
        }
        fn qk_norm(&mut self, q: &[f32], k: &mut [f32], shape: &RopeShape, gated: bool, norm: &QkNorm<&[f32]>) -> Result<(Vec<f32>, CheckReport), String> {
            let (mut qb, mut kb) = (to_bf16(q), to_bf16(k));
            let rep = if gated {
                let mut dense = vec![bf16::ZERO; shape.tokens * shape.q_heads * shape.head_dim];
                let rep = self.emu.qk_norm_rope_gated_checked(&qb, &mut dense, &mut kb, shape, GatedRotation::None, norm);
                qb = dense;
                rep
            } else {
                self.emu.qk_norm_inplace_checked(&mut qb, &mut kb, shape, norm)
            };
            let rep = rep.map_err(|e| e.to_string())?;
            k.copy_from_slice(&f32s(&kb));
            Ok((f32s(&qb), rep))
        }
        fn name(&self) -> &'static str {
            "SIMT emulator"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU path end to end on a real config (CI runs this: `cargo test` builds examples).
    #[test]
    fn decoder_runs_on_the_cpu_reference_path() {
        for config in [
            "examples/configs/llama-3.1-8b.json",
            "examples/configs/qwen2.5-7b-instruct-yarn.json",
            "examples/configs/gemma-2-2b-it.json",
            "examples/configs/gpt-oss-120b.json",
            "examples/configs/qwen3.6-35b-a3b-text.json",
            "examples/configs/llama-4-scout-text-transformers-defaults.json",
            "examples/shapes/gemma-4-12b-text-shape.json",
        ] {
            let a = Args { config: config.into(), layer: None, layer_type: None, prompt: 12, steps: 3, chunk: None, force_cpu: true };
            run(&a).unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }

    /// The kernels' path end to end in the SIMT emulator, every step checked against the
    /// reference: the prompt in one prefill (long enough for the workspace path and the wide
    /// tile) and in chunks over the paged cache; both end in the same block output, up to the
    /// bf16 roundings the two paths take in different places.
    #[cfg(feature = "emulator")]
    #[test]
    fn decoder_runs_the_kernels_in_the_emulator() {
        let mut a = Args { config: "examples/configs/qwen2.5-7b-instruct-yarn.json".into(), layer: None, layer_type: None, prompt: 70, steps: 3, chunk: None, force_cpu: false };
        let m = load_model(&a).unwrap();
        let mut r = StdRng::seed_from_u64(1);
        let w = Weights::draw(&mut r, &m, 0.02, 0.02);
        let prompt = random(&mut r, a.prompt * m.hidden, 1.0);
        let params_at = |len: usize| -> Result<AttentionParams, String> {
            let mut p = AttentionParams::new(m.hq, m.hkv, m.d);
            p.rope = Some(Rotary::from_schedule(&m.rope.schedule(Some(len)).map_err(|e| e.to_string())?, Layout::Half));
            Ok(p)
        };
        let whole = run_kernels(Box::new(emulated::Emulated::default()), &a, &m, &w, &prompt, &params_at).unwrap();
        a.chunk = Some(24);
        let chunked = run_kernels(Box::new(emulated::Emulated::default()), &a, &m, &w, &prompt, &params_at).unwrap();
        assert_eq!((whole.len(), chunked.len()), (m.hidden, m.hidden));
        assert!(whole.iter().chain(&chunked).all(|x| x.is_finite()));
        let diff = whole.iter().zip(&chunked).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!("whole vs chunked prefill: block outputs differ by {diff:.2e}");
        assert!(diff < 2e-2, "{diff}");
    }

    /// The QK norm through the kernels (the emulator here; a GPU where present), every call
    /// checked: Llama 4's RoPE layer (unweighted, with chunks and interleaved pairs) and
    /// Qwen3.6's attention layer (1 + w, head_dim 256, M-RoPE sections over a text prompt).
    #[cfg(feature = "emulator")]
    #[test]
    fn decoder_runs_the_qk_norm_through_the_kernels() {
        for config in ["examples/configs/llama-4-scout-text-transformers-defaults.json", "examples/configs/qwen3.6-35b-a3b-text.json"] {
            let a = Args { config: config.into(), layer: None, layer_type: None, prompt: 9, steps: 2, chunk: None, force_cpu: false };
            assert!(load_model(&a).unwrap().layer.1.qk_norm.is_some(), "{config}");
            run(&a).unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }

    /// The kernels' path of `a`'s layer (in the emulator, every call checked) ends in the CPU
    /// path's block output, in one prefill and in chunks of `chunk` over the paged cache.
    #[cfg(feature = "emulator")]
    fn kernels_match_the_cpu_path(a: &Args, m: &Model, seed: u64, chunk: usize) {
        let mut r = StdRng::seed_from_u64(seed);
        let w = Weights::draw(&mut r, m, 1.0 / (m.hidden as f32).sqrt(), 1.0 / ((m.hq * m.d) as f32).sqrt());
        let prompt = random(&mut r, a.prompt * m.hidden, 1.0);
        let params_at = |len: usize| -> Result<AttentionParams, String> {
            let mut p = AttentionParams::new(m.hq, m.hkv, m.d);
            p.rope = Some(Rotary::from_schedule(&m.rope.schedule(Some(len)).map_err(|e| e.to_string())?, m.layout));
            Ok(m.layer.1.apply(p).unwrap())
        };
        let cpu = run_cpu(a, m, &w, &prompt, &params_at).unwrap();
        let scale = cpu.iter().fold(0f32, |s, x| s.max(x.abs()));
        for chunk in [None, Some(chunk)] {
            let a = Args { chunk, ..a.clone() };
            let kernels = run_kernels(Box::new(emulated::Emulated::default()), &a, m, &w, &prompt, &params_at).unwrap();
            let diff = kernels.iter().zip(&cpu).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            println!("{} layer {}, chunk {chunk:?}: kernels' and CPU block outputs differ by {diff:.2e} (max |x| {scale:.2})", a.config, m.layer.0);
            assert!(diff < 1e-2 * scale, "{} layer {} {chunk:?}: {diff} vs {scale}", a.config, m.layer.0);
        }
    }

    /// Qwen3.6's gated query: the kernels' path (the rope kernel reads the queries from between
    /// the gates, the attention kernels gate O reading the gates from the same rows, checked on
    /// every call) ends in the CPU path's block output (split and gated on the host, the
    /// reference's norm), in one prefill and in chunks over the paged cache.
    #[cfg(feature = "emulator")]
    #[test]
    fn decoder_gated_query_kernels_match_the_cpu_path() {
        let a = Args { config: "examples/configs/qwen3.6-35b-a3b-text.json".into(), layer: None, layer_type: None, prompt: 20, steps: 2, chunk: None, force_cpu: false };
        let m = load_model(&a).unwrap();
        assert!(m.layer.1.gated_query && m.q_width() == 2 * m.hq * m.d);
        kernels_match_the_cpu_path(&a, &m, 3, 8);
    }

    /// Gemma 4 (examples/shapes: the 12B's shape): a sliding layer (head_dim 256, window 1024)
    /// and a full one (head_dim 512, one KV head, V = k_proj's output, proportional RoPE), V
    /// normalised in both. The kernels' path (the V norm fused into the append, the dense one
    /// through the rope kernel, every call checked) ends in the CPU path's block output, in one
    /// prefill and in chunks over the paged cache.
    #[cfg(feature = "emulator")]
    #[test]
    fn decoder_gemma4_layers_kernels_match_the_cpu_path() {
        for (layer, d, hkv) in [(0usize, 256usize, 8usize), (5, 512, 1)] {
            let a = Args { config: "examples/shapes/gemma-4-12b-text-shape.json".into(), layer: Some(layer), layer_type: None, prompt: 40, steps: 2, chunk: None, force_cpu: false };
            let m = load_model(&a).unwrap();
            assert_eq!((m.hq, m.hkv, m.d, m.layer.1.value_is_key), (16, hkv, d, d == 512));
            assert!(m.layer.1.v_norm.is_some() && m.layer.1.qk_norm.is_some());
            kernels_match_the_cpu_path(&a, &m, 4, 16);
        }
    }

    /// Gemma 2's soft-capping and query scale, GPT-OSS's sinks and a text_config (Qwen3.6) come
    /// from the config.json.
    #[test]
    fn decoder_reads_the_attention_options_of_its_config() {
        let load = |c: &str| load_model(&Args { config: format!("examples/configs/{c}.json"), layer: None, layer_type: None, prompt: 1, steps: 1, chunk: None, force_cpu: true }).unwrap();
        let g = load("gemma-2-2b-it");
        assert_eq!((g.softcap, g.scale, g.sinks.is_none()), (Some(50.0), Some(1.0 / 16.0), true));
        let o = load("gpt-oss-120b");
        assert_eq!((o.softcap, o.scale, o.sinks.map(|s| s.len())), (None, None, Some(64)));
        let q = load("qwen3.6-35b-a3b-text");
        assert_eq!((q.hidden, q.hq, q.hkv, q.d), (2048, 16, 2, 256));
        // Its layers 0..3 are linear attention: the first softmax one is layer 3.
        assert_eq!((q.layer.0, q.layer.1.attention), (3, LayerAttention::Full));
        assert_eq!(g.layer.1.attention, LayerAttention::Sliding(4096));
        let l = load("llama-4-scout-text-transformers-defaults");
        assert_eq!((l.layer.0, l.layer.1.attention, l.layer.1.rope, l.layout), (0, LayerAttention::Chunked(8192), true, Layout::Interleaved));
        let nope = load_model(&Args { config: "examples/configs/llama-4-scout-text-transformers-defaults.json".into(), layer: Some(3), layer_type: None, prompt: 1, steps: 1, chunk: None, force_cpu: true }).unwrap();
        assert_eq!((nope.layer.1.attention, nope.layer.1.rope), (LayerAttention::Full, false));
        // Llama 4's temperature on its NoPE layers, its QK norm on the RoPE ones.
        let t = nope.layer.1.query_temperature.expect("NoPE layers take the temperature");
        assert_eq!((t.floor_scale, t.attn_scale, nope.layer.1.qk_norm), (8192, 0.1, None));
        assert_eq!((l.layer.1.query_temperature, l.layer.1.qk_norm.map(|n| (n.eps, n.weight))), (None, Some((1e-5, NormWeight::None))));
        // Gemma 3 (per head, 1 + w) and Qwen3.6 (the same, on its attention layers) normalise Q and K too.
        let g3 = load("gemma-3-12b-it-text-transformers5");
        assert_eq!(g3.layer.1.qk_norm.map(|n| (n.eps, n.scope, n.weight)), Some((1e-6, rope_attn::NormScope::Head, NormWeight::OnePlus)));
        assert_eq!(q.layer.1.qk_norm.map(|n| n.weight), Some(NormWeight::OnePlus));
        let past = load_model(&Args { config: "examples/configs/llama-3.1-8b.json".into(), layer: Some(32), layer_type: None, prompt: 1, steps: 1, chunk: None, force_cpu: true });
        assert!(past.is_err());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(["--prompt".to_string(), "0".to_string()].into_iter()).is_err());
        assert!(parse_args(["--steps".to_string()].into_iter()).is_err());
        assert!(parse_args(["--bogus".to_string()].into_iter()).is_err());
    }
}
