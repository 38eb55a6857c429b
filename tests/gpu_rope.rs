//! The rope kernel against the f64 reference: every dtype, layout, rope type, partial rotary,
//! odd token counts, packed QKV strides and positions near 2^24; the QK norm before it, and the
//! gated query of Qwen3-Next and Qwen3.5.
//! Tolerance (Tolerance::rope): (eps_dtype + 1e-5)·max|x| per element.

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    qk_norm_inplace_checked, qk_norm_rope_gated_checked, GatedRotation, rope_inplace_checked, rope_inplace_mrope_checked, rope_inplace_mrope_normed_checked, rope_inplace_normed_checked, rope_into,
    Dtype, RopeShape, Tolerance,
};
use rope_attn::{reference, QkNorm};

fn sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in &HEAD_DIMS {
        for &frac in &[1.0, 0.5, 0.25] {
            let rot_dim = ((d as f64 * frac) as usize) & !1;
            for (name, rot) in schedules(d, rot_dim) {
                for (tokens, qh, kh, row, krow) in rope_layouts(d) {
                    let shape = RopeShape { tokens, q_heads: qh, k_heads: kh, head_dim: d, q_row_stride: row, k_row_stride: krow };
                    let positions = rope_positions(&mut r, tokens);
                    let (qv, _) = as_dtype::<T>(&uniform(&mut r, tokens * row));
                    let (kv, _) = as_dtype::<T>(&uniform(&mut r, tokens * krow));
                    let mut q = stream.clone_htod(&qv).unwrap();
                    let mut k = stream.clone_htod(&kv).unwrap();
                    let pos = stream.clone_htod(&positions).unwrap();
                    let rep = rope_inplace_checked(gpu, stream, &mut q, &mut k, &pos, &shape, &rot)
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
fn rope_matches_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("rope_matches_reference_all_dtypes") else { return };
    let n = sweep::<f32>(&gpu, &stream, 1) + sweep::<f16>(&gpu, &stream, 2) + sweep::<bf16>(&gpu, &stream, 3);
    assert_eq!(n, 3 * 5 * 3 * 8 * 3);
}

/// M-RoPE over common::cases::mrope_sweep_cases (tests/emu_rope_scores.rs runs the same sweep
/// in the emulator).
fn mrope_sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for c in mrope_sweep_cases() {
        let (tokens, stride) = (c.shape.tokens, c.shape.tokens + 3);
        let pos = stream.clone_htod(&mrope_positions(&mut r, tokens, stride)).unwrap();
        let mut q = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, tokens * c.shape.q_row_stride)).0).unwrap();
        let mut k = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, tokens * c.shape.k_row_stride)).0).unwrap();
        let rep = rope_inplace_mrope_checked(gpu, stream, &mut q, &mut k, &pos, stride, &c.shape, &c.rot, &c.m)
            .unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

#[test]
fn mrope_matches_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("mrope_matches_reference_all_dtypes") else { return };
    let n = mrope_sweep::<f32>(&gpu, &stream, 21) + mrope_sweep::<f16>(&gpu, &stream, 22) + mrope_sweep::<bf16>(&gpu, &stream, 23);
    assert_eq!(n, 3 * 5 * 2 * 3 * 3 * 2);
}

/// The QK norm (before the rotation, or alone) over common::cases::qk_norm_cases
/// (tests/emu_qk_norm.rs runs the same sweep in the emulator).
fn qk_norm_sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for c in qk_norm_cases() {
        let s = &c.shape;
        let mut q = stream.clone_htod(&as_dtype::<T>(&norm_values(&mut r, s.tokens, s.q_heads, s.head_dim, s.q_row_stride)).0).unwrap();
        let mut k = stream.clone_htod(&as_dtype::<T>(&norm_values(&mut r, s.tokens, s.k_heads, s.head_dim, s.k_row_stride)).0).unwrap();
        let len = |heads| c.scope.weight_len(heads, s.head_dim);
        let qw = c.weighted.then(|| stream.clone_htod(&norm_weights(&mut r, len(s.q_heads))).unwrap());
        let kw = c.weighted.then(|| stream.clone_htod(&norm_weights(&mut r, len(s.k_heads))).unwrap());
        let pos = stream.clone_htod(&rope_positions(&mut r, s.tokens)).unwrap();
        let norm = QkNorm { eps: c.eps, scope: c.scope, q_weight: qw.as_ref(), k_weight: kw.as_ref() };
        let rep = match &c.rot {
            Some(rot) => rope_inplace_normed_checked(gpu, stream, &mut q, &mut k, &pos, s, rot, &norm),
            None => qk_norm_inplace_checked(gpu, stream, &mut q, &mut k, s, &norm),
        };
        let rep = rep.unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

#[test]
fn qk_norm_matches_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("qk_norm_matches_reference_all_dtypes") else { return };
    let n = qk_norm_sweep::<f32>(&gpu, &stream, 31) + qk_norm_sweep::<f16>(&gpu, &stream, 32) + qk_norm_sweep::<bf16>(&gpu, &stream, 33);
    assert_eq!(n, 3 * (5 * 7 + 3) * 3);
}

/// The gated query (Qwen3-Next, Qwen3.5) over common::cases::gated_cases, gates poisoned
/// (tests/emu_gated_query.rs runs the same sweep in the emulator): checked mode compares Q
/// and K with the reference and the gated rows with their copy from before the launch.
fn gated_sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for c in gated_cases() {
        let s = &c.shape;
        let d = s.head_dim;
        let queries = norm_values(&mut r, s.tokens, s.q_heads, d, s.q_heads * d);
        let gated = stream.clone_htod(&as_dtype::<T>(&gated_rows(s, &queries)).0).unwrap();
        let mut q_out = stream.alloc_zeros::<T>(s.tokens * s.q_heads * d).unwrap();
        let mut k = stream.clone_htod(&as_dtype::<T>(&norm_values(&mut r, s.tokens, s.k_heads, d, s.k_row_stride)).0).unwrap();
        let len = |heads| c.scope.weight_len(heads, d);
        let qw = c.weighted.then(|| stream.clone_htod(&norm_weights(&mut r, len(s.q_heads))).unwrap());
        let kw = c.weighted.then(|| stream.clone_htod(&norm_weights(&mut r, len(s.k_heads))).unwrap());
        let stride = s.tokens + 2;
        let pos = match &c.kind {
            GatedKind::Mrope(..) => stream.clone_htod(&mrope_positions(&mut r, s.tokens, stride)).unwrap(),
            _ => stream.clone_htod(&rope_positions(&mut r, s.tokens)).unwrap(),
        };
        let rotation = match &c.kind {
            GatedKind::None => GatedRotation::None,
            GatedKind::Rope(rot) => GatedRotation::Rope { positions: &pos, rot },
            GatedKind::Mrope(rot, mrope) => GatedRotation::Mrope { positions: &pos, stride, rot, mrope },
        };
        let norm = QkNorm { eps: 1e-6, scope: c.scope, q_weight: qw.as_ref(), k_weight: kw.as_ref() };
        let rep = qk_norm_rope_gated_checked(gpu, stream, &gated, &mut q_out, &mut k, s, rotation, &norm)
            .unwrap_or_else(|e| panic!("{} {}: {e}", T::NAME, c.label));
        assert!(rep.count > 0);
        cases += 1;
    }
    cases
}

#[test]
fn gated_query_matches_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("gated_query_matches_reference_all_dtypes") else { return };
    let n = gated_sweep::<f32>(&gpu, &stream, 41) + gated_sweep::<f16>(&gpu, &stream, 42) + gated_sweep::<bf16>(&gpu, &stream, 43);
    assert_eq!(n, 3 * 75);
}

/// M-RoPE after the QK norm (Qwen3-VL) over common::cases::mrope_sweep_cases, bf16
/// (tests/emu_qk_norm.rs runs the same cases in the emulator).
#[test]
fn mrope_after_qk_norm_matches_reference() {
    let Some((gpu, stream)) = gpu_or_skip("mrope_after_qk_norm_matches_reference") else { return };
    let mut r = rng(8);
    let mut cases = 0;
    for (i, c) in mrope_sweep_cases().into_iter().enumerate() {
        let s = &c.shape;
        let (tokens, stride) = (s.tokens, s.tokens + 3);
        let scope = if i % 3 == 2 { rope_attn::NormScope::Heads } else { rope_attn::NormScope::Head };
        let len = |heads| scope.weight_len(heads, s.head_dim);
        let qw = stream.clone_htod(&norm_weights(&mut r, len(s.q_heads))).unwrap();
        let kw = stream.clone_htod(&norm_weights(&mut r, len(s.k_heads))).unwrap();
        let norm = QkNorm { eps: 1e-6, scope, q_weight: Some(&qw), k_weight: Some(&kw) };
        let mut q = stream.clone_htod(&as_dtype::<bf16>(&norm_values(&mut r, tokens, s.q_heads, s.head_dim, s.q_row_stride)).0).unwrap();
        let mut k = stream.clone_htod(&as_dtype::<bf16>(&norm_values(&mut r, tokens, s.k_heads, s.head_dim, s.k_row_stride)).0).unwrap();
        let pos = stream.clone_htod(&mrope_positions(&mut r, tokens, stride)).unwrap();
        rope_inplace_mrope_normed_checked(&gpu, &stream, &mut q, &mut k, &pos, stride, s, &c.rot, &c.m, &norm)
            .unwrap_or_else(|e| panic!("{} {scope:?}: {e}", c.label));
        cases += 1;
    }
    assert_eq!(cases, 5 * 2 * 3 * 3 * 2);
}

/// SPEC "Precision": unit-scale f32 inputs rotated at 2^24 (and far beyond) stay within 1e-5
/// absolute of the f64 reference.
#[test]
fn rope_f32_is_exact_at_large_positions() {
    let Some((gpu, stream)) = gpu_or_skip("rope_f32_is_exact_at_large_positions") else { return };
    let d = 128;
    let rot = schedules(d, d).remove(0).1;
    let positions: Vec<i32> = vec![1 << 24, (1 << 24) + 1, (1 << 24) - 1, 100_000_000, i32::MAX, 0, 1, 4095, 4096];
    let tokens = positions.len();
    let mut r = rng(9);
    let x = uniform(&mut r, tokens * d);
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let mut q = stream.clone_htod(&xf).unwrap();
    let mut k = stream.clone_htod(&xf).unwrap();
    let pos = stream.clone_htod(&positions).unwrap();
    let shape = RopeShape::contiguous(tokens, 1, 1, d);
    let rep = rope_inplace_checked(&gpu, &stream, &mut q, &mut k, &pos, &shape, &rot).unwrap();
    assert!(rep.max_abs <= 1e-5, "max abs error {} at positions up to 2^31", rep.max_abs);
}

/// rope_into writes dense outputs, carries the pass-through components and leaves inputs alone.
#[test]
fn rope_into_matches_reference() {
    let Some((gpu, stream)) = gpu_or_skip("rope_into_matches_reference") else { return };
    let (tokens, qh, kh, d) = (5, 4, 2, 96);
    let rot = schedules(d, 48).remove(5).1; // yarn, partial rotary
    let mut r = rng(4);
    let (qv, qf) = as_dtype::<bf16>(&uniform(&mut r, tokens * qh * d));
    let (kv, kf) = as_dtype::<bf16>(&uniform(&mut r, tokens * kh * d));
    let positions: Vec<i32> = vec![0, 3, 1000, 70000, 1 << 24];
    let q = stream.clone_htod(&qv).unwrap();
    let k = stream.clone_htod(&kv).unwrap();
    let mut qo = stream.alloc_zeros::<bf16>(qv.len()).unwrap();
    let mut ko = stream.alloc_zeros::<bf16>(kv.len()).unwrap();
    let pos = stream.clone_htod(&positions).unwrap();
    let shape = RopeShape::contiguous(tokens, qh, kh, d);
    rope_into(&gpu, &stream, &q, &k, &mut qo, &mut ko, &pos, &shape, &rot).unwrap();
    let p64: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    for (input, out, heads) in [(qf, stream.clone_dtoh(&qo).unwrap(), qh), (kf, stream.clone_dtoh(&ko).unwrap(), kh)] {
        let mut want = input.clone();
        reference::rotate(&mut want, tokens, heads, d, heads * d, &p64, &rot).unwrap();
        let got: Vec<f64> = out.iter().map(|v| v.to_f64()).collect();
        let tol = Tolerance::rope::<bf16>(rope_attn::cuda::max_abs(&want));
        let rep = rope_attn::cuda::CheckReport::compare("rope_into", &got, &want, tol);
        assert!(rep.passed(), "{rep:?}");
    }
    assert_eq!(stream.clone_dtoh(&q).unwrap(), qv, "rope_into must not touch its input");
}
