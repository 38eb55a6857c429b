//! The output gate on candle tensors (`rope_attn::candle::attention_*_gated`): on CPU tensors
//! against the ungated op times `sigmoid(gate)` written with candle ops, for Qwen3-Next's gate
//! read as a view of q_proj's output (`narrow(2, d, d)`: rows and heads strided), LFM3's per-head
//! gate (`[t, Hq, 1]` and `[t, Hq]`), in prefill, paged decode and chunked prefill over the
//! paged cache; a gate that is a view of Q's own storage; typed errors for a wrong shape, dtype
//! or stride. With `candle-cuda`, CUDA tensors against the CPU path (skipped loudly without a
//! GPU, failing under ROPE_ATTN_REQUIRE_GPU=1).
//!
//! Tolerance: every input is f32 in [-1, 1) (gates in [-4, 4)). Our CPU path gates the f64
//! result, then rounds once; candle's product rounds the f32 output, the f32 sigmoid (exp, add,
//! division: a few ulps) and the product, all relative to |o| <= 1: 1e-6 holds 8 ulps.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::candle as ra;
use rope_attn::{AttentionParams, Error, Layout, RopeSchedule, Rotary};

const TOL: f32 = 1e-6;

fn uniform(r: &mut StdRng, dims: &[usize], scale: f32, dev: &Device) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| scale * r.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims, dev).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    f(a).iter().zip(f(b)).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn params(hq: usize, hkv: usize, d: usize) -> AttentionParams {
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(Rotary::from_schedule(&RopeSchedule::plain(10000.0, d).unwrap(), Layout::Half));
    p
}

/// `out · sigmoid(gate)` with candle ops in f32, the gate broadcast over d when it is per head.
fn gated_by_candle(out: &Tensor, gate: &Tensor) -> Tensor {
    let (out, gate) = (out.to_dtype(DType::F32).unwrap(), gate.to_dtype(DType::F32).unwrap());
    let g = match gate.rank() {
        2 => gate.unsqueeze(2).unwrap(),
        _ => gate.clone(),
    };
    let sig = (g.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
    out.broadcast_mul(&sig).unwrap()
}

/// Qwen3-Next's gate as a view of q_proj's output `[t, Hq, 2d]`, LFM3's `[t, Hq, 1]` and `[t, Hq]`.
fn gates(r: &mut StdRng, t: usize, hq: usize, d: usize, dev: &Device) -> Vec<(&'static str, Tensor)> {
    let q_proj = uniform(r, &[t, hq, 2 * d], 4.0, dev);
    let per_head = uniform(r, &[t, hq, 1], 4.0, dev);
    vec![
        ("q_proj view", q_proj.narrow(2, d, d).unwrap()),
        ("per head [t, Hq, 1]", per_head.clone()),
        ("per head [t, Hq]", per_head.squeeze(2).unwrap()),
    ]
}

#[test]
fn prefill_gated_is_the_ungated_output_times_sigmoid() {
    let mut r = StdRng::seed_from_u64(70);
    let (hq, hkv, d) = (4, 2, 64);
    let p = params(hq, hkv, d);
    let (sq, sk) = ([5usize, 3], [9usize, 3]);
    let dev = Device::Cpu;
    let q = uniform(&mut r, &[8, hq, d], 1.0, &dev);
    let (k, v) = (uniform(&mut r, &[12, hkv, d], 1.0, &dev), uniform(&mut r, &[12, hkv, d], 1.0, &dev));
    let (out, lse) = ra::attention_prefill(&q, &k, &v, &p, &sq, &sk).unwrap();
    for (name, gate) in gates(&mut r, 8, hq, d, &dev) {
        let (og, lg) = ra::attention_prefill_gated(&q, &k, &v, &gate, &p, &sq, &sk).unwrap();
        let e = max_diff(&og, &gated_by_candle(&out, &gate));
        assert!(e <= TOL, "{name}: {e:e}");
        assert_eq!(max_diff(&lg, &lse), 0.0, "{name}: the LSE is the attention's own");
        assert!(max_diff(&og, &out) > 0.1, "{name}: the gate did something");
    }
    // A gate that is a view of Q's own storage: one projection `[t, 2·Hq, d]` emitting every
    // query head, then every gate.
    let proj = uniform(&mut r, &[8, 2 * hq, d], 1.0, &dev);
    let (qv, gv) = (proj.narrow(1, 0, hq).unwrap(), proj.narrow(1, hq, hq).unwrap());
    let (o, _) = ra::attention_prefill(&qv, &k, &v, &p, &sq, &sk).unwrap();
    let (og, _) = ra::attention_prefill_gated(&qv, &k, &v, &gv, &p, &sq, &sk).unwrap();
    assert!(max_diff(&og, &gated_by_candle(&o, &gv)) <= TOL);
}

/// A paged cache of two sequences (contexts 7 and 4), pages of 4, filled by paged_append.
fn cache(r: &mut StdRng, hkv: usize, d: usize, dt: DType, dev: &Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let (kc, vc) = (Tensor::zeros((6, 4, hkv, d), dt, dev).unwrap(), Tensor::zeros((6, 4, hkv, d), dt, dev).unwrap());
    let on = |x: Tensor| x.to_dtype(dt).unwrap().to_device(dev).unwrap();
    let (k, v) = (on(uniform(r, &[11, hkv, d], 1.0, &Device::Cpu)), on(uniform(r, &[11, hkv, d], 1.0, &Device::Cpu)));
    // Sequence 0 in pages 5, 1; sequence 1 in page 3.
    let slots: Vec<u32> = [20u32, 21, 22, 23, 4, 5, 6, 12, 13, 14, 15].to_vec();
    ra::paged_append(&k, &v, &kc, &vc, &Tensor::new(slots.as_slice(), dev).unwrap()).unwrap();
    let table = Tensor::new(&[[5u32, 1], [3, 0]], dev).unwrap();
    (kc, vc, table, Tensor::new(&[7u32, 4], dev).unwrap())
}

#[test]
fn decode_and_paged_prefill_gated_are_the_ungated_outputs_times_sigmoid() {
    let mut r = StdRng::seed_from_u64(71);
    let (hq, hkv, d) = (4, 2, 64);
    let p = params(hq, hkv, d);
    let dev = Device::Cpu;
    let (kc, vc, table, lens) = cache(&mut r, hkv, d, DType::F32, &dev);
    // Decode: two queries per sequence.
    let q = uniform(&mut r, &[4, hq, d], 1.0, &dev);
    let (out, lse) = ra::attention_decode(&q, &kc, &vc, &table, &lens, 8, &p).unwrap();
    for (name, gate) in gates(&mut r, 4, hq, d, &dev) {
        let (og, lg) = ra::attention_decode_gated(&q, &kc, &vc, &table, &lens, &gate, 8, &p).unwrap();
        assert!(max_diff(&og, &gated_by_candle(&out, &gate)) <= TOL, "decode {name}");
        assert_eq!(max_diff(&lg, &lse), 0.0, "decode {name}");
    }
    // Chunked prefill (f16 only, as the kernel): the last 3 and 2 tokens of each context. The
    // ungated and gated outputs are each rounded once to f16 (2^-11 relative of |o| <= 1).
    let (kc, vc, table, lens) = cache(&mut r, hkv, d, DType::F16, &dev);
    let q = uniform(&mut r, &[5, hq, d], 1.0, &dev).to_dtype(DType::F16).unwrap();
    let (out, lse) = ra::attention_prefill_paged(&q, &kc, &vc, &table, &lens, &[3, 2], Some(11), &p).unwrap();
    for (name, gate) in gates(&mut r, 5, hq, d, &dev) {
        let gate = gate.to_dtype(DType::F16).unwrap();
        let (og, lg) = ra::attention_prefill_paged_gated(&q, &kc, &vc, &table, &lens, &gate, &[3, 2], Some(11), &p).unwrap();
        assert!(max_diff(&og, &gated_by_candle(&out, &gate)) <= 2.0 * 2f32.powi(-11), "paged prefill {name}");
        assert_eq!(max_diff(&lg, &lse), 0.0, "paged prefill {name}");
    }
}

#[test]
fn gates_of_the_wrong_shape_dtype_or_stride_are_refused() {
    let mut r = StdRng::seed_from_u64(72);
    let (hq, hkv, d) = (4, 2, 64);
    let p = params(hq, hkv, d);
    let dev = Device::Cpu;
    let q = uniform(&mut r, &[3, hq, d], 1.0, &dev);
    let (k, v) = (uniform(&mut r, &[3, hkv, d], 1.0, &dev), uniform(&mut r, &[3, hkv, d], 1.0, &dev));
    let call = |g: &Tensor| ra::attention_prefill_gated(&q, &k, &v, g, &p, &[3], &[3]).map(|_| ());
    for (what, g) in [
        ("one row short", uniform(&mut r, &[2, hq, d], 1.0, &dev)),
        ("heads", uniform(&mut r, &[3, hq + 1, d], 1.0, &dev)),
        ("head_dim", uniform(&mut r, &[3, hq, d / 2], 1.0, &dev)),
        // [t, d, Hq] transposed to [t, Hq, d]: d is not the unit-stride dim.
        ("strided along d", uniform(&mut r, &[3, d, hq], 1.0, &dev).transpose(1, 2).unwrap()),
        ("rank 4", uniform(&mut r, &[3, hq, d, 1], 1.0, &dev)),
    ] {
        assert!(matches!(call(&g), Err(Error::Shape { what: "gate", .. })), "{what}: {:?}", call(&g));
    }
    let f16 = uniform(&mut r, &[3, hq, d], 1.0, &dev).to_dtype(DType::F16).unwrap();
    assert!(matches!(call(&f16), Err(Error::DtypeMismatch { .. })));
}

/// CUDA tensors against the CPU path, every dtype and gate layout (feature `candle-cuda`).
#[test]
fn gpu_candle_output_gate_matches_cpu() {
    #[cfg(not(feature = "candle-cuda"))]
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED gpu_candle_output_gate_matches_cpu: built without the `candle-cuda` feature (CUDA tensors untested in this build)");
    }
    #[cfg(feature = "candle-cuda")]
    gpu::run();
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use super::*;

    pub fn run() {
        let gpu = match rope_attn::cuda::device_status() {
            Ok(_) => Device::new_cuda(0).expect("a device is present but candle could not open it"),
            Err(why) => {
                if std::env::var("ROPE_ATTN_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("gpu_candle_output_gate_matches_cpu: ROPE_ATTN_REQUIRE_GPU=1 but no GPU is usable: {why}");
                }
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED gpu_candle_output_gate_matches_cpu: no GPU ({why})");
                return;
            }
        };
        let mut r = StdRng::seed_from_u64(73);
        let (hq, hkv, d, t) = (8, 2, 128, 40);
        let p = params(hq, hkv, d);
        let cpu = Device::Cpu;
        for (dt, tol) in [(DType::F32, 2e-5f32), (DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let draw = |r: &mut StdRng, dims: &[usize], scale: f32| uniform(r, dims, scale, &cpu).to_dtype(dt).unwrap();
            let on = |x: &Tensor| x.to_device(&gpu).unwrap();
            let back = |x: &Tensor| x.to_device(&cpu).unwrap();
            let (q, k, v) = (draw(&mut r, &[t, hq, d], 1.0), draw(&mut r, &[t, hkv, d], 1.0), draw(&mut r, &[t, hkv, d], 1.0));
            // Qwen3-Next's gate as a view of q_proj on each device; LFM3's per-head gate.
            let (q_proj, per_head) = (draw(&mut r, &[t, hq, 2 * d], 4.0), draw(&mut r, &[t, hq, 1], 4.0));
            let layouts = [
                ("q_proj view", q_proj.narrow(2, d, d).unwrap(), on(&q_proj).narrow(2, d, d).unwrap()),
                ("per head", per_head.clone(), on(&per_head)),
            ];
            for (name, gc, gg) in &layouts {
                let (oc, lc) = ra::attention_prefill_gated(&q, &k, &v, gc, &p, &[t], &[t]).unwrap();
                let (og, lg) = ra::attention_prefill_gated(&on(&q), &on(&k), &on(&v), gg, &p, &[t], &[t]).unwrap();
                assert!(max_diff(&back(&og), &oc) <= tol, "{dt:?} prefill {name}: {:e}", max_diff(&back(&og), &oc));
                assert!(max_diff(&back(&lg), &lc) <= tol, "{dt:?} prefill lse {name}");
            }
            // A gate that is a view of the device Q's own storage: copied before the op locks it.
            let proj = draw(&mut r, &[t, 2 * hq, d], 1.0);
            let pg = on(&proj);
            let (og, _) = ra::attention_prefill_gated(&pg.narrow(1, 0, hq).unwrap(), &on(&k), &on(&v), &pg.narrow(1, hq, hq).unwrap(), &p, &[t], &[t]).unwrap();
            let (oc, _) = ra::attention_prefill_gated(&proj.narrow(1, 0, hq).unwrap(), &k, &v, &proj.narrow(1, hq, hq).unwrap(), &p, &[t], &[t]).unwrap();
            assert!(max_diff(&back(&og), &oc) <= tol, "{dt:?} gate sharing Q's storage");
            // Decode and the chunked prefill over paged caches filled alike on both devices.
            let (mut r1, mut r2) = (StdRng::seed_from_u64(74), StdRng::seed_from_u64(74));
            let (kc, vc, table, lens) = cache(&mut r1, hkv, d, dt, &cpu);
            let (kg, vg, tg, lg) = cache(&mut r2, hkv, d, dt, &gpu);
            let mut runs = vec![(4usize, None)];
            if dt != DType::F32 {
                runs.push((5, Some([3usize, 2]))); // the paged prefill is 16-bit only
            }
            for (rows, seqlens) in runs {
                let qc = draw(&mut r, &[rows, hq, d], 1.0);
                let g = draw(&mut r, &[rows, hq, 2 * d], 4.0);
                let (gc, gg) = (g.narrow(2, d, d).unwrap(), on(&g).narrow(2, d, d).unwrap());
                let ((oc, _), (og, _)) = match seqlens {
                    None => (
                        ra::attention_decode_gated(&qc, &kc, &vc, &table, &lens, &gc, 8, &p).unwrap(),
                        ra::attention_decode_gated(&on(&qc), &kg, &vg, &tg, &lg, &gg, 8, &p).unwrap(),
                    ),
                    Some(sq) => (
                        ra::attention_prefill_paged_gated(&qc, &kc, &vc, &table, &lens, &gc, &sq, Some(11), &p).unwrap(),
                        ra::attention_prefill_paged_gated(&on(&qc), &kg, &vg, &tg, &lg, &gg, &sq, Some(11), &p).unwrap(),
                    ),
                };
                assert!(max_diff(&back(&og), &oc) <= tol, "{dt:?} paged {seqlens:?}");
            }
        }
    }
}
