//! Prefill attention (fused and pre-rotated paths) and the merge kernel against the reference:
//! variable-length batches with lengths that are not multiples of any tile (1..4096), every head
//! dim, f16/bf16/f32, GQA, causal / window / sinks, ALiBi, ReRoPE and Leaky ReRoPE, fully masked
//! rows (O = 0, lse = -inf), and one 32k sequence checked on a sample of rows.
//! Tolerance (Tolerance::attention): (2·score tolerance + eps_dtype)·max|v| for O, the score tolerance for LSE.

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    attention_fwd, attention_fwd_checked, attention_fwd_workspace_len, max_abs, merge_states, AttentionBatch, CheckReport, Dtype,
    PrefillPath, Tolerance,
};
use rope_attn::{reference, Alibi, AttentionParams};
use std::sync::Arc;

type Stream = Arc<cudarc::driver::CudaStream>;

/// Run one varlen problem through attention_fwd_checked; returns the path taken.
fn run<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, p: &AttentionParams, seq_q: &[usize], seq_k: &[usize], seed: u64, use_ws: bool) -> PrefillPath {
    let mut r = rng(seed);
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    let (cq, ck) = (cu_seqlens(seq_q), cu_seqlens(seq_k));
    let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
    let batch = AttentionBatch::contiguous(p, seq_q.len(), *seq_q.iter().max().unwrap(), tq, tk);
    let (qv, _) = as_dtype::<T>(&uniform(&mut r, tq * hq * d));
    let (kv, _) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let (vv, _) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let q = stream.clone_htod(&qv).unwrap();
    let k = stream.clone_htod(&kv).unwrap();
    let v = stream.clone_htod(&vv).unwrap();
    let mut out = stream.alloc_zeros::<T>(tq * hq * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(hq * tq).unwrap();
    let cqd = stream.clone_htod(&cq).unwrap();
    let ckd = stream.clone_htod(&ck).unwrap();
    let mut ws = stream.alloc_zeros::<T>(attention_fwd_workspace_len(p, tk).max(1)).unwrap();
    let mut wsv = ws.as_view_mut();
    let (path, rep) = attention_fwd_checked(gpu, stream, &q, &k, &v, &mut out, &mut lse, &cqd, &ckd, &batch, p, use_ws.then_some(&mut wsv))
        .unwrap_or_else(|e| panic!("{} d={d} hq={hq}/{hkv} q={seq_q:?} k={seq_k:?} {:?} {:?} alibi={:?}: {e}", T::NAME, p.relative, p.mask, p.alibi));
    assert!(rep.count > 0);
    path
}

fn sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, seed: u64) -> usize {
    let mut cases = 0;
    let f32_path = std::mem::size_of::<T>() == 4;
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let c = prefill_case(case, d, rot, f32_path, gpu_scale());
        let path = run::<T>(gpu, stream, &c.p, &c.seq_q, &c.seq_k, seed + case as u64, c.workspace);
        assert_eq!(path, if c.workspace { PrefillPath::PreRotated } else { PrefillPath::Fused });
        cases += 1;
    }
    cases
}

#[test]
fn prefill_matches_reference_f16() {
    let Some((gpu, stream)) = gpu_or_skip("prefill_matches_reference_f16") else { return };
    assert_eq!(sweep::<f16>(&gpu, &stream, 100), 48);
}

#[test]
fn prefill_matches_reference_bf16() {
    let Some((gpu, stream)) = gpu_or_skip("prefill_matches_reference_bf16") else { return };
    assert_eq!(sweep::<bf16>(&gpu, &stream, 200), 48);
}

#[test]
fn prefill_matches_reference_f32() {
    let Some((gpu, stream)) = gpu_or_skip("prefill_matches_reference_f32") else { return };
    assert_eq!(sweep::<f32>(&gpu, &stream, 300), 48);
}

/// Lengths up to 4096 without position encoding and with plain RoPE through both paths.
#[test]
fn prefill_long_sequences() {
    let Some((gpu, stream)) = gpu_or_skip("prefill_long_sequences") else { return };
    for (i, &n) in [511usize, 1024, 4096].iter().enumerate() {
        let mut p = AttentionParams::new(2, 1, 128);
        if i > 0 {
            p.rope = Some(schedules(128, 128).remove(6).1);
        }
        run::<bf16>(&gpu, &stream, &p, &[n], &[n], 7 + i as u64, i == 2);
    }
}

/// One 32k causal sequence with llama3 RoPE + ALiBi: the reference is O(n²), so only the first
/// and last 8 query rows are compared (the reference takes arbitrary query positions).
#[test]
fn prefill_32k_sampled_rows() {
    let Some((gpu, stream)) = gpu_or_skip("prefill_32k_sampled_rows") else { return };
    let (n, d) = (32768usize, 64usize);
    let mut p = AttentionParams::new(1, 1, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.alibi = Some(Alibi { total_heads: 8, head_offset: 7 });
    let mut r = rng(32);
    let (qv, qf) = as_dtype::<bf16>(&uniform(&mut r, n * d));
    let (kv, kf) = as_dtype::<bf16>(&uniform(&mut r, n * d));
    let (vv, vf) = as_dtype::<bf16>(&uniform(&mut r, n * d));
    let batch = AttentionBatch::single(&p, n, n);
    let (q, k, v) = (stream.clone_htod(&qv).unwrap(), stream.clone_htod(&kv).unwrap(), stream.clone_htod(&vv).unwrap());
    let mut out = stream.alloc_zeros::<bf16>(n * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(n).unwrap();
    let cu = stream.clone_htod(&[0i32, n as i32]).unwrap();
    attention_fwd(&gpu, &stream, &q, &k, &v, &mut out, &mut lse, &cu, &cu, &batch, &p, None).unwrap();
    let got_o: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
    let got_l = stream.clone_dtoh(&lse).unwrap();
    let rows: Vec<usize> = (0..8).chain(n - 8..n).collect();
    let q_pos: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
    let q_sub: Vec<f64> = rows.iter().flat_map(|&i| qf[i * d..(i + 1) * d].iter().copied()).collect();
    let k_pos: Vec<i64> = (0..n as i64).collect();
    let want = reference::attention(&q_sub, &kf, &vf, &q_pos, &k_pos, &p).unwrap();
    let got_sub: Vec<f64> = rows.iter().flat_map(|&i| got_o[i * d..(i + 1) * d].iter().copied()).collect();
    let got_lse: Vec<f64> = rows.iter().map(|&i| got_l[i] as f64).collect();
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    let rep = CheckReport::compare("32k out", &got_sub, &want.out, tol_o).worst(CheckReport::compare("32k lse", &got_lse, &want.lse, tol_l));
    assert!(rep.passed(), "{rep:?}");
}

/// merge((O1, lse1), (O2, lse2)) over the two halves of the keys equals attention over all of them.
#[test]
fn merge_of_halves_equals_whole() {
    let Some((gpu, stream)) = gpu_or_skip("merge_of_halves_equals_whole") else { return };
    let (n, nk, h, d) = (37usize, 90usize, 4usize, 128usize);
    let mut p = AttentionParams::new(h, h, d);
    p.mask.causal = false;
    let mut r = rng(55);
    let (qv, qf) = as_dtype::<f16>(&uniform(&mut r, n * h * d));
    let (kv, kf) = as_dtype::<f16>(&uniform(&mut r, nk * h * d));
    let (vv, vf) = as_dtype::<f16>(&uniform(&mut r, nk * h * d));
    let q = stream.clone_htod(&qv).unwrap();
    let mut parts = Vec::new();
    for (a, b) in [(0usize, 50usize), (50, nk)] {
        let k = stream.clone_htod(&kv[a * h * d..b * h * d]).unwrap();
        let v = stream.clone_htod(&vv[a * h * d..b * h * d]).unwrap();
        let mut out = stream.alloc_zeros::<f16>(n * h * d).unwrap();
        let mut lse = stream.alloc_zeros::<f32>(n * h).unwrap();
        let cq = stream.clone_htod(&[0i32, n as i32]).unwrap();
        let ck = stream.clone_htod(&[0i32, (b - a) as i32]).unwrap();
        let batch = AttentionBatch::single(&p, n, b - a);
        attention_fwd(&gpu, &stream, &q, &k, &v, &mut out, &mut lse, &cq, &ck, &batch, &p, None).unwrap();
        parts.push((out, lse));
    }
    let mut out = stream.alloc_zeros::<f16>(n * h * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(n * h).unwrap();
    merge_states(&gpu, &stream, &parts[0].0, &parts[0].1, &parts[1].0, &parts[1].1, &mut out, &mut lse, n, h, d).unwrap();
    let q_pos: Vec<i64> = vec![0; n];
    let k_pos: Vec<i64> = vec![0; nk];
    let want = reference::attention(&qf, &kf, &vf, &q_pos, &k_pos, &p).unwrap();
    let got_o: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
    let got_l: Vec<f64> = stream.clone_dtoh(&lse).unwrap().iter().map(|&x| x as f64).collect();
    // Two roundings to f16 (each half's O, then the merged O): twice the attention tolerance.
    let (tol_o, tol_l) = Tolerance::attention::<f16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    let rep = CheckReport::compare("merge out", &got_o, &want.out, tol_o.times(2.0))
        .worst(CheckReport::compare("merge lse", &got_l, &want.lse, tol_l.times(2.0)));
    assert!(rep.passed(), "{rep:?}");
}

/// Ring / chunked attention: the queries of the last chunk against two key blocks, each run with
/// its true starting positions (attention_fwd_at), merged, equal the reference over all keys —
/// RoPE angles, the causal mask and ALiBi distances all follow the positions.
#[test]
fn key_blocks_at_their_positions_merge_to_the_whole() {
    let Some((gpu, stream)) = gpu_or_skip("key_blocks_at_their_positions_merge_to_the_whole") else { return };
    let (n, nq, split, h, d) = (300usize, 70usize, 170usize, 2usize, 64usize);
    let q0 = n - nq;
    let mut p = AttentionParams::new(h, h, d);
    p.rope = Some(schedules(d, d).remove(5).1);
    p.alibi = Some(Alibi { total_heads: h, head_offset: 0 });
    let mut r = rng(66);
    let (qv, qf) = as_dtype::<bf16>(&uniform(&mut r, nq * h * d));
    let (kv, kf) = as_dtype::<bf16>(&uniform(&mut r, n * h * d));
    let (vv, vf) = as_dtype::<bf16>(&uniform(&mut r, n * h * d));
    let q = stream.clone_htod(&qv).unwrap();
    let mut parts = Vec::new();
    for (a, b) in [(0usize, split), (split, n)] {
        let k = stream.clone_htod(&kv[a * h * d..b * h * d]).unwrap();
        let v = stream.clone_htod(&vv[a * h * d..b * h * d]).unwrap();
        let mut out = stream.alloc_zeros::<bf16>(nq * h * d).unwrap();
        let mut lse = stream.alloc_zeros::<f32>(nq * h).unwrap();
        let cq = stream.clone_htod(&[0i32, nq as i32]).unwrap();
        let ck = stream.clone_htod(&[0i32, (b - a) as i32]).unwrap();
        let starts = stream.clone_htod(&[q0 as i32, a as i32]).unwrap();
        let batch = AttentionBatch::single(&p, nq, b - a);
        rope_attn::cuda::attention_fwd_at(&gpu, &stream, &q, &k, &v, &mut out, &mut lse, &cq, &ck, &starts, &batch, &p, None).unwrap();
        parts.push((out, lse));
    }
    let mut out = stream.alloc_zeros::<bf16>(nq * h * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(nq * h).unwrap();
    merge_states(&gpu, &stream, &parts[0].0, &parts[0].1, &parts[1].0, &parts[1].1, &mut out, &mut lse, nq, h, d).unwrap();
    let q_pos: Vec<i64> = (q0 as i64..n as i64).collect();
    let k_pos: Vec<i64> = (0..n as i64).collect();
    let want = reference::attention(&qf, &kf, &vf, &q_pos, &k_pos, &p).unwrap();
    let got_o: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
    let got_l: Vec<f64> = stream.clone_dtoh(&lse).unwrap().iter().map(|&x| x as f64).collect();
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    let rep = CheckReport::compare("ring out", &got_o, &want.out, tol_o.times(2.0))
        .worst(CheckReport::compare("ring lse", &got_l, &want.lse, tol_l.times(2.0)));
    assert!(rep.passed(), "{rep:?}");
}
