//! The query temperature (`AttentionParams::query_temperature`: Llama 4's
//! `attn_temperature_tuning`, Ministral 3's `llama_4_scaling_beta`, whose floor has no `+ 1`)
//! through the emulated kernels: prefill at explicit positions (below zero, across floors inside
//! tiles; NoPE as on Llama 4's layers, RoPE, ReRoPE's far copy), decode whose sixteen queries
//! cross a floor (both decode kernels, every head dim class), the scores kernel at positions near
//! 2^31 (the floor's unsigned arithmetic), and a check that leaving the factor out fails.
#![cfg(feature = "emulator")]

mod common;

use common::explicit::prefill_at_explicit_positions;
use common::paged::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{max_abs, AttentionBatch, CheckReport, Dtype, ScoresShape, Tolerance};
use rope_attn::emulator::{Emulator, FwdInputs, GuardedBuf};
use rope_attn::{reference, AttentionParams, Error, Mask, QueryTemperature, Relative};

fn temp(floor_scale: usize, attn_scale: f64) -> Option<QueryTemperature> {
    Some(QueryTemperature::llama4(floor_scale, attn_scale))
}

/// Ministral 3's form: `1 + beta·ln(1 + ⌊i / floor_scale⌋)`.
fn mtemp(floor_scale: usize, beta: f64) -> Option<QueryTemperature> {
    Some(QueryTemperature::ministral3(beta, floor_scale))
}

/// transformers' formula, `log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`, at Llama 4's
/// values; 1 before the first step and at negative positions.
#[test]
fn the_factor_is_transformers_formula() {
    let t = QueryTemperature::llama4(8192, 0.1);
    assert_eq!(t.factor(0), 1.0);
    assert_eq!(t.factor(8190), 1.0);
    assert_eq!(t.factor(8191), 1.0 + 0.1 * 2f64.ln());
    assert_eq!(t.factor(3 * 8192 - 1), 1.0 + 0.1 * 4f64.ln());
    assert_eq!(t.factor(-1), 1.0);
    assert_eq!(t.factor(-100_000), 1.0);
    assert_eq!(t.factor(i32::MAX as i64), 1.0 + 0.1 * (1.0 + (2f64.powi(31) / 8192.0).floor()).ln());
    let mut p = AttentionParams::new(4, 2, 64);
    assert_eq!(p.query_scale_bound(1 << 20), 1.0);
    p.query_temperature = Some(t);
    assert_eq!(p.query_scale_bound(8191), t.factor(8191));
    // Ministral 3: get_llama_4_attn_scale(position_ids, beta, original_max_position_embeddings).
    let m = QueryTemperature::ministral3(0.1, 16384);
    assert_eq!((m.factor(0), m.factor(16383), m.factor(-5)), (1.0, 1.0, 1.0));
    assert_eq!(m.factor(16384), 1.0 + 0.1 * 2f64.ln());
    assert_eq!(m.factor(3 * 16384 - 1), 1.0 + 0.1 * 3f64.ln());
}

#[test]
fn bad_temperatures_are_typed_errors() {
    let mut p = AttentionParams::new(4, 2, 64);
    for (t, name) in [(temp(0, 0.1), "floor_scale"), (temp(1 << 40, 0.1), "floor_scale"), (temp(8, f64::NAN), "attn_scale"), (temp(8, f64::INFINITY), "attn_scale"), (temp(8, 1e300), "attn_scale"), (Some(QueryTemperature { floor_scale: 8, attn_scale: 0.1, offset: 2 }), "query temperature offset")] {
        p.query_temperature = t;
        assert!(matches!(p.validate(), Err(Error::Parameter { name: n, .. }) if n == name), "{t:?}: {:?}", p.validate());
    }
}

#[test]
fn emulated_prefill_with_query_temperature_at_explicit_positions() {
    let emu = emulator(60);
    let mut n = 0;
    // (head_dim, rope, relative, mask, temperature): NoPE full attention as on Llama 4's
    // temperature layers; RoPE with chunks; ReRoPE (its far query copy is scaled too); head dim
    // 96, whose Q tile takes the per-pair loader rather than the async copy.
    let causal = Mask { causal: true, window: None, sinks: 0, chunk: None };
    let cases = [
        (64, false, Relative::None, causal, temp(16, 0.5)),
        (64, true, Relative::None, Mask { chunk: Some(48), ..causal }, temp(7, 0.4)),
        (64, true, Relative::ReRope { window: 12 }, Mask { causal: false, ..causal }, temp(1, 0.2)),
        (96, true, Relative::Leaky { window: 8, k: 4.0 }, Mask { window: Some(30), sinks: 2, ..causal }, temp(16, 0.5)),
        (96, false, Relative::None, causal, temp(5, -0.1)),
        // The first sequence's one query tile ends at position 24, the only row past the first
        // step (floor 25): the tile must not skip the pass.
        (64, false, Relative::None, causal, temp(25, 0.5)),
        // Ministral 3's form: with RoPE and a window, and the same edge (floor 24, no + 1).
        (128, true, Relative::None, Mask { window: Some(40), ..causal }, mtemp(7, 0.4)),
        (64, false, Relative::None, causal, mtemp(24, 0.5)),
    ];
    for (i, &(d, rope, relative, mask, t)) in cases.iter().enumerate() {
        let mut p = AttentionParams::new(4, 2, d);
        p.rope = rope.then(|| schedules(d, d).remove(i % 3).1);
        (p.relative, p.mask, p.query_temperature) = (relative, mask, t);
        let rel = relative != Relative::None;
        prefill_at_explicit_positions::<f16>(&emu, &p, 60 + i as u64, rel);
        prefill_at_explicit_positions::<bf16>(&emu, &p, 70 + i as u64, true);
        prefill_at_explicit_positions::<f32>(&emu, &p, 80 + i as u64, true);
        n += 3;
    }
    assert_eq!(n, 24);
}

/// Sixteen queries at 1014..=1029 of a 1030-key context cross the floor at 1023 (floor_scale
/// 1024) and, with floor_scale 5, a step every five rows; checked mode, split and not. ReRoPE's
/// window of 200 puts most keys on the far side.
fn decode_crossing<T: Dtype>(emu: &Emulator, d: usize, rope: bool, t: Option<QueryTemperature>, seed: u64) {
    let mut p = AttentionParams::new(8, 2, d);
    p.rope = rope.then(|| schedules(d, d).remove(1).1);
    // With RoPE, ReRoPE on odd seeds: the far query copy takes the factor too.
    if rope && seed % 2 == 1 {
        p.relative = Relative::ReRope { window: 200 };
    }
    p.query_temperature = t;
    decode_16_queries_checked::<T>(emu, &p, &[1030, 40], seed, &format!("rope {rope} {:?} {t:?}", p.relative));
}

#[test]
fn emulated_decode_with_query_temperature_across_a_floor() {
    let emu = emulator(61);
    for (i, t) in [temp(1024, 0.1), temp(5, 0.3), mtemp(1024, 0.1)].into_iter().enumerate() {
        let s = 90 + 10 * i as u64;
        decode_crossing::<bf16>(&emu, 128, false, t, s);
        decode_crossing::<f16>(&emu, 64, true, t, s + 1);
        decode_crossing::<bf16>(&emu, 256, true, t, s + 2);
        decode_crossing::<bf16>(&emu, 128, true, t, s + 3);
        decode_crossing::<f32>(&emu, 128, false, t, s + 4);
        decode_crossing::<f32>(&emu, 256, true, t, s + 5);
    }
}

/// Queries at the top of the position range, the last at 2^31 - 2 (q_offset + nq must fit an
/// i32): the floor's `pos + 1` in
/// unsigned arithmetic (no overflow) and log1pf of numbers up to 2^18 (floor_scale 8192), with
/// floors of 64 and 3 stepping inside the query tiles; all three dtypes.
#[test]
fn emulated_scores_with_query_temperature_near_i32_max() {
    let emu = emulator(62);
    let mut r = rng(62);
    for (i, t) in [temp(8192, 0.1), temp(64, 0.7), temp(3, 0.2), mtemp(64, 0.7)].into_iter().enumerate() {
        let (d, nq, nk) = (64usize, 70usize, 33usize);
        let mut p = AttentionParams::new(4, 2, d);
        p.rope = Some(schedules(d, d).remove(0).1);
        p.mask = Mask { causal: false, window: None, sinks: 0, chunk: None };
        p.query_temperature = t;
        let shape = ScoresShape::contiguous(&p, nq, nk, i32::MAX as usize - nq);
        let run = |r: &mut rand::rngs::StdRng, which: usize| -> CheckReport {
            let (q, k) = (uniform(r, nq * 4 * d), uniform(r, nk * 2 * d));
            let mut out = GuardedBuf::filled(4 * nq * nk, 0f32);
            match which {
                0 => emu.scores_checked(&guard(&as_dtype::<f32>(&q).0), &guard(&as_dtype::<f32>(&k).0), &mut out, &shape, &p),
                1 => emu.scores_checked(&guard(&as_dtype::<f16>(&q).0), &guard(&as_dtype::<f16>(&k).0), &mut out, &shape, &p),
                _ => emu.scores_checked(&guard(&as_dtype::<bf16>(&q).0), &guard(&as_dtype::<bf16>(&k).0), &mut out, &shape, &p),
            }
            .unwrap_or_else(|e| panic!("{t:?} dtype {which}: {e}"))
        };
        for which in 0..3 {
            assert!(run(&mut r, which).count > 0, "case {i}");
        }
    }
}

/// The tolerances see the temperature: the same prefill compared with a reference that leaves
/// the factor out fails (so the sweeps that take it cannot pass with it ignored): nearly every
/// row's LSE, and some outputs (an output averages V over many keys, and bf16's bound is loose).
#[test]
fn leaving_the_temperature_out_fails_the_tolerance() {
    let emu = emulator(63);
    let (hq, hkv, d, n) = (4usize, 2usize, 64usize, 90usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.query_temperature = temp(4, 0.3);
    let mut r = rng(63);
    let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, n * hq * d));
    let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (qg, kg, vg, cu) = (guard(&q), guard(&k), guard(&v), guard(&cu_seqlens(&[n])));
    let batch = AttentionBatch::contiguous(&p, 1, n, n, n);
    let (mut out, mut lse) = (GuardedBuf::filled(n * hq * d, bf16::ZERO), GuardedBuf::filled(hq * n, 0f32));
    let x = FwdInputs { q: &qg, k: &kg, v: &vg, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    emu.attention_fwd_checked(&x, &mut out, &mut lse, &batch, &p, None).unwrap();
    let pos: Vec<i64> = (0..n as i64).collect();
    let without = AttentionParams { query_temperature: None, ..p.clone() };
    let want = reference::attention(&qf, &kf, &vf, &pos, &pos, &without).unwrap();
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf) * p.query_scale_bound(n as i64 - 1), max_abs(&kf), max_abs(&vf));
    let got_o: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let got_l: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    let ro = CheckReport::compare("out", &got_o, &want.out, tol_o);
    let rl = CheckReport::compare("lse", &got_l, &want.lse, tol_l);
    assert!(ro.failures > 0 && rl.failures > 3 * n * hq / 4, "{ro:?} {rl:?}");
}
