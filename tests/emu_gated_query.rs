//! The gated query of Qwen3-Next and Qwen3.5 in the rope kernel (kernels/rope.cu,
//! q_in_hstride): queries read from between their gates, normalised, rotated and written dense,
//! K normalised and rotated in place, the gates untouched. Run by the SIMT emulator against the
//! f64 reference over common::cases::gated_cases (every dtype, head dim, rotation kind, vector
//! width and scope), with the gates poisoned; bit for bit the split-then-`rope_inplace_normed`
//! route; the typed refusals. Tolerance: Tolerance::rope, per dtype, as the normed rope.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{CheckReport, Dtype, GatedRotation, RopeShape};
use rope_attn::emulator::{Emulator, GuardedBuf};
use rope_attn::{Error, NormScope, QkNorm};

/// Guarded inputs of a case rounded to T: the gated Q rows, K, the weights, the positions
/// (one row, or M-RoPE's three), and the dense queries the gated rows hold.
struct GatedInputs<T: Copy> {
    gated: GuardedBuf<T>,
    queries: Vec<T>,
    k: GuardedBuf<T>,
    qw: Option<GuardedBuf<f32>>,
    kw: Option<GuardedBuf<f32>>,
    positions: GuardedBuf<i32>,
    stride: usize,
}

fn inputs<T: Dtype>(r: &mut rand::rngs::StdRng, c: &GatedCase) -> GatedInputs<T> {
    let s = &c.shape;
    let d = s.head_dim;
    let queries = norm_values(r, s.tokens, s.q_heads, d, s.q_heads * d);
    let weights = |r: &mut rand::rngs::StdRng, heads: usize| c.weighted.then(|| guard(&norm_weights(r, c.scope.weight_len(heads, d))));
    let (positions, stride) = match &c.kind {
        GatedKind::Mrope(..) => (mrope_positions(r, s.tokens, s.tokens + 2), s.tokens + 2),
        _ => (rope_positions(r, s.tokens), s.tokens),
    };
    GatedInputs {
        gated: guard(&as_dtype::<T>(&gated_rows(s, &queries)).0),
        queries: as_dtype::<T>(&queries).0,
        k: guard(&as_dtype::<T>(&norm_values(r, s.tokens, s.k_heads, d, s.k_row_stride)).0),
        qw: weights(r, s.q_heads),
        kw: weights(r, s.k_heads),
        positions: guard(&positions),
        stride,
    }
}

fn rotation<'a>(c: &'a GatedCase, x: &'a GatedInputs<impl Copy>) -> GatedRotation<'a, [i32]> {
    match &c.kind {
        GatedKind::None => GatedRotation::None,
        GatedKind::Rope(rot) => GatedRotation::Rope { positions: &x.positions, rot },
        GatedKind::Mrope(rot, mrope) => GatedRotation::Mrope { positions: &x.positions, stride: x.stride, rot, mrope },
    }
}

fn norm_of<'a, T: Copy>(c: &GatedCase, x: &'a GatedInputs<T>) -> QkNorm<&'a [f32]> {
    QkNorm { eps: 1e-6, scope: c.scope, q_weight: x.qw.as_deref(), k_weight: x.kw.as_deref() }
}

fn sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for c in gated_cases() {
        let x = inputs::<T>(&mut r, &c);
        let mut q_out = guard(&vec![T::from_f64(0.0); c.shape.tokens * c.shape.q_heads * c.shape.head_dim]);
        let mut k = guard(&x.k);
        let rep: CheckReport = emu
            .qk_norm_rope_gated_checked(&x.gated, &mut q_out, &mut k, &c.shape, rotation(&c, &x), &norm_of(&c, &x))
            .unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

/// Every case, every dtype, through checked mode: Q and K against the reference, and every
/// element of the gated rows (gates and slack, poisoned with ±3e4) unchanged.
#[test]
fn emulated_gated_query_matches_reference_all_dtypes() {
    let n = sweep::<f32>(41) + sweep::<f16>(42) + sweep::<bf16>(43);
    assert_eq!(n, 3 * 75);
}

/// The gated call equals taking the queries out first and normalising and rotating them in
/// place, bit for bit (the same arithmetic, only the addressing differs): Q and K, for each
/// rotation kind, in bf16.
#[test]
fn emulated_gated_query_equals_split_then_normed_rope() {
    let emu = emulator(44);
    let mut r = rng(44);
    for c in gated_cases().into_iter().filter(|c| c.shape.tokens == 7) {
        let x = inputs::<bf16>(&mut r, &c);
        let s = &c.shape;
        let norm = norm_of(&c, &x);
        let mut q1 = guard(&vec![bf16::ZERO; x.queries.len()]);
        let mut k1 = guard(&x.k);
        emu.qk_norm_rope_gated(&x.gated, &mut q1, &mut k1, s, rotation(&c, &x), &norm).unwrap();
        let dense = RopeShape { q_row_stride: s.q_heads * s.head_dim, ..*s };
        let (mut q2, mut k2) = (guard(&x.queries), guard(&x.k));
        match &c.kind {
            GatedKind::None => emu.qk_norm_inplace(&mut q2, &mut k2, &dense, &norm).unwrap(),
            GatedKind::Rope(rot) => emu.rope_inplace_normed(&mut q2, &mut k2, &x.positions, &dense, rot, &norm).unwrap(),
            GatedKind::Mrope(rot, m) => emu.rope_inplace_mrope_normed(&mut q2, &mut k2, &x.positions, x.stride, &dense, rot, m, &norm).unwrap(),
        }
        assert!(q1[..] == q2[..], "{}: Q differs", c.label);
        assert!(k1[..] == k2[..], "{}: K differs", c.label);
    }
}

/// Bad gated calls get a typed error before anything runs, and no buffer changes: gated rows
/// narrower than a head's query and gate, an odd gated stride, a gated buffer, Q output, K or
/// positions too short, and a bad norm.
#[test]
fn emulated_gated_query_refuses_bad_calls() {
    let emu = Emulator::new();
    let d = 64;
    let ok = RopeShape { tokens: 3, q_heads: 4, k_heads: 2, head_dim: d, q_row_stride: 8 * d, k_row_stride: 2 * d };
    let rot = schedules(d, d / 4).remove(0).1;
    let w = vec![1.0f32; d];
    let good = QkNorm { eps: 1e-6, scope: NormScope::Head, q_weight: Some(&w[..]), k_weight: Some(&w[..]) };
    let (gated_len, q_len, k_len) = (3 * 8 * d, 3 * 4 * d, 3 * 2 * d);
    type Bad = (RopeShape, [usize; 4], &'static str);
    let bad: Vec<Bad> = vec![
        (RopeShape { q_row_stride: 8 * d - 2, ..ok }, [gated_len, q_len, k_len, 3], "gated q"),  // stride
        (RopeShape { q_row_stride: 8 * d + 1, ..ok }, [gated_len + 8, q_len, k_len, 3], "gated q"),  // odd
        (ok, [gated_len - 1, q_len, k_len, 3], "gated q"),
        (ok, [gated_len, q_len - 1, k_len, 3], "q"),
        (ok, [gated_len, q_len, k_len - 1, 3], "k"),
        (ok, [gated_len, q_len, k_len, 2], "positions"),
    ];
    for (shape, [g, q, k, p], what) in bad {
        let (gated, mut q_out, mut kk, pos) = (vec![1.0f32; g], vec![1.0f32; q], vec![1.0f32; k], vec![0i32; p]);
        let e = emu.qk_norm_rope_gated(&gated, &mut q_out, &mut kk, &shape, GatedRotation::Rope { positions: &pos, rot: &rot }, &good).unwrap_err();
        let named = match &e {
            Error::Stride { what, .. } | Error::BufferTooSmall { what, .. } => *what,
            other => panic!("{what}: unexpected {other:?}"),
        };
        assert_eq!(named, what, "{e}");
        assert!(q_out.iter().chain(&kk).chain(&gated).all(|&v| v == 1.0), "{what}: a refused call wrote");
    }
    let (gated, mut q_out, mut kk) = (vec![1.0f32; gated_len], vec![1.0f32; q_len], vec![1.0f32; k_len]);
    let short_w = QkNorm { q_weight: Some(&w[..d - 1]), ..good };
    let e = emu.qk_norm_rope_gated(&gated, &mut q_out, &mut kk, &ok, GatedRotation::None, &short_w).unwrap_err();
    assert!(matches!(e, Error::Shape { what: "qk_norm q_weight", .. }), "{e}");
    let e = emu.qk_norm_rope_gated(&gated, &mut q_out, &mut kk, &ok, GatedRotation::None, &QkNorm { eps: f64::NAN, ..good }).unwrap_err();
    assert!(matches!(e, Error::Parameter { name: "qk_norm eps", .. }), "{e}");
    assert!(q_out.iter().chain(&kk).all(|&v| v == 1.0), "a refused call wrote");
}
