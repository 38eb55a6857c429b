//! The QK norm in the rope kernel (kernels/rope.cu: norm_sums, norm_rest), run by the SIMT
//! emulator against the f64 reference (`reference::qk_norm_row`, then `rotate_head`): every
//! dtype, head dim (and two only the rope kernel takes), full and partial rotary and the norm
//! alone, all three vector widths, packed-QKV strides, both scopes, with and without weights;
//! 256 heads (the launch limit); Llama 4's order (rotate, then normalise) equal to ours; the
//! typed refusals. Tolerance: Tolerance::rope ((eps_T + 1e-5)·max|x|), per dtype.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{max_abs, CheckReport, Dtype, RopeShape, Tolerance};
use rope_attn::emulator::{Emulator, GuardedBuf};
use rope_attn::qk_norm::MAX_NORM_HEADS;
use rope_attn::{reference, Error, NormScope, QkNorm};

/// Guarded Q, K and weights of a case, rounded to T, and the positions.
struct NormInputs<T: Copy> {
    q: GuardedBuf<T>,
    k: GuardedBuf<T>,
    qw: Option<GuardedBuf<f32>>,
    kw: Option<GuardedBuf<f32>>,
    positions: GuardedBuf<i32>,
}

fn inputs<T: Dtype>(r: &mut rand::rngs::StdRng, c: &NormCase) -> NormInputs<T> {
    let s = &c.shape;
    let weights = |r: &mut rand::rngs::StdRng, heads: usize| c.weighted.then(|| guard(&norm_weights(r, c.scope.weight_len(heads, s.head_dim))));
    NormInputs {
        q: guard(&as_dtype::<T>(&norm_values(r, s.tokens, s.q_heads, s.head_dim, s.q_row_stride)).0),
        k: guard(&as_dtype::<T>(&norm_values(r, s.tokens, s.k_heads, s.head_dim, s.k_row_stride)).0),
        qw: weights(r, s.q_heads),
        kw: weights(r, s.k_heads),
        positions: guard(&rope_positions(r, s.tokens)),
    }
}

/// The case on its guarded inputs (the weights guarded too: a read past them faults).
fn run<T: Dtype>(emu: &Emulator, c: &NormCase, x: &mut NormInputs<T>) -> rope_attn::Result<CheckReport> {
    let norm = QkNorm { eps: c.eps, scope: c.scope, q_weight: x.qw.as_deref(), k_weight: x.kw.as_deref() };
    match &c.rot {
        Some(rot) => emu.rope_inplace_normed_checked(&mut x.q, &mut x.k, &x.positions, &c.shape, rot, &norm),
        None => emu.qk_norm_inplace_checked(&mut x.q, &mut x.k, &c.shape, &norm),
    }
}

fn sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for c in qk_norm_cases() {
        let mut x = inputs::<T>(&mut r, &c);
        let rep = run(&emu, &c, &mut x).unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

#[test]
fn emulated_qk_norm_matches_reference_all_dtypes() {
    let n = sweep::<f32>(31) + sweep::<f16>(32) + sweep::<bf16>(33);
    assert_eq!(n, 3 * (5 * 7 + 3) * 3);
}

/// The launch limit, 256 heads (192 query, 64 key: each warp of the block sums 64 heads),
/// both scopes, weighted, rotated and not.
#[test]
fn emulated_qk_norm_takes_256_heads() {
    let emu = emulator(5);
    let mut r = rng(5);
    let d = 64;
    let shape = RopeShape::contiguous(3, 192, 64, d);
    assert_eq!(shape.q_heads + shape.k_heads, MAX_NORM_HEADS);
    let rot = schedules(d, d).remove(0).1;
    for (i, scope) in [NormScope::Head, NormScope::Heads, NormScope::HeadCentred].into_iter().enumerate() {
        let c = NormCase { label: format!("{scope:?}"), shape, rot: (i == 0).then(|| rot.clone()), scope, weighted: true, eps: 1e-6 };
        let mut x = inputs::<bf16>(&mut r, &c);
        run(&emu, &c, &mut x).unwrap_or_else(|e| panic!("{scope:?}: {e}"));
    }
}

/// Llama 4 rotates first and normalises after (no weight); ours normalises as it rotates.
/// Equal, since a rotation keeps each pair's length (full rotary, attention factor 1, as
/// Llama 4 has): in f32 within 1e-6·max|x|.
#[test]
fn emulated_normed_rope_equals_llama4_rotate_then_normalise() {
    let emu = emulator(6);
    let mut r = rng(6);
    let d = 128;
    let shape = RopeShape::contiguous(9, 4, 2, d);
    let positions = rope_positions(&mut r, shape.tokens);
    let q0: Vec<f32> = norm_values(&mut r, shape.tokens, 4, d, 4 * d).iter().map(|&v| v as f32).collect();
    let k0: Vec<f32> = norm_values(&mut r, shape.tokens, 2, d, 2 * d).iter().map(|&v| v as f32).collect();
    let norm = QkNorm::<&[f32]>::unweighted(1e-5, NormScope::Head);
    for (_, rot) in schedules(d, d).into_iter().filter(|(n, _)| ["default-interleaved", "llama3"].contains(n)) {
        let (mut q1, mut k1) = (q0.clone(), k0.clone());
        emu.rope_inplace(&mut q1, &mut k1, &positions, &shape, &rot).unwrap();
        emu.qk_norm_inplace(&mut q1, &mut k1, &shape, &norm).unwrap();
        let (mut q2, mut k2) = (q0.clone(), k0.clone());
        emu.rope_inplace_normed(&mut q2, &mut k2, &positions, &shape, &rot, &norm).unwrap();
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        for (a, b) in [(&q1, &q2), (&k1, &k2)] {
            let (a, b) = (widen(a), widen(b));
            let rep = CheckReport::compare("llama4 order", &b, &a, Tolerance { abs: 1e-6 * max_abs(&a), rel: 0.0 });
            assert!(rep.passed(), "{rep:?}");
        }
    }
}

/// The comparison can fail: the kernel run with a norm over all heads, or with Q's and K's
/// weights swapped, is not the per-head norm the reference computes.
#[test]
fn emulated_qk_norm_check_catches_the_wrong_norm() {
    let emu = Emulator::new();
    let mut r = rng(7);
    let (d, shape) = (64, RopeShape::contiguous(4, 4, 4, 64));
    let q0 = as_dtype::<f32>(&norm_values(&mut r, 4, 4, d, 4 * d)).0;
    let k0 = as_dtype::<f32>(&norm_values(&mut r, 4, 4, d, 4 * d)).0;
    let (qw, kw) = (norm_weights(&mut r, d), norm_weights(&mut r, d));
    let right = QkNorm { eps: 1e-6, scope: NormScope::Head, q_weight: Some(&qw[..]), k_weight: Some(&kw[..]) };
    let mut want: Vec<f64> = q0.iter().map(|&v| v as f64).collect();
    for row in want.chunks_mut(4 * d) {
        reference::qk_norm_row(row, d, right.eps, right.scope, right.q_weight).unwrap();
    }
    let tol = Tolerance::rope::<f32>(max_abs(&want));
    let wrong = [QkNorm { scope: NormScope::Heads, q_weight: None, k_weight: None, ..right }, QkNorm { q_weight: Some(&kw[..]), k_weight: Some(&qw[..]), ..right }];
    for (i, norm) in [right].into_iter().chain(wrong).enumerate() {
        let (mut q, mut k) = (q0.clone(), k0.clone());
        emu.qk_norm_inplace(&mut q, &mut k, &shape, &norm).unwrap();
        let got: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        assert_eq!(CheckReport::compare("q", &got, &want, tol).passed(), i == 0, "norm {i}");
    }
}

/// Cohere's LayerNorm (HeadCentred): each head centred on its mean, with its own weights. The
/// check fails for the RMS norm of the same weights and for another head's weights; on inputs
/// off centre (mean 40 against a spread of 1, where E[x²] - mean² would lose a factor 1600 of
/// f32's precision) the kernel still matches the f64 reference within the f32 tolerance.
#[test]
fn emulated_centred_norm_is_a_layer_norm_per_head() {
    let emu = Emulator::new();
    let mut r = rng(9);
    let (d, heads) = (128, 4);
    let shape = RopeShape::contiguous(6, heads, heads, d);
    let mut q0 = as_dtype::<f32>(&norm_values(&mut r, 6, heads, d, heads * d)).0;
    // Tokens 4 and 5: off centre.
    for row in q0.chunks_mut(heads * d).skip(4) {
        row.iter_mut().for_each(|v| *v = rand::Rng::random_range(&mut r, -1.0f32..1.0) + 40.0);
    }
    let k0 = as_dtype::<f32>(&norm_values(&mut r, 6, heads, d, heads * d)).0;
    let (qw, kw) = (norm_weights(&mut r, heads * d), norm_weights(&mut r, heads * d));
    let right = QkNorm { eps: 1e-5, scope: NormScope::HeadCentred, q_weight: Some(&qw[..]), k_weight: Some(&kw[..]) };
    let mut want: Vec<f64> = q0.iter().map(|&v| v as f64).collect();
    for row in want.chunks_mut(heads * d) {
        reference::qk_norm_row(row, d, right.eps, right.scope, right.q_weight).unwrap();
    }
    let tol = Tolerance::rope::<f32>(max_abs(&want));
    // Head 0's weights for every head (a shift of the weight slice), and the plain RMS norm.
    let shifted: Vec<f32> = qw[d..].iter().chain(&qw[..d]).copied().collect();
    let wrong = [QkNorm { scope: NormScope::Heads, ..right }, QkNorm { q_weight: Some(&shifted[..]), ..right }];
    for (i, norm) in [right].into_iter().chain(wrong).enumerate() {
        let (mut q, mut k) = (q0.clone(), k0.clone());
        emu.qk_norm_inplace(&mut q, &mut k, &shape, &norm).unwrap();
        let got: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        let rep = CheckReport::compare("q", &got, &want, tol);
        assert_eq!(rep.passed(), i == 0, "norm {i}: {rep:?}");
    }
    // And through the rotation, every dtype's checked mode (interleaved, as Cohere pairs).
    let rot = schedules(d, d).remove(1).1;
    let positions = guard(&rope_positions(&mut r, 6));
    let (mut q, mut k) = (guard(&as_dtype::<bf16>(&q0.iter().map(|&v| v as f64).collect::<Vec<_>>()).0), guard(&as_dtype::<bf16>(&k0.iter().map(|&v| v as f64).collect::<Vec<_>>()).0));
    emu.rope_inplace_normed_checked(&mut q, &mut k, &positions, &shape, &rot, &right).unwrap();
}

/// Bad norms are refused with a typed error before anything runs, and the buffers stay as
/// they were.
#[test]
fn emulated_qk_norm_refuses_bad_calls() {
    let emu = Emulator::new();
    let d = 64;
    let shape = RopeShape::contiguous(2, 4, 2, d);
    let (q0, k0) = (vec![1.0f32; 2 * 4 * d], vec![1.0f32; 2 * 2 * d]);
    let (w_head, w_all) = (vec![1.0f32; d], vec![1.0f32; 4 * d]);
    let rot = schedules(d, d).remove(0).1;
    let ok = QkNorm { eps: 1e-6, scope: NormScope::Head, q_weight: Some(&w_head[..]), k_weight: None };
    let bad: Vec<(QkNorm<&[f32]>, RopeShape, &str)> = vec![
        (QkNorm { eps: f64::NAN, ..ok }, shape, "qk_norm eps"),
        (QkNorm { eps: 0.0, ..ok }, shape, "qk_norm eps"),
        (QkNorm { eps: -1e-6, ..ok }, shape, "qk_norm eps"),
        (QkNorm { eps: 1e-50, ..ok }, shape, "qk_norm eps"),  // 0 in f32
        (QkNorm { eps: f64::INFINITY, ..ok }, shape, "qk_norm eps"),
        (QkNorm { q_weight: Some(&w_all[..]), ..ok }, shape, "qk_norm q_weight"),  // heads' weights, per-head scope
        (QkNorm { scope: NormScope::Heads, ..ok }, shape, "qk_norm q_weight"),  // one head's weights, all-heads scope
        (QkNorm { k_weight: Some(&w_all[..]), ..ok }, shape, "qk_norm k_weight"),
        (ok, RopeShape::contiguous(1, 200, 57, d), "qk_norm heads"),
    ];
    for (norm, shape, what) in bad {
        let (mut q, mut k) = (vec![1.0f32; shape.tokens * shape.q_heads * d], vec![1.0f32; shape.tokens * shape.k_heads * d]);
        let e1 = emu.qk_norm_inplace(&mut q, &mut k, &shape, &norm).unwrap_err();
        let e2 = emu.rope_inplace_normed(&mut q, &mut k, &vec![0; shape.tokens], &shape, &rot, &norm).unwrap_err();
        for e in [e1, e2] {
            let named = match &e {
                Error::Parameter { name, .. } => *name,
                Error::Shape { what, .. } => *what,
                other => panic!("{what}: unexpected {other:?}"),
            };
            assert_eq!(named, what, "{e}");
        }
        assert!(q.iter().chain(&k).all(|&v| v == 1.0), "{what}: a refused call wrote");
    }
    // The same shape's own checks still apply: a short K buffer.
    let (mut q, mut k) = (q0.clone(), k0[..k0.len() - 1].to_vec());
    assert!(matches!(emu.qk_norm_inplace(&mut q, &mut k, &shape, &ok), Err(Error::BufferTooSmall { what: "k", .. })));
}

/// M-RoPE after the norm (Qwen3-VL) over common::cases::mrope_sweep_cases, guarded, in bf16:
/// per head and weighted, every third case over all heads; and for text tokens (three equal
/// positions) bit for bit the normed plain RoPE.
#[test]
fn emulated_mrope_after_qk_norm_matches_reference() {
    let emu = emulator(8);
    let mut r = rng(8);
    let mut cases = 0;
    for (i, c) in mrope_sweep_cases().into_iter().enumerate() {
        let s = &c.shape;
        let (tokens, stride) = (s.tokens, s.tokens + 3);
        let scope = if i % 3 == 2 { NormScope::Heads } else { NormScope::Head };
        let (qw, kw) = (guard(&norm_weights(&mut r, scope.weight_len(s.q_heads, s.head_dim))), guard(&norm_weights(&mut r, scope.weight_len(s.k_heads, s.head_dim))));
        let norm = QkNorm { eps: 1e-6, scope, q_weight: Some(&qw[..]), k_weight: Some(&kw[..]) };
        let q0 = as_dtype::<bf16>(&norm_values(&mut r, tokens, s.q_heads, s.head_dim, s.q_row_stride)).0;
        let k0 = as_dtype::<bf16>(&norm_values(&mut r, tokens, s.k_heads, s.head_dim, s.k_row_stride)).0;
        let positions = mrope_positions(&mut r, tokens, stride);
        let (mut q, mut k) = (guard(&q0), guard(&k0));
        emu.rope_inplace_mrope_normed_checked(&mut q, &mut k, &guard(&positions), stride, s, &c.rot, &c.m, &norm)
            .unwrap_or_else(|e| panic!("{} {scope:?}: {e}", c.label));
        // Text tokens: the three rows equal.
        let text = rope_positions(&mut r, tokens);
        let rows: Vec<i32> = [&text[..], &text[..], &text[..]].concat();
        let (mut q1, mut k1) = (guard(&q0), guard(&k0));
        let (mut q2, mut k2) = (guard(&q0), guard(&k0));
        emu.rope_inplace_normed(&mut q1, &mut k1, &guard(&text), s, &c.rot, &norm).unwrap();
        emu.rope_inplace_mrope_normed(&mut q2, &mut k2, &guard(&rows), tokens, s, &c.rot, &c.m, &norm).unwrap();
        assert!(q1[..] == q2[..] && k1[..] == k2[..], "{}", c.label);
        cases += 1;
    }
    assert_eq!(cases, 5 * 2 * 3 * 3 * 2);
}

/// Gemma 3n's and Gemma 4's V norm on a dense V (a prefill that reads V from its own tensor,
/// not the cache): the QK norm with no Q (`q_heads: 0`) and V in K's place, unweighted per
/// head, and the fused append's norm (`paged_append_v_normed`) both match the reference within
/// one rounding of bf16 (and f32's rsqrt), and each other within one bf16 step (their sums of
/// squares may add in different orders).
#[test]
fn emulated_v_norm_of_a_dense_v_matches_the_fused_append() {
    let emu = emulator(0);
    let (tokens, hkv, d, eps) = (6usize, 2usize, 128usize, 1e-6);
    let mut r = rng(4040);
    let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, tokens * hkv * d).iter().map(|x| 4.0 * x).collect::<Vec<f64>>());
    let shape = RopeShape { q_heads: 0, q_row_stride: 0, ..RopeShape::contiguous(tokens, 0, hkv, d) };
    let mut dense = GuardedBuf::filled(v.len(), bf16::ZERO);
    dense.copy_from_slice(&v);
    let mut no_q: [bf16; 0] = [];
    emu.qk_norm_inplace(&mut no_q, &mut dense, &shape, &QkNorm::unweighted(eps, NormScope::Head)).unwrap();
    let cache = rope_attn::cuda::PagedKvCache { num_pages: 2, page_size: 4, kv_heads: hkv, head_dim: d };
    let (mut kc, mut vc) = (vec![bf16::ZERO; cache.len()], vec![bf16::ZERO; cache.len()]);
    let slots: Vec<i32> = (0..tokens as i32).collect();
    emu.paged_append_v_normed(&v, &v, &mut kc, &mut vc, &slots, tokens, hkv * d, hkv * d, &cache, eps).unwrap();
    let mut want = vf.clone();
    reference::qk_norm_row(&mut want, d, eps, NormScope::Head, None).unwrap();
    for (what, got) in [("qk_norm_inplace", &dense[..]), ("paged_append_v_normed", &vc[..v.len()])] {
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g.to_f64() - w).abs() <= (bf16::EPS + 1e-6) * w.abs() + 1e-7, "{what}: element {c}: {} vs {w}", g.to_f64());
        }
    }
    for (a, b) in dense.iter().zip(&vc[..v.len()]) {
        assert!((a.to_f64() - b.to_f64()).abs() <= 2.0 * bf16::EPS * a.to_f64().abs(), "the two V norms: {a} vs {b}");
    }
}
