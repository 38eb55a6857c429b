//! The rope and fused score kernels, run by the SIMT emulator (the real kernel source on the CPU)
//! against the f64 reference: the sweeps of tests/gpu_rope.rs and tests/gpu_scores.rs.
//! rope: every dtype, head dim, layout, rope type and partial rotary, packed-QKV strides, both
//! vector widths, positions near 2^24 and up to 2^31. scores: every dtype and head dim, rope
//! type, ReRoPE / Leaky ReRoPE, ALiBi with a head offset, masks, GQA, decode offset, sizes that
//! are multiples of no tile. Tolerances: Tolerance::rope and Tolerance::scores, per dtype.
#![cfg(feature = "emulator")]

mod common;

use common::*;
use half::{bf16, f16};
use rand::Rng;
use rope_attn::cuda::{max_abs, CheckReport, Dtype, RopeShape, ScoresShape, Tolerance};
use rope_attn::emulator::{Emulator, GuardedBuf};
use rope_attn::{reference, Alibi, AttentionParams, Mask, Relative};

fn rope_sweep<T: Dtype>(seed: u64) -> usize {
    let emu = Emulator::with_seed(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in &[64usize, 80, 96, 128, 256] {
        for &frac in &[1.0, 0.5, 0.25] {
            let rot_dim = ((d as f64 * frac) as usize) & !1;
            for (name, rot) in schedules(d, rot_dim) {
                // Packed QKV (Q and K of a token side by side, V after them) and an odd stride
                // that forces the one-pair-per-thread kernel.
                for &(tokens, qh, kh, layout) in &[(1usize, 4usize, 1usize, 0), (7, 8, 2, 1), (5, 2, 2, 2)] {
                    let (row, krow) = match layout {
                        0 => (qh * d, kh * d),
                        1 => ((qh + 2 * kh) * d, (qh + 2 * kh) * d),
                        _ => (qh * d + 2, kh * d + 2),
                    };
                    let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                    let positions: Vec<i32> = (0..tokens)
                        .map(|t| match t % 4 {
                            0 => t as i32,
                            1 => (1 << 24) - 3 + t as i32,
                            2 => (1 << 24) + 12345,
                            _ => r.random_range(0..2_000_000_000),
                        })
                        .collect();
                    // Guarded: an access past any end stops the test (the emulator's memcheck).
                    let mut q = guard(&as_dtype::<T>(&uniform(&mut r, tokens * row)).0);
                    let mut k = guard(&as_dtype::<T>(&uniform(&mut r, tokens * krow)).0);
                    let positions = guard(&positions);
                    let rep = emu
                        .rope_inplace_checked(&mut q, &mut k, &positions, &shape, &rot)
                        .unwrap_or_else(|e| panic!("{} d={d} r={rot_dim} {name} tokens={tokens} layout {layout}: {e}", T::NAME));
                    assert!(rep.count > 0);
                    cases += 1;
                }
            }
        }
    }
    cases
}

#[test]
fn emulated_rope_matches_reference_all_dtypes() {
    let n = rope_sweep::<f32>(1) + rope_sweep::<f16>(2) + rope_sweep::<bf16>(3);
    assert_eq!(n, 3 * 5 * 3 * 8 * 3);
}

/// SPEC "Precision": unit-scale f32 inputs rotated at 2^24 and up to 2^31 - 1 stay within 1e-5
/// absolute of the f64 reference — through the kernel's own angle reduction.
#[test]
fn emulated_rope_f32_is_exact_at_large_positions() {
    let d = 128;
    let rot = schedules(d, d).remove(0).1;
    let positions: Vec<i32> = vec![1 << 24, (1 << 24) + 1, (1 << 24) - 1, 100_000_000, i32::MAX, 0, 1, 4095, 4096];
    let tokens = positions.len();
    let x: Vec<f32> = uniform(&mut rng(9), tokens * d).iter().map(|&v| v as f32).collect();
    let (mut q, mut k) = (x.clone(), x);
    let shape = RopeShape::contiguous(tokens, 1, 1, d);
    let rep = Emulator::new().rope_inplace_checked(&mut q, &mut k, &positions, &shape, &rot).unwrap();
    assert!(rep.max_abs <= 1e-5, "max abs error {} at positions up to 2^31", rep.max_abs);
}

/// rope_into writes dense outputs, carries the pass-through components and leaves inputs alone.
#[test]
fn emulated_rope_into_matches_reference() {
    let (tokens, qh, kh, d) = (5, 4, 2, 96);
    let rot = schedules(d, 48).remove(5).1; // yarn, partial rotary
    let mut r = rng(4);
    let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, tokens * qh * d));
    let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, tokens * kh * d));
    let positions: Vec<i32> = vec![0, 3, 1000, 70000, 1 << 24];
    let (mut qo, mut ko) = (GuardedBuf::filled(q.len(), bf16::ZERO), GuardedBuf::filled(k.len(), bf16::ZERO));
    let shape = RopeShape::contiguous(tokens, qh, kh, d);
    let (q0, k0) = (q.clone(), k.clone());
    Emulator::new().rope_into(&guard(&q), &guard(&k), &mut qo, &mut ko, &guard(&positions), &shape, &rot).unwrap();
    let p64: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    for (input, out, heads) in [(qf, &qo[..], qh), (kf, &ko[..], kh)] {
        let mut want = input;
        reference::rotate(&mut want, tokens, heads, d, heads * d, &p64, &rot).unwrap();
        let got: Vec<f64> = out.iter().map(|v| v.to_f64()).collect();
        let rep = CheckReport::compare("rope_into", &got, &want, Tolerance::rope::<bf16>(max_abs(&want)));
        assert!(rep.passed(), "{rep:?}");
    }
    assert_eq!((q, k), (q0, k0), "rope_into must not touch its inputs");
}

fn scores_sweep<T: Dtype>(seed: u64) -> usize {
    let emu = Emulator::with_seed(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    let relatives = [Relative::None, Relative::ReRope { window: 7 }, Relative::Leaky { window: 5, k: 3.0 }];
    for (ci, &d) in [64usize, 80, 96, 128, 256].iter().enumerate() {
        for (si, (name, rot)) in schedules(d, d).into_iter().enumerate() {
            // Rotate through the option space rather than taking its full product.
            let case = ci * 8 + si;
            let (hq, hkv) = [(2usize, 2usize), (4, 1), (8, 2)][case % 3];
            let (nq, nk, off) = [(1usize, 1usize, 0usize), (13, 70, 57), (65, 33, 0), (70, 71, 1)][case % 4];
            let mut p = AttentionParams::new(hq, hkv, d);
            p.rope = Some(rot);
            p.relative = relatives[case % 3];
            p.mask = match case % 4 {
                0 => Mask { causal: true, window: None, sinks: 0 },
                1 => Mask { causal: true, window: Some(9), sinks: 2 },
                2 => Mask { causal: false, window: None, sinks: 0 },
                _ => Mask { causal: false, window: Some(20), sinks: 0 },
            };
            if case % 2 == 1 {
                p.alibi = Some(Alibi { total_heads: 4 * hq, head_offset: hq });
            }
            let shape = ScoresShape::contiguous(&p, nq, nk, off);
            let q = guard(&as_dtype::<T>(&uniform(&mut r, nq * hq * d)).0);
            let k = guard(&as_dtype::<T>(&uniform(&mut r, nk * hkv * d)).0);
            let mut out = GuardedBuf::filled(hq * nq * nk, 0f32);
            emu.scores_checked(&q, &k, &mut out, &shape, &p)
                .unwrap_or_else(|e| panic!("{} d={d} {name} case {case} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
            cases += 1;
        }
    }
    cases
}

#[test]
fn emulated_scores_match_reference_all_dtypes() {
    let n = scores_sweep::<f32>(11) + scores_sweep::<f16>(12) + scores_sweep::<bf16>(13);
    assert_eq!(n, 3 * 5 * 8);
}
