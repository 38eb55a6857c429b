//! The GPU comparison run: ceilings, a correctness check against the CPU reference, then every
//! case of the plan with its baselines measured in the same run.

use super::cases::{ChunkCase, DType, DecodeCase, Plan, PrefillCase, RopeCase, PAGE_SIZE};
use super::device::{self as dev, Decode, PagedPrefill, Prefill, PrefillVariant, Res, RopeCopy, Settings, Timer};
use super::peaks::{self, Peak};
use super::report::{num, table, times, Row};
use super::torch::{self, TorchRun};
use cudarc::driver::CudaStream;
use half::{bf16, f16};
use rope_attn::cuda::{self, AttentionBatch, Dtype, Gpu, PrefillPath};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether to run the torch baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchMode {
    /// When `python -c "import torch"` works and torch sees the GPU.
    Auto,
    /// Always (`--torch`): a failure makes the command fail (after the report).
    Force,
    /// Never (`--no-torch`).
    Off,
}

/// Options of a GPU run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub torch: TorchMode,
    pub python: String,
    pub peak_tflops: Option<f64>,
    pub peak_gbps: Option<f64>,
}

/// What a GPU run produced.
pub struct Outcome {
    /// Run metadata (card, driver, versions, ceilings), also written at the top of the CSV.
    pub meta: Vec<(String, String)>,
    pub rows: Vec<Row>,
    /// The tables, printed last.
    pub summary: String,
    /// Problems that must fail the command (a forced torch run that failed, a wrong kernel).
    pub failures: Vec<String>,
}

macro_rules! by_dtype {
    ($dt:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $dt {
            DType::Bf16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
        }
    };
}

struct Ctx<'a> {
    gpu: &'a Gpu,
    stream: Arc<CudaStream>,
    settings: Settings,
    l2: usize,
    sms: usize,
    peak: Option<Peak>,
}

impl Ctx<'_> {
    /// Fail (as a skipped case) when `bytes` would not fit in 85% of the free device memory.
    fn fits(&self, bytes: usize) -> Res<()> {
        let (free, _) = dev::memory(self.gpu)?;
        if bytes as f64 > 0.85 * free as f64 {
            return Err(format!("skipped: needs {:.1} GiB, {:.1} GiB free", gib(bytes), gib(free)).into());
        }
        Ok(())
    }
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn shell(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The run's metadata: card, driver, toolchain, settings.
fn metadata(gpu: &Gpu, opts: &Opts, peak: Option<Peak>, sms: usize, l2: usize) -> Vec<(String, String)> {
    let (_, total) = dev::memory(gpu).unwrap_or((0, 0));
    let nvcc = option_env!("ROPE_ATTN_NVCC")
        .and_then(|p| shell(p, &["--version"]))
        .and_then(|v| v.lines().last().map(str::to_string))
        .unwrap_or_else(|| "unknown (nvcc of the build not found here)".into());
    let mut m = vec![
        ("device".to_string(), gpu.describe()),
        ("sms / l2 / memory".into(), format!("{sms} SMs, {:.0} MB L2, {:.1} GiB", l2 as f64 / 1e6, gib(total))),
        (
            "driver".into(),
            format!(
                "{} (CUDA {} driver API)",
                shell("nvidia-smi", &["--query-gpu=driver_version", "--format=csv,noheader"])
                    .map(|s| s.lines().next().unwrap_or("").to_string())
                    .unwrap_or_else(|| "nvidia-smi not found".into()),
                dev::driver_api_version().unwrap_or_else(|| "?".into())
            ),
        ),
        ("kernels built with".into(), nvcc),
        (
            "rope-attn".into(),
            format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                shell("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "no git".into())
            ),
        ),
        ("date".into(), shell("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default()),
        (
            "timing".into(),
            format!(
                "CUDA events; >= {} ms warm-up, median of {} rounds of >= {} ms; inputs rotated over sets >= 2x L2; {}",
                opts_settings(opts).warmup_ms,
                opts_settings(opts).rounds,
                opts_settings(opts).round_ms,
                if opts.quick { "--quick" } else { "full plan" }
            ),
        ),
    ];
    let peak_text = match (opts.peak_tflops, opts.peak_gbps) {
        (None, None) => peaks::describe(peak),
        _ => format!("{:?} TFLOP/s, {:?} GB/s (given on the command line)", opts.peak_tflops, opts.peak_gbps),
    };
    m.push(("peak".into(), peak_text));
    m
}

fn opts_settings(opts: &Opts) -> Settings {
    if opts.quick {
        Settings::quick()
    } else {
        Settings::full()
    }
}

/// Run the plan on device 0.
pub fn run(plan: &Plan, opts: &Opts) -> Result<Outcome, String> {
    let gpu = Gpu::new(0).map_err(|e| e.to_string())?;
    // SAFETY: everything here runs on one stream, so cudarc's cross-stream event tracking
    // (an event record per buffer access) has nothing to order; off, it stays out of the timings.
    unsafe { gpu.context().disable_event_tracking() };
    let stream = gpu.context().default_stream();
    let sms = dev::sm_count(&gpu).map_err(|e| e.to_string())?;
    let l2 = dev::l2_bytes(&gpu).map_err(|e| e.to_string())?;
    let mut peak = peaks::lookup(&gpu.describe());
    if opts.peak_tflops.is_some() || opts.peak_gbps.is_some() {
        let base = peak.unwrap_or(Peak { card: "given", tflops: f64::NAN, gbps: f64::NAN });
        peak = Some(Peak {
            card: "given",
            tflops: opts.peak_tflops.unwrap_or(base.tflops),
            gbps: opts.peak_gbps.unwrap_or(base.gbps),
        });
    }
    let mut meta = metadata(&gpu, opts, peak, sms, l2);
    for (k, v) in &meta {
        eprintln!("{k:>18}: {v}");
    }
    let cx = Ctx { gpu: &gpu, stream, settings: opts_settings(opts), l2, sms, peak };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut summary = String::new();

    // Ceilings: the copy (always), the matmul (through torch, below).
    let (free, _) = dev::memory(&gpu).map_err(|e| e.to_string())?;
    let copy_bytes = (2usize << 30).min(free / 4) & !0xfff;
    let (copy_gbps, st) =
        dev::copy_ceiling(&cx.stream, copy_bytes, &cx.settings).map_err(|e| format!("copy ceiling: {e}"))?;
    eprintln!(
        "{:>18}: {copy_gbps:.0} GB/s (device-to-device copy of {:.2} GiB, read + write)",
        "copy ceiling",
        gib(copy_bytes)
    );
    meta.push((
        "copy ceiling".into(),
        format!("{copy_gbps:.0} GB/s, dtod copy of {:.2} GiB counting read + write", gib(copy_bytes)),
    ));
    rows.push(Row {
        section: "ceiling",
        case: format!("copy-{}MiB", copy_bytes >> 20),
        implementation: "dtod_copy".into(),
        pe: "none",
        dtype: "bytes".into(),
        ms_median: st.median_ms,
        ms_min: st.min_ms,
        gbps: Some(copy_gbps),
        pct_peak: peak.map(|p| 100.0 * copy_gbps / p.gbps),
        note: "bytes read + written".into(),
        ..Row::default()
    });

    // Correctness first: the kernels against the f64 CPU reference at a small varlen shape.
    let mut pairs: Vec<(DType, usize)> = plan.prefill.iter().map(|c| (c.dtype, c.head_dim)).collect();
    pairs.dedup();
    let mut sanity_failed = false;
    for (dt, d) in pairs {
        let r = by_dtype!(dt, sanity(&cx, d));
        let line = match &r {
            Ok(s) => format!("{} d{d}: {s}", dt.name()),
            Err(e) => {
                sanity_failed = true;
                format!("{} d{d}: FAILED: {e}", dt.name())
            }
        };
        eprintln!("{:>18}: {line}", "check vs CPU");
        meta.push(("check vs CPU reference".into(), line));
    }
    if sanity_failed {
        failures.push("the attention kernel disagrees with the CPU reference: timings are of wrong results".into());
    }

    // Prefill.
    let mut auto_ms: HashMap<String, f64> = HashMap::new();
    for (i, c) in plan.prefill.iter().enumerate() {
        eprintln!("[prefill {}/{}] {c}", i + 1, plan.prefill.len());
        match by_dtype!(c.dtype, prefill_case(&cx, c, i as u64)) {
            Ok((case_rows, ours)) => {
                if case_rows.iter().any(|r| r.note.contains("MISMATCH")) {
                    failures.push(format!("prefill {c}: fused / pre-rotated / unfused outputs disagree"));
                }
                auto_ms.insert(c.id(), ours);
                rows.extend(case_rows);
            }
            Err(e) => {
                eprintln!("  {e}");
                rows.push(error_row("prefill", &c.id(), &e.to_string()));
            }
        }
    }

    // Torch baselines, after our buffers are gone (a separate process on the same device).
    let torch_run = match (opts.torch, plan.prefill.is_empty()) {
        (_, true) | (TorchMode::Off, _) => None,
        (mode, false) => {
            let go = match mode {
                TorchMode::Force => Ok(()),
                _ => torch::probe(&opts.python).map(|_| ()),
            };
            match go.and_then(|_| {
                eprintln!("[torch] {} {} ({} cases)", opts.python, torch::script_path().display(), plan.prefill.len());
                torch::run(&opts.python, &plan.prefill, &cx.settings)
            }) {
                Ok(t) => {
                    meta.push(("torch".into(), t.versions()));
                    if let Some(tf) = t.matmul_tflops {
                        meta.push(("matmul ceiling".into(), format!("{tf:.0} TFLOP/s (torch bf16 8192^3 matmul)")));
                    }
                    for (id, imp, msg) in &t.errors {
                        eprintln!("  torch {id} {imp}: {msg}");
                    }
                    if mode == TorchMode::Force && t.results.is_empty() {
                        failures
                            .push(format!("--torch: the torch script produced no timings ({} errors)", t.errors.len()));
                    }
                    Some(t)
                }
                Err(e) => {
                    eprintln!("  torch baselines skipped: {e}");
                    meta.push(("torch".into(), format!("skipped: {e}")));
                    if mode == TorchMode::Force {
                        failures.push(format!("--torch: {e}"));
                    }
                    None
                }
            }
        }
    };
    if let Some(t) = &torch_run {
        rows.extend(torch_rows(plan, t, &auto_ms, peak));
    }
    if !plan.prefill.is_empty() {
        summary += &prefill_table(plan, &rows, peak);
    }

    // Decode.
    for (i, c) in plan.decode.iter().enumerate() {
        eprintln!("[decode {}/{}] {c}", i + 1, plan.decode.len());
        match by_dtype!(c.dtype, decode_case(&cx, c, copy_gbps, 7000 + i as u64)) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("  {e}");
                rows.push(error_row("decode", &c.id(), &e.to_string()));
            }
        }
    }
    if !plan.decode.is_empty() {
        summary += &decode_table(&rows, copy_gbps);
    }

    // Chunked prefill over the paged cache: fused against gathered.
    for (i, c) in plan.chunked.iter().enumerate() {
        eprintln!("[chunked {}/{}] {c}", i + 1, plan.chunked.len());
        match by_dtype!(c.dtype, chunked_case(&cx, c, 8000 + i as u64)) {
            Ok(r) => {
                if r.iter().any(|r| r.note.contains("MISMATCH")) {
                    failures.push(format!("chunked {c}: fused and gathered outputs disagree"));
                }
                rows.extend(r)
            }
            Err(e) => {
                eprintln!("  {e}");
                rows.push(error_row("chunked", &c.id(), &e.to_string()));
            }
        }
    }
    if !plan.chunked.is_empty() {
        summary += &chunked_table(&rows, peak);
    }

    // Rope against the copy of the same bytes.
    for (i, c) in plan.rope.iter().enumerate() {
        eprintln!("[rope {}/{}] {c}", i + 1, plan.rope.len());
        match by_dtype!(c.dtype, rope_case(&cx, c, 9000 + i as u64)) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("  {e}");
                rows.push(error_row("rope", &c.id(), &e.to_string()));
            }
        }
    }
    if !plan.rope.is_empty() {
        summary += &rope_table(&rows);
    }
    Ok(Outcome { meta, rows, summary, failures })
}

fn error_row(section: &'static str, case: &str, e: &str) -> Row {
    Row {
        section,
        case: case.into(),
        implementation: "error".into(),
        ms_median: f64::NAN,
        ms_min: f64::NAN,
        note: e.into(),
        ..Row::default()
    }
}

/// `attention_fwd_checked` (fused and pre-rotated) on two sequences (200 and 77 tokens) with
/// RoPE + ALiBi, GQA 32/8, causal.
fn sanity<T: Dtype>(cx: &Ctx, d: usize) -> Result<String, String> {
    let s = &cx.stream;
    let run = || -> Res<String> {
        let (hq, hkv) = (32, 8);
        let lens = [200usize, 77];
        let total: usize = lens.iter().sum();
        let mut p = rope_attn::AttentionParams::new(hq, hkv, d);
        p.rope = Some(dev::bench_rotary(d)?);
        p.alibi = Some(rope_attn::Alibi { total_heads: hq, head_offset: 0 });
        let b = AttentionBatch::contiguous(&p, lens.len(), 200, total, total);
        let q = dev::random_device::<T>(s, total * hq * d, 11)?;
        let k = dev::random_device::<T>(s, total * hkv * d, 12)?;
        let v = dev::random_device::<T>(s, total * hkv * d, 13)?;
        let cu = s.clone_htod(&[0i32, 200, 277])?;
        let mut out = s.alloc_zeros::<T>(total * hq * d)?;
        let mut lse = s.alloc_zeros::<f32>(total * hq)?;
        let mut ws = s.alloc_zeros::<T>(cuda::attention_fwd_workspace_len(&p, total).max(1))?;
        let mut text = Vec::new();
        for use_ws in [false, true] {
            let mut wsv = ws.as_view_mut();
            let (path, rep) = cuda::attention_fwd_checked(
                cx.gpu,
                s,
                &q,
                &k,
                &v,
                &mut out,
                &mut lse,
                &cu,
                &cu,
                &b,
                &p,
                use_ws.then_some(&mut wsv),
            )?;
            text.push(format!("{path:?} ok (max abs err {:.1e})", rep.max_abs));
        }
        Ok(text.join(", "))
    };
    run().map_err(|e| e.to_string())
}

/// Time one prefill case: fused, pre-rotated, no PE, unfused (last: it rotates the inputs).
/// Returns the rows and the time of the path `prefill_prefers_workspace` picks ("ours").
fn prefill_case<T: Dtype>(cx: &Ctx, c: &PrefillCase, seed: u64) -> Res<(Vec<Row>, f64)> {
    let (b, n, hq, hkv, d) = (c.batch, c.seqlen, c.q_heads, c.kv_heads, c.head_dim);
    let sets = dev::input_sets(Prefill::<T>::set_bytes(b, n, hq, hkv, d), cx.l2);
    cx.fits(Prefill::<T>::device_bytes(b, n, hq, hkv, d, sets) + Prefill::<T>::set_bytes(b, n, hq, hkv, d))?;
    let mut pf = Prefill::<T>::new(&cx.stream, b, n, hq, hkv, d, c.causal, sets, 1 + 100 * seed)?;
    let (fused_path, pre_path, d_pre, d_unf) = pf.cross_check(cx.gpu, &cx.stream)?;
    // Normwise agreement of three roundings apart: a few units of the dtype's rounding.
    let tol = 8.0 * T::EPS;
    let check = if d_pre <= tol && d_unf <= tol {
        format!("paths agree: pre-rotated {d_pre:.1e}, unfused {d_unf:.1e} (normwise vs fused)")
    } else {
        format!("MISMATCH: pre-rotated {d_pre:.1e}, unfused {d_unf:.1e} (normwise vs fused; tolerance {tol:.1e})")
    };
    let timer = Timer::new(&cx.stream)?;
    let (gpu, stream) = (cx.gpu, &cx.stream);
    let mut time = |v: PrefillVariant| timer.measure(&cx.settings, &mut |i| pf.run(gpu, stream, v, i).map(|_| ()));
    let fused = time(PrefillVariant::Fused)?;
    let pre = time(PrefillVariant::PreRotated)?;
    let nope = time(PrefillVariant::NoPe)?;
    // Llama 4's chunks, on causal prompts longer than one chunk (before the unfused run rotates
    // the inputs in place).
    let chunked = (c.causal && n > dev::LLAMA4_CHUNK).then(|| time(PrefillVariant::FusedChunked)).transpose()?;
    // Llama 4's query temperature on its NoPE layers, where it changes anything (past 8191).
    let tempered = (n > dev::LLAMA4_TEMPERATURE.floor_scale).then(|| time(PrefillVariant::NoPeTemperature)).transpose()?;
    // Qwen3-Next's output gate fused into the epilogue (its cost: the ratio to ours_fused).
    let gated = time(PrefillVariant::FusedGated)?;
    let unfused = time(PrefillVariant::Unfused)?;
    let auto_pre = cuda::prefill_prefers_workspace::<T>(&pf.with_pe, &pf.batch);
    let ours = if auto_pre { pre.median_ms } else { fused.median_ms };
    let base = |implementation: &str, pe: &'static str, path: String, st: dev::Stats, note: String| {
        let tf = c.flops() / (st.median_ms * 1e-3) / 1e12;
        Row {
            section: "prefill",
            case: c.id(),
            implementation: implementation.into(),
            pe,
            dtype: c.dtype.name().into(),
            head_dim: d,
            batch: b,
            seq: n,
            q_heads: hq,
            kv_heads: hkv,
            causal: Some(c.causal),
            path,
            ms_median: st.median_ms,
            ms_min: st.min_ms,
            tflops: Some(tf),
            gbps: Some(c.bytes() / (st.median_ms * 1e-3) / 1e9),
            pct_peak: cx.peak.map(|p| 100.0 * tf / p.tflops),
            ratio: Some(st.median_ms / ours),
            ratio_of: "t(impl)/t(ours_auto)",
            note,
        }
    };
    let chosen = |is: bool| if is { " [auto]" } else { "" };
    let mut rows = vec![
        base("ours_fused", "rope+alibi", format!("{fused_path:?}{}", chosen(!auto_pre)), fused, check),
        base(
            "ours_prerotated",
            "rope+alibi",
            format!("{pre_path:?}{}", chosen(auto_pre)),
            pre,
            format!("{sets} input sets"),
        ),
        base(
            "unfused_rope_kernel_then_attention",
            "rope+alibi",
            format!("rope_inplace + {:?}", PrefillPath::Plain),
            unfused,
            "ALiBi kept in the attention for parity".into(),
        ),
        base("ours_no_pe", "none", format!("{:?}", PrefillPath::Plain), nope, "same kernel, no RoPE, no ALiBi".into()),
    ];
    let note = format!("Qwen3-Next's output gate fused (a dense [tokens, hq, d] gate); {:.3}x ours_fused", gated.median_ms / fused.median_ms);
    rows.push(base("ours_fused_output_gate", "rope+alibi", format!("{fused_path:?}"), gated, note));
    if let Some(st) = tempered {
        let t = dev::LLAMA4_TEMPERATURE;
        let note = format!("Llama 4 NoPE layer: query temperature (floor {}, scale {}); {:.3}x ours_no_pe", t.floor_scale, t.attn_scale, st.median_ms / nope.median_ms);
        rows.push(base("ours_no_pe_llama4_temperature", "temperature", format!("{:?}", PrefillPath::Plain), st, note));
    }
    if let Some(st) = chunked {
        // Its own work: every chunk's causal square, 4·b·h·d·Σ c²/2 (the ratio is to the full
        // causal call's auto path, so it shows what the skipped tiles save).
        let full = (n / dev::LLAMA4_CHUNK) as f64 * (dev::LLAMA4_CHUNK as f64).powi(2) + ((n % dev::LLAMA4_CHUNK) as f64).powi(2);
        let flops = 2.0 * (b * hq * d) as f64 * full;
        let tf = flops / (st.median_ms * 1e-3) / 1e12;
        let mut row = base("ours_fused_llama4_chunks", "rope+alibi", "Fused".into(), st, format!("chunks of {}; TFLOP/s of the chunks' work", dev::LLAMA4_CHUNK));
        (row.tflops, row.pct_peak) = (Some(tf), cx.peak.map(|p| 100.0 * tf / p.tflops));
        rows.push(row);
    }
    Ok((rows, ours))
}

fn torch_name(imp: &str) -> (&'static str, &'static str) {
    match imp {
        "sdpa_flash" => ("torch_sdpa_flash", "none"),
        "sdpa_cudnn" => ("torch_sdpa_cudnn", "none"),
        "flash_attn" => ("flash_attn2", "none"),
        "flash_attn3" => ("flash_attn3", "none"),
        "torch_rope_sdpa" => ("torch_rotary_then_sdpa_flash", "rope"),
        _ => ("torch_other", "none"),
    }
}

fn torch_rows(plan: &Plan, t: &TorchRun, auto_ms: &HashMap<String, f64>, peak: Option<Peak>) -> Vec<Row> {
    let by_id: HashMap<String, &PrefillCase> = plan.prefill.iter().map(|c| (c.id(), c)).collect();
    let mut rows = Vec::new();
    for r in &t.results {
        let Some(c) = by_id.get(&r.id) else { continue };
        let (name, pe) = torch_name(&r.implementation);
        let tf = c.flops() / (r.ms_median * 1e-3) / 1e12;
        rows.push(Row {
            section: "prefill",
            case: r.id.clone(),
            implementation: name.into(),
            pe,
            dtype: c.dtype.name().into(),
            head_dim: c.head_dim,
            batch: c.batch,
            seq: c.seqlen,
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            causal: Some(c.causal),
            path: "torch".into(),
            ms_median: r.ms_median,
            ms_min: r.ms_min,
            tflops: Some(tf),
            gbps: Some(c.bytes() / (r.ms_median * 1e-3) / 1e9),
            pct_peak: peak.map(|p| 100.0 * tf / p.tflops),
            ratio: auto_ms.get(&r.id).map(|o| r.ms_median / o),
            ratio_of: "t(impl)/t(ours_auto)",
            note: r.note.clone(),
        });
    }
    rows
}

/// One decode case, three times over the same cache: with RoPE applied to the cached keys in the
/// kernel (the product), the same with Qwen3-Next's output gate fused, and with no PE (what a
/// pre-rotated cache would cost: the kernel's ceiling without the rotation).
fn decode_case<T: Dtype>(cx: &Ctx, c: &DecodeCase, copy_gbps: f64, seed: u64) -> Res<Vec<Row>> {
    let (b, ctx, hq, hkv, d) = (c.batch, c.context, c.q_heads, c.kv_heads, c.head_dim);
    let mut sets = dev::input_sets(Decode::<T>::kv_bytes(b, ctx, hkv, d), cx.l2);
    if cx.fits(Decode::<T>::device_bytes(b, ctx, hq, hkv, d, PAGE_SIZE, sets)).is_err() {
        sets = 1;
    }
    cx.fits(Decode::<T>::device_bytes(b, ctx, hq, hkv, d, PAGE_SIZE, sets))?;
    let mut dc = Decode::<T>::new(&cx.stream, b, ctx, hq, hkv, d, PAGE_SIZE, sets, cx.sms, seed)?;
    let timer = Timer::new(&cx.stream)?;
    let (gpu, stream) = (cx.gpu, &cx.stream);
    let mut rows = Vec::with_capacity(3);
    for (implementation, pe) in [("ours_paged_decode", "rope"), ("ours_paged_decode_output_gate", "rope"), ("ours_paged_decode_nope", "none")] {
        if pe == "none" {
            dc.p.rope = None;
        }
        let gated = implementation.ends_with("output_gate");
        let st = timer.measure(&cx.settings, &mut |i| if gated { dc.run_gated(gpu, stream, i) } else { dc.run(gpu, stream, i) })?;
        let finite = dc.output_finite(stream)?;
        let gbps = c.kv_bytes() / (st.median_ms * 1e-3) / 1e9;
        rows.push(Row {
            section: "decode",
            case: c.id(),
            implementation: implementation.into(),
            pe,
            dtype: c.dtype.name().into(),
            head_dim: d,
            batch: b,
            seq: ctx,
            q_heads: hq,
            kv_heads: hkv,
            causal: Some(true),
            path: match pe {
                "rope" => format!("splits={}, base steps={}", dc.splits, cuda::decode_base_steps::<T>(&dc.p, &dc.batch, dc.splits, gpu.smem_per_sm())),
                _ => format!("splits={}", dc.splits),
            },
            ms_median: st.median_ms,
            ms_min: st.min_ms,
            tflops: Some(c.flops() / (st.median_ms * 1e-3) / 1e12),
            gbps: Some(gbps),
            pct_peak: cx.peak.map(|p| 100.0 * gbps / p.gbps),
            ratio: Some(gbps / copy_gbps),
            ratio_of: "GB/s(K+V read) / GB/s(dtod copy, read+write)",
            note: format!("{} input sets{}", dc.sets(), if finite { "" } else { "; NON-FINITE OUTPUT" }),
        });
    }
    Ok(rows)
}

/// One chunked prefill, both ways over the same cache: fused (the split count
/// paged_prefill_splits picks) and gathered; their outputs compared normwise.
fn chunked_case<T: Dtype>(cx: &Ctx, c: &ChunkCase, seed: u64) -> Res<Vec<Row>> {
    let (b, n, ctx, hq, hkv, d) = (c.batch, c.chunk, c.context, c.q_heads, c.kv_heads, c.head_dim);
    cx.fits(PagedPrefill::<T>::device_bytes(b, n, ctx, hq, hkv, d, PAGE_SIZE))?;
    let mut pp = PagedPrefill::<T>::new(&cx.stream, b, n, ctx, hq, hkv, d, PAGE_SIZE, cx.sms, seed)?;
    let timer = Timer::new(&cx.stream)?;
    let (gpu, stream) = (cx.gpu, &cx.stream);
    let mut rows = Vec::with_capacity(2);
    let mut outputs = Vec::with_capacity(2);
    for (implementation, gathered) in [("ours_paged_fused", false), ("ours_paged_gathered", true)] {
        let mut path = None;
        let st = timer.measure(&cx.settings, &mut |_| {
            path = Some(pp.run(gpu, stream, gathered)?);
            Ok(())
        })?;
        outputs.push(pp.output(stream)?);
        let tf = c.flops() / (st.median_ms * 1e-3) / 1e12;
        rows.push(Row {
            section: "chunked",
            case: c.id(),
            implementation: implementation.into(),
            pe: "rope+alibi",
            dtype: c.dtype.name().into(),
            head_dim: d,
            batch: b,
            seq: n,
            q_heads: hq,
            kv_heads: hkv,
            causal: Some(true),
            path: match path {
                Some(cuda::PagedPrefillPath::Gathered) => format!("gathered, splits={}", pp.splits),
                _ => format!("fused, splits={}", pp.splits),
            },
            ms_median: st.median_ms,
            ms_min: st.min_ms,
            tflops: Some(tf),
            pct_peak: cx.peak.map(|p| 100.0 * tf / p.tflops),
            note: format!("context {ctx}"),
            ..Row::default()
        });
    }
    let diff = dev::rel_diff(&outputs[1], &outputs[0]);
    let fused_ms = rows[0].ms_median;
    let g = &mut rows[1];
    g.ratio = Some(fused_ms / g.ms_median);
    g.ratio_of = "t(fused)/t(gathered)";
    g.note = format!("context {ctx}; vs fused {diff:.1e} normwise{}", if diff < 2e-2 { "" } else { " MISMATCH" });
    Ok(rows)
}

/// The table body of one section: `row(r)` for each measurement but the `partner` rows (shown
/// beside their case's), and for a failed case its error across the table's `cols` columns.
fn section_body(rows: &[Row], section: &str, partner: &str, cols: usize, row: impl Fn(&Row) -> Vec<String>) -> Vec<Vec<String>> {
    rows.iter()
        .filter(|r| r.section == section && r.implementation != partner)
        .map(|r| {
            if r.implementation == "error" {
                let mut v = vec![r.case.clone()];
                v.extend(std::iter::repeat_n("—".to_string(), cols - 2));
                v.push(r.note.clone());
                return v;
            }
            row(r)
        })
        .collect()
}

fn chunked_table(rows: &[Row], peak: Option<Peak>) -> String {
    let body = section_body(rows, "chunked", "ours_paged_fused", 8, |r| {
        let fused = find(rows, "chunked", &r.case, "ours_paged_fused");
        vec![
            r.case.clone(),
            fused.map_or("—".into(), |f| format!("{:.3} ({})", f.ms_median, f.path)),
            num(fused.and_then(|f| f.tflops), 1),
            format!("{:.3}", r.ms_median),
            num(r.tflops, 1),
            num(r.pct_peak, 1),
            times(r.ratio),
            r.note.clone(),
        ]
    });
    format!(
        "\nCHUNKED PREFILL (paged, page {PAGE_SIZE}, RoPE + ALiBi, causal, GQA 32/8) — TFLOP/s = 4·b·h·d·(visible query-key pairs) / time;\n\
         %peak of {}; gathered/fused = t(fused)/t(gathered) (> 1: gathering first is faster)\n{}",
        peak.map_or("an unknown peak".to_string(), |p| format!("{} {:.0} TFLOP/s", p.card, p.tflops)),
        table(&["chunked", "fused ms", "fused TFLOP/s", "gathered ms", "gathered TFLOP/s", "%peak", "gathered/fused", "note"], &body)
    )
}

fn rope_case<T: Dtype>(cx: &Ctx, c: &RopeCase, seed: u64) -> Res<Vec<Row>> {
    let (t, hq, hkv, d) = (c.tokens, c.q_heads, c.kv_heads, c.head_dim);
    let moved = RopeCopy::<T>::moved_bytes(t, hq, hkv, d);
    let sets = dev::input_sets(moved / 2, cx.l2);
    // Q and K, the copy's source and destination, the gated queries (2·Q) and the dense Q.
    let q_bytes = t * hq * d * std::mem::size_of::<T>();
    cx.fits(2 * moved * sets + 2 * q_bytes * sets + q_bytes)?;
    let mut rc = RopeCopy::<T>::new(&cx.stream, t, hq, hkv, d, sets, seed)?;
    let timer = Timer::new(&cx.stream)?;
    let (gpu, stream) = (cx.gpu, &cx.stream);
    let rope = timer.measure(&cx.settings, &mut |i| rc.run_rope(gpu, stream, i))?;
    let copy = timer.measure(&cx.settings, &mut |i| rc.run_copy(stream, i))?;
    let normed = timer.measure(&cx.settings, &mut |i| rc.run_rope_normed(gpu, stream, i, true))?;
    let norm_only = timer.measure(&cx.settings, &mut |i| rc.run_rope_normed(gpu, stream, i, false))?;
    let gated = timer.measure(&cx.settings, &mut |i| rc.run_rope_gated(gpu, stream, i))?;
    let layer_normed = timer.measure(&cx.settings, &mut |i| rc.run_rope_layer_normed(gpu, stream, i))?;
    let row = |implementation: &str, st: dev::Stats, ratio: Option<f64>, note: String| {
        let gbps = c.bytes() / (st.median_ms * 1e-3) / 1e9;
        Row {
            section: "rope",
            case: c.id(),
            implementation: implementation.into(),
            pe: "rope",
            dtype: c.dtype.name().into(),
            head_dim: d,
            batch: 1,
            seq: t,
            q_heads: hq,
            kv_heads: hkv,
            path: "in place".into(),
            ms_median: st.median_ms,
            ms_min: st.min_ms,
            gbps: Some(gbps),
            pct_peak: cx.peak.map(|p| 100.0 * gbps / p.gbps),
            ratio,
            ratio_of: if ratio.is_some() { "t(copy)/t(rope)" } else { "" },
            note,
            ..Row::default()
        }
    };
    Ok(vec![
        row(
            "ours_rope_inplace",
            rope,
            Some(copy.median_ms / rope.median_ms),
            format!("{sets} input sets; bytes read + written"),
        ),
        row(
            "ours_rope_qk_norm_inplace",
            normed,
            Some(copy.median_ms / normed.median_ms),
            format!("Qwen3's QK norm (per head, weighted) then RoPE, one pass; {:.2}x the time of rope alone", normed.median_ms / rope.median_ms),
        ),
        row(
            "ours_rope_qk_layernorm_inplace",
            layer_normed,
            Some(copy.median_ms / layer_normed.median_ms),
            format!(
                "Cohere's QK LayerNorm (per head, centred, weights per head) then RoPE, one pass; {:.2}x the time of Qwen3's normed rope",
                layer_normed.median_ms / normed.median_ms
            ),
        ),
        row(
            "ours_qk_norm_rope_gated",
            gated,
            Some(copy.median_ms / gated.median_ms),
            format!(
                "Qwen3-Next's gated query: queries read from between the gates, normed and rotated into a dense Q, K in place; {:.2}x the time of the in-place normed rope",
                gated.median_ms / normed.median_ms
            ),
        ),
        row(
            "ours_qk_norm_inplace",
            norm_only,
            Some(copy.median_ms / norm_only.median_ms),
            "the QK norm alone (rotary_dim 0: the unrotated cache's path)".into(),
        ),
        row("dtod_copy_same_bytes", copy, None, "cuMemcpyDtoDAsync of Q+K bytes".into()),
    ])
}

fn find<'a>(rows: &'a [Row], section: &str, case: &str, implementation: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.section == section && r.case == case && r.implementation == implementation)
}

fn prefill_table(plan: &Plan, rows: &[Row], peak: Option<Peak>) -> String {
    // Baseline columns: t(baseline)/t(ours); > 1 means ours is faster. Empty columns are dropped.
    let baselines = [
        ("unfused", "unfused_rope_kernel_then_attention"),
        ("no-PE", "ours_no_pe"),
        ("sdpa-flash", "torch_sdpa_flash"),
        ("sdpa-cudnn", "torch_sdpa_cudnn"),
        ("FA2", "flash_attn2"),
        ("FA3", "flash_attn3"),
        ("torch rope+sdpa", "torch_rotary_then_sdpa_flash"),
    ];
    let present: Vec<(&str, &str)> = baselines
        .iter()
        .copied()
        .filter(|(_, imp)| rows.iter().any(|r| r.section == "prefill" && r.implementation == *imp))
        .collect();
    let mut header = vec!["prefill (GQA 32/8, RoPE+ALiBi)", "fused ms", "pre-rot ms", "ours", "TFLOP/s", "%peak"];
    header.extend(present.iter().map(|(h, _)| *h));
    header.push("check");
    let mut body = Vec::new();
    for c in &plan.prefill {
        let id = c.id();
        let (Some(f), Some(p)) =
            (find(rows, "prefill", &id, "ours_fused"), find(rows, "prefill", &id, "ours_prerotated"))
        else {
            let why = find(rows, "prefill", &id, "error").map_or("not run".to_string(), |r| r.note.clone());
            let mut line = vec![c.to_string(), "—".into(), "—".into(), why];
            line.resize(header.len(), String::new());
            body.push(line);
            continue;
        };
        let ours = if p.path.contains("[auto]") { p } else { f };
        let mut line = vec![
            c.to_string(),
            format!("{:.3}", f.ms_median),
            format!("{:.3}", p.ms_median),
            (if ours.implementation == "ours_fused" { "fused" } else { "pre-rot" }).into(),
            num(ours.tflops, 1),
            num(ours.pct_peak, 1),
        ];
        for (_, imp) in &present {
            line.push(times(find(rows, "prefill", &id, imp).and_then(|r| r.ratio)));
        }
        line.push(if f.note.contains("MISMATCH") { "MISMATCH".into() } else { "ok".into() });
        body.push(line);
    }
    format!(
        "\nPREFILL — ours = the path prefill_prefers_workspace picks; TFLOP/s = 4·b·h·n²·d (halved if causal) / time;\n\
         %peak of {}; baseline columns = t(baseline)/t(ours) (> 1: ours faster).\n\
         torch / flash_attn compute NO position encoding; unfused = rope kernel + attention with ALiBi.\n{}",
        peak.map_or("an unknown peak".to_string(), |p| format!("{} {:.0} TFLOP/s", p.card, p.tflops)),
        table(&header, &body)
    )
}

fn decode_table(rows: &[Row], copy_gbps: f64) -> String {
    let body = section_body(rows, "decode", "ours_paged_decode_nope", 9, |r| {
        let nope = find(rows, "decode", &r.case, "ours_paged_decode_nope");
        vec![
            r.case.clone(),
            r.path.clone(),
            format!("{:.4}", r.ms_median),
            num(r.gbps, 0),
            num(r.pct_peak, 1),
            times(r.ratio),
            num(nope.and_then(|n| n.gbps), 0),
            times(nope.map(|n| n.ms_median / r.ms_median)),
            r.note.clone(),
        ]
    });
    format!(
        "\nDECODE (paged, page {PAGE_SIZE}, 1 query/sequence, RoPE, GQA 32/8) — GB/s = K+V bytes read / time; ×copy = GB/s / {copy_gbps:.0} GB/s dtod copy;\nno-PE = the same kernel and cache without RoPE (a pre-rotated cache); rope cost = t(no-PE)/t(RoPE), < 1 means RoPE costs time\n{}",
        table(&["decode", "splits", "ms", "GB/s", "%peak", "×copy", "no-PE GB/s", "rope cost", "note"], &body)
    )
}

fn rope_table(rows: &[Row]) -> String {
    let mut body = Vec::new();
    for r in rows.iter().filter(|r| r.section == "rope" && r.implementation != "dtod_copy_same_bytes") {
        if r.implementation == "error" {
            body.push(vec![r.case.clone(), "error".into(), "—".into(), "—".into(), "—".into(), "—".into(), "—".into(), r.note.clone()]);
            continue;
        }
        let copy = find(rows, "rope", &r.case, "dtod_copy_same_bytes");
        body.push(vec![
            r.case.clone(),
            r.implementation.trim_start_matches("ours_").trim_end_matches("_inplace").into(),
            format!("{:.4}", r.ms_median),
            num(r.gbps, 0),
            copy.map_or("—".into(), |c| format!("{:.4}", c.ms_median)),
            copy.map_or("—".into(), |c| num(c.gbps, 0)),
            times(r.ratio),
            num(r.pct_peak, 1),
        ]);
    }
    format!(
        "\nROPE in place (Q [t,32,d] + K [t,8,d]) vs a dtod copy of the same bytes — GB/s count read + write; rope/copy = t(copy)/t(kernel);\nrope_qk_norm = Qwen3's QK norm then RoPE in one pass, qk_norm = the norm alone,\nqk_norm_rope_gated = the same from Qwen3-Next's gated q_proj rows into a dense Q\n{}",
        table(&["rope", "kernel", "ms", "GB/s", "copy ms", "copy GB/s", "rope/copy", "%peak"], &body)
    )
}
