//! GPU kernel benchmarks (criterion; times from CUDA events around back-to-back launches, after
//! criterion's warm-up): rope, scores, prefill (fused and pre-rotated paths, the output gate
//! fused, and the unfused pipeline; at head_dim 128, and at 512 as Gemma 4's full layers), paged
//! decode with split-K (and with the output gate; 128 and 512), paged (chunked) prefill fused and gathered. Without a GPU: prints "gpu benches skipped: <why>" and
//! exits 0. The comparison against torch / flash_attn / copy bandwidth is `rope-attn bench`.

#[path = "../src/bin/rope-attn/bench/device.rs"]
mod device;

use criterion::{BenchmarkId, Criterion, Throughput};
use device::{Decode, PagedPrefill, Prefill, PrefillVariant, Res, RopeCopy, Timer};
use half::bf16;
use rope_attn::cuda::{self, Gpu, ScoresShape};
use rope_attn::{Alibi, AttentionParams};
use std::sync::Arc;
use std::time::Duration;

type Stream = Arc<cudarc::driver::CudaStream>;
/// A named group of benchmarks.
type Step<'a> = (&'a str, &'a mut dyn FnMut(&mut Criterion) -> Res<()>);

/// Criterion's `iter_custom` in CUDA-event time: `iters` back-to-back calls between two events.
fn gpu_time(timer: &Timer, iters: u64, f: &mut dyn FnMut(usize) -> Res<()>) -> Duration {
    let ms = timer.time(iters as usize, 0, f).expect("a benchmarked launch failed");
    Duration::from_secs_f64(ms * 1e-3)
}

fn rope(c: &mut Criterion, gpu: &Gpu, stream: &Stream, l2: usize) -> Res<()> {
    let (hq, hkv, d) = (32, 8, 128);
    let mut g = c.benchmark_group("gpu/rope_inplace_bf16_d128");
    for tokens in [8192usize, 65536] {
        let bytes = RopeCopy::<bf16>::moved_bytes(tokens, hq, hkv, d);
        let mut rc = RopeCopy::<bf16>::new(stream, tokens, hq, hkv, d, device::input_sets(bytes / 2, l2), 1)?;
        let timer = Timer::new(stream)?;
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("rope", tokens), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| rc.run_rope(gpu, stream, i)))
        });
        g.bench_function(BenchmarkId::new("qk_norm+rope", tokens), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| rc.run_rope_normed(gpu, stream, i, true)))
        });
        g.bench_function(BenchmarkId::new("qk_layernorm+rope", tokens), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| rc.run_rope_layer_normed(gpu, stream, i)))
        });
        g.bench_function(BenchmarkId::new("qk_norm+rope gated", tokens), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| rc.run_rope_gated(gpu, stream, i)))
        });
        g.bench_function(BenchmarkId::new("dtod_copy_same_bytes", tokens), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| rc.run_copy(stream, i)))
        });
    }
    g.finish();
    Ok(())
}

fn scores(c: &mut Criterion, gpu: &Gpu, stream: &Stream) -> Res<()> {
    let (n, hq, hkv, d) = (1024usize, 32usize, 8usize, 128usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(device::bench_rotary(d)?);
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let q = device::random_device::<bf16>(stream, n * hq * d, 21)?;
    let k = device::random_device::<bf16>(stream, n * hkv * d, 22)?;
    let mut out = stream.alloc_zeros::<f32>(hq * n * n)?;
    let shape = ScoresShape::contiguous(&p, n, n, 0);
    let timer = Timer::new(stream)?;
    let mut g = c.benchmark_group("gpu/scores_bf16_d128");
    g.throughput(Throughput::Elements((hq * n * n) as u64));
    g.bench_function(BenchmarkId::new("rope+alibi causal", format!("{n}x{n}")), |b| {
        b.iter_custom(|iters| {
            gpu_time(&timer, iters, &mut |_| Ok(cuda::scores(gpu, stream, &q, &k, &mut out, &shape, &p)?))
        })
    });
    g.finish();
    Ok(())
}

/// Prefill of `(batch, seqlen)` shapes with `hq` query heads over `hkv` at head_dim `d`.
fn prefill(c: &mut Criterion, gpu: &Gpu, stream: &Stream, l2: usize, (hq, hkv, d): (usize, usize, usize), shapes: &[(usize, usize)]) -> Res<()> {
    let mut g = c.benchmark_group(format!("gpu/prefill_bf16_d{d}_gqa{hq}-{hkv}_causal"));
    for &(batch, seqlen) in shapes {
        let sets = device::input_sets(Prefill::<bf16>::set_bytes(batch, seqlen, hq, hkv, d), l2);
        let mut pf = Prefill::<bf16>::new(stream, batch, seqlen, hq, hkv, d, true, sets, 5)?;
        let (fused, pre, d_pre, d_unf) = pf.cross_check(gpu, stream)?;
        println!(
            "prefill {batch}x{seqlen}: without workspace the launcher took {fused:?}, with one {pre:?} \
             (prefill_prefers_workspace: {}); outputs vs fused: pre-rotated {d_pre:.1e}, unfused {d_unf:.1e}",
            cuda::prefill_prefers_workspace::<bf16>(&pf.with_pe, &pf.batch)
        );
        let flops = 4.0 * (batch * hq * seqlen * seqlen * d) as f64 / 2.0;
        g.throughput(Throughput::Elements(flops as u64)); // "elements" = FLOPs: criterion prints Gelem/s = GFLOP/s
        let timer = Timer::new(stream)?;
        for (name, v) in [
            ("fused", PrefillVariant::Fused),
            ("pre-rotated", PrefillVariant::PreRotated),
            ("no-pe", PrefillVariant::NoPe),
            ("fused + output gate", PrefillVariant::FusedGated),
            ("unfused rope+attn", PrefillVariant::Unfused),
        ] {
            g.bench_function(BenchmarkId::new(name, format!("{batch}x{seqlen}")), |b| {
                b.iter_custom(|n| gpu_time(&timer, n, &mut |i| pf.run(gpu, stream, v, i).map(|_| ())))
            });
        }
    }
    g.finish();
    Ok(())
}

/// Paged decode of `(batch, context)` shapes with `hq` query heads over `hkv` at head_dim `d`.
fn decode(c: &mut Criterion, gpu: &Gpu, stream: &Stream, l2: usize, sms: usize, (hq, hkv, d): (usize, usize, usize), shapes: &[(usize, usize)]) -> Res<()> {
    let mut g = c.benchmark_group(format!("gpu/decode_paged_bf16_d{d}_gqa{hq}-{hkv}"));
    for &(batch, ctx) in shapes {
        let kv = Decode::<bf16>::kv_bytes(batch, ctx, hkv, d);
        let mut dc = Decode::<bf16>::new(stream, batch, ctx, hq, hkv, d, 16, device::input_sets(kv, l2), sms, 9)?;
        println!("decode b{batch} ctx {ctx}: {} splits (decode_splits for {sms} SMs)", dc.splits);
        let timer = Timer::new(stream)?;
        g.throughput(Throughput::Bytes(kv as u64));
        g.bench_function(BenchmarkId::new(format!("b{batch}"), format!("ctx{ctx}")), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| dc.run(gpu, stream, i)))
        });
        g.bench_function(BenchmarkId::new(format!("b{batch} output gate"), format!("ctx{ctx}")), |b| {
            b.iter_custom(|n| gpu_time(&timer, n, &mut |i| dc.run_gated(gpu, stream, i)))
        });
    }
    g.finish();
    Ok(())
}

fn chunked(c: &mut Criterion, gpu: &Gpu, stream: &Stream, sms: usize) -> Res<()> {
    let (hq, hkv, d) = (32, 8, 128);
    let mut g = c.benchmark_group("gpu/paged_prefill_bf16_d128_gqa32-8_rope+alibi");
    for (chunk, ctx) in [(2048usize, 8192usize), (512, 32768)] {
        let mut pp = PagedPrefill::<bf16>::new(stream, 1, chunk, ctx, hq, hkv, d, 16, sms, 11)?;
        let timer = Timer::new(stream)?;
        for (name, gathered) in [("fused", false), ("gathered", true)] {
            g.bench_function(BenchmarkId::new(name, format!("chunk{chunk}_ctx{ctx}")), |b| {
                b.iter_custom(|n| gpu_time(&timer, n, &mut |_| pp.run(gpu, stream, gathered).map(|_| ())))
            });
        }
    }
    g.finish();
    Ok(())
}

fn main() {
    if let Err(why) = cuda::device_status() {
        println!("gpu benches skipped: {why}");
        return;
    }
    let gpu = Gpu::new(0).expect("a device is present but could not be opened");
    // SAFETY: one stream only, so cudarc's cross-stream event tracking has nothing to order.
    unsafe { gpu.context().disable_event_tracking() };
    let stream = gpu.context().default_stream();
    let l2 = device::l2_bytes(&gpu).unwrap_or(50 << 20);
    let sms = device::sm_count(&gpu).unwrap_or(108);
    println!("gpu benches on {} ({sms} SMs, {} MB L2)", gpu.describe(), l2 >> 20);
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
        .configure_from_args();
    // Head dim 512: Gemma 4's full layers (32 query heads over 4), proportional RoPE.
    let (llama, gemma4) = ((32, 8, 128), (32, 4, 512));
    let steps: [Step; 7] = [
        ("rope", &mut |c| rope(c, &gpu, &stream, l2)),
        ("scores", &mut |c| scores(c, &gpu, &stream)),
        ("prefill", &mut |c| prefill(c, &gpu, &stream, l2, llama, &[(1, 4096), (8, 512)])),
        ("prefill d512", &mut |c| prefill(c, &gpu, &stream, l2, gemma4, &[(1, 4096)])),
        ("decode", &mut |c| decode(c, &gpu, &stream, l2, sms, llama, &[(1, 32768), (16, 8192), (64, 4096)])),
        ("decode d512", &mut |c| decode(c, &gpu, &stream, l2, sms, gemma4, &[(1, 32768), (16, 8192)])),
        ("chunked", &mut |c| chunked(c, &gpu, &stream, sms)),
    ];
    let mut failed = false;
    for (name, step) in steps {
        if let Err(e) = step(&mut c) {
            eprintln!("gpu bench {name} failed: {e}");
            failed = true;
        }
    }
    c.final_summary();
    if failed {
        std::process::exit(1);
    }
}
