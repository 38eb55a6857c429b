//! The rope and fused score kernels, run by the SIMT emulator (the real kernel source on the CPU)
//! against the f64 reference: the sweeps of tests/gpu_rope.rs and tests/gpu_scores.rs.
//! rope: every dtype, head dim, layout, rope type and partial rotary, packed-QKV strides, both
//! vector widths, positions near 2^24 and up to 2^31. scores: every dtype and head dim, rope
//! type, ReRoPE / Leaky ReRoPE, ALiBi with a head offset, masks, GQA, decode offset, sizes that
//! are multiples of no tile. Tolerances: Tolerance::rope and Tolerance::scores, per dtype.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{max_abs, CheckReport, Dtype, RopeShape, Tolerance};
use rope_attn::emulator::GuardedBuf;
use rope_attn::reference;

fn rope_sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in &HEAD_DIMS {
        for &frac in &[1.0, 0.5, 0.25] {
            let rot_dim = ((d as f64 * frac) as usize) & !1;
            for (name, rot) in schedules(d, rot_dim) {
                for (tokens, qh, kh, row, krow) in rope_layouts(d) {
                    let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                    let positions = guard(&rope_positions(&mut r, tokens));
                    // Guarded: an access past any end stops the test (the emulator's memcheck).
                    let mut q = guard(&as_dtype::<T>(&uniform(&mut r, tokens * row)).0);
                    let mut k = guard(&as_dtype::<T>(&uniform(&mut r, tokens * krow)).0);
                    let rep = emu
                        .rope_inplace_checked(&mut q, &mut k, &positions, &shape, &rot)
                        .unwrap_or_else(|e| panic!("{} d={d} r={rot_dim} {name} tokens={tokens} stride={row}: {e}", T::NAME));
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
    let rep = emulator(0).rope_inplace_checked(&mut q, &mut k, &positions, &shape, &rot).unwrap();
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
    emulator(0).rope_into(&guard(&q), &guard(&k), &mut qo, &mut ko, &guard(&positions), &shape, &rot).unwrap();
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

/// M-RoPE over common::cases::mrope_sweep_cases, positions in rows of a stride longer than
/// the tokens (poison past them).
fn mrope_sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for c in mrope_sweep_cases() {
        let (tokens, stride) = (c.shape.tokens, c.shape.tokens + 3);
        let positions = guard(&mrope_positions(&mut r, tokens, stride));
        let mut q = guard(&as_dtype::<T>(&uniform(&mut r, tokens * c.shape.q_row_stride)).0);
        let mut k = guard(&as_dtype::<T>(&uniform(&mut r, tokens * c.shape.k_row_stride)).0);
        let rep = emu
            .rope_inplace_mrope_checked(&mut q, &mut k, &positions, stride, &c.shape, &c.rot, &c.m)
            .unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

#[test]
fn emulated_mrope_matches_reference_all_dtypes() {
    let n = mrope_sweep::<f32>(21) + mrope_sweep::<f16>(22) + mrope_sweep::<bf16>(23);
    assert_eq!(n, 3 * 5 * 2 * 3 * 3 * 2);
}

/// Text tokens (three equal positions) come out of the M-RoPE kernel bit for bit as plain RoPE
/// at that position, in every vector width; a token whose height differs does not.
#[test]
fn emulated_mrope_of_text_tokens_is_plain_rope() {
    let d = 128;
    let emu = emulator(5);
    let mut r = rng(5);
    for (tokens, qh, kh, row, krow) in rope_layouts(d) {
        for m in mrope_cases(d) {
            let rot = schedules(d, d).remove(0).1;
            let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
            let pos = rope_positions(&mut r, tokens);
            let rows: Vec<i32> = [&pos[..], &pos[..], &pos[..]].concat();
            let q0 = as_dtype::<bf16>(&uniform(&mut r, tokens * row)).0;
            let k0 = as_dtype::<bf16>(&uniform(&mut r, tokens * krow)).0;
            let (mut q1, mut k1) = (guard(&q0), guard(&k0));
            let (mut q2, mut k2) = (guard(&q0), guard(&k0));
            emu.rope_inplace(&mut q1, &mut k1, &guard(&pos), &shape, &rot).unwrap();
            emu.rope_inplace_mrope(&mut q2, &mut k2, &guard(&rows), tokens, &shape, &rot, &m).unwrap();
            assert!(q1[..] == q2[..] && k1[..] == k2[..], "{m:?} tokens={tokens}");
            let mut moved = rows.clone();
            moved[tokens] += 1; // token 0's height
            let (mut q3, mut k3) = (guard(&q0), guard(&k0));
            emu.rope_inplace_mrope(&mut q3, &mut k3, &guard(&moved), tokens, &shape, &rot, &m).unwrap();
            assert!(q3[..row] != q1[..row], "{m:?}: the height row is read");
        }
    }
}

/// Bad M-RoPE calls are refused before any launch, buffers untouched.
#[test]
fn emulated_mrope_refuses_bad_calls() {
    let (d, tokens) = (64, 5);
    let rot = schedules(d, d).remove(0).1;
    let shape = RopeShape::contiguous(tokens, 2, 1, d);
    let [good, _] = mrope_cases(d);
    let q0 = as_dtype::<f16>(&uniform(&mut rng(6), tokens * 2 * d)).0;
    let k0 = as_dtype::<f16>(&uniform(&mut rng(7), tokens * d)).0;
    let rows = vec![1i32; 3 * tokens];
    let bad_sections = rope_attn::MRope { sections: [8, 12, 13], interleaved: false };
    let calls: [(&[i32], usize, rope_attn::MRope, &str); 3] = [
        (&rows[..3 * tokens - 1], tokens, good, "positions"),
        (&rows, tokens - 1, good, "stride"),
        (&rows, tokens, bad_sections, "mrope_section"),
    ];
    for (pos, stride, m, what) in calls {
        let (mut q, mut k) = (q0.clone(), k0.clone());
        let e = emulator(0).rope_inplace_mrope(&mut q, &mut k, pos, stride, &shape, &rot, &m).unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert!(q == q0 && k == k0);
    }
}

fn scores_sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for (case, d, name, rot) in dims_and_schedules(full_or_half) {
        let (p, shape) = scores_case(case, d, rot, Scale::Emulator);
        let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
        let q = guard(&as_dtype::<T>(&uniform(&mut r, shape.nq * hq * d)).0);
        let k = guard(&as_dtype::<T>(&uniform(&mut r, shape.nk * hkv * d)).0);
        let mut out = GuardedBuf::filled(hq * shape.nq * shape.nk, 0f32);
        if !rope_attn::cuda::SCORES_HEAD_DIMS.contains(&d) {
            // Head dim 512: the attention kernels take it, the score-matrix kernel does not.
            let err = emu.scores_checked(&q, &k, &mut out, &shape, &p).unwrap_err();
            assert!(matches!(err, rope_attn::Error::UnsupportedHeadDim { head_dim: 512, .. }), "{err:?}");
            continue;
        }
        emu.scores_checked(&q, &k, &mut out, &shape, &p)
            .unwrap_or_else(|e| panic!("{} d={d} {name} case {case} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
        cases += 1;
    }
    cases
}

#[test]
fn emulated_scores_match_reference_all_dtypes() {
    let n = scores_sweep::<f32>(11) + scores_sweep::<f16>(12) + scores_sweep::<bf16>(13);
    assert_eq!(n, 3 * 5 * 8);
}
