//! Shared by the GPU test files: device discovery that skips loudly (or fails under
//! `ROPE_ATTN_REQUIRE_GPU=1`), seeded data and the schedules the sweeps iterate over.
#![allow(dead_code)]

pub mod cases;
pub mod explicit;
pub mod gate;
pub mod one_head;
pub mod paged;

use cudarc::driver::CudaStream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::cuda::{device_status, Gpu};
use rope_attn::{Layout, RopeConfig, RopeScaling, Rotary};
use std::io::Write;
use std::sync::Arc;

/// The GPU, or `None` after printing why this test skipped. libtest captures `println!`, so the
/// message goes straight to the stderr handle, where CI logs show it.
pub fn gpu_or_skip(test: &str) -> Option<(Gpu, Arc<CudaStream>)> {
    match device_status() {
        Ok(_) => {
            let gpu = Gpu::new(0).expect("a device is present but could not be opened");
            let stream = gpu.context().default_stream();
            Some((gpu, stream))
        }
        Err(why) => {
            if std::env::var("ROPE_ATTN_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: ROPE_ATTN_REQUIRE_GPU=1 but no GPU is usable: {why}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({why}); this machine cannot check the kernels (last GPU run: H100, 2026-11-25, BENCHMARKS.md)");
            None
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-1, 1).
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Cumulative offsets `[0, l0, l0 + l1, ...]` of a varlen batch (`cu_seqlens`).
pub fn cu_seqlens(lengths: &[usize]) -> Vec<i32> {
    std::iter::once(0).chain(lengths.iter().scan(0, |a, &x| { *a += x as i32; Some(*a) })).collect()
}

/// Round through the device dtype so that the reference sees exactly what the GPU sees.
pub fn as_dtype<T: rope_attn::cuda::Dtype>(x: &[f64]) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let back = t.iter().map(|v| v.to_f64()).collect();
    (t, back)
}

/// The emulator's schedule seed for a sweep: `base`, mixed with `ROPE_ATTN_EMU_SEED` when set
/// (to fuzz thread interleavings and copy timings beyond the fixed CI seeds).
#[cfg(feature = "emulator")]
pub fn emulator(base: u64) -> rope_attn::emulator::Emulator {
    let extra = std::env::var("ROPE_ATTN_EMU_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    rope_attn::emulator::Emulator::with_seed(base ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A guarded host copy for the emulator: kernel accesses past its end fault and are reported.
#[cfg(feature = "emulator")]
pub fn guard<T: Copy>(v: &[T]) -> rope_attn::emulator::GuardedBuf<T> {
    rope_attn::emulator::GuardedBuf::from_slice(v)
}

/// Plain RoPE (theta 1e4) with every pair turning, up to head_dim 256; at 512, where the kernels
/// turn at most 128 pairs, Gemma 4's proportional RoPE (`schedules`' first there).
pub fn turning_rotary(d: usize) -> Rotary {
    if d <= 256 {
        Rotary::from_schedule(&rope_attn::RopeSchedule::plain(10000.0, d).unwrap(), Layout::Half)
    } else {
        schedules(d, d).remove(0).1
    }
}

/// Schedules of every rope type, for a head of `d` with rotary dim `r`. Past 256 rotated
/// components (head_dim 512, where the kernels turn at most 128 pairs) the first is Gemma 4's
/// proportional RoPE over the whole head (64 pairs turn, the rest pass through), and the others
/// rotate the first 256 components.
pub fn schedules(d: usize, r: usize) -> Vec<(&'static str, Rotary)> {
    let wide = r > 256;
    let r = r.min(256);
    let half = r / 2;
    let mk = |theta: f64, scaling: RopeScaling, seq: Option<usize>, layout: Layout| {
        let cfg = RopeConfig::with_scaling(theta, d, r, Some(8192), scaling).unwrap();
        Rotary::from_schedule(&cfg.schedule(seq).unwrap(), layout)
    };
    let first = if wide {
        let cfg = RopeConfig::with_scaling(1e6, d, d, Some(8192), RopeScaling::Proportional { factor: 1.0, rotated_pairs: d / 8 }).unwrap();
        ("proportional", Rotary::from_schedule(&cfg.schedule(None).unwrap(), Layout::Half))
    } else {
        ("default", mk(10000.0, RopeScaling::Default, None, Layout::Half))
    };
    vec![
        first,
        ("default-interleaved", mk(10000.0, RopeScaling::Default, None, Layout::Interleaved)),
        ("linear", mk(10000.0, RopeScaling::Linear { factor: 4.0 }, None, Layout::Half)),
        ("dynamic", mk(10000.0, RopeScaling::Dynamic { factor: 2.0, max_position_embeddings: 8192 }, Some(20000), Layout::Half)),
        ("ntk", mk(10000.0, RopeScaling::Ntk { factor: 4.0 }, None, Layout::Interleaved)),
        ("yarn", mk(1e6, RopeScaling::yarn(4.0, 32768), None, Layout::Half)),
        (
            "llama3",
            mk(
                500000.0,
                RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 },
                None,
                Layout::Half,
            ),
        ),
        (
            "longrope",
            mk(
                10000.0,
                RopeScaling::LongRope {
                    short_factor: (0..half).map(|i| 1.0 + i as f64 / half as f64).collect(),
                    long_factor: (0..half).map(|i| 1.0 + 4.0 * i as f64 / half as f64).collect(),
                    original_max_position_embeddings: 4096,
                    factor: 32.0,
                    attention_factor: None,
                },
                Some(100000),
                Layout::Half,
            ),
        ),
    ]
}
