//! Paged decode (split-K) and the paged append kernel against the reference; and decode agreeing
//! with prefill token by token over the same cache.

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rope_attn::cuda::{
    attention_decode, attention_decode_checked, attention_fwd, decode_base_steps, decode_workspace_len, max_abs, paged_append, AttentionBatch, CheckReport,
    DecodeBatch, Dtype, PagedKvCache, Tolerance,
};
use rope_attn::{Alibi, AttentionParams};
use std::sync::Arc;

type Stream = Arc<cudarc::driver::CudaStream>;

fn to64(x: &[bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// A paged cache filled through `paged_append` from per-sequence K/V, pages handed out in a
/// shuffled order so the block table really indirects.
struct Filled<T: Dtype> {
    k_cache: cudarc::driver::CudaSlice<T>,
    v_cache: cudarc::driver::CudaSlice<T>,
    table: cudarc::driver::CudaSlice<i32>,
    lens: cudarc::driver::CudaSlice<i32>,
    cache: PagedKvCache,
    max_pages: usize,
}

fn fill<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, p: &AttentionParams, ctx: &[usize], page: usize, r: &mut rand::rngs::StdRng) -> Filled<T> {
    let (hkv, d) = (p.num_kv_heads, p.head_dim);
    let max_pages = ctx.iter().max().unwrap().div_ceil(page);
    let num_pages = ctx.len() * max_pages + 3;
    let mut free: Vec<i32> = (0..num_pages as i32).collect();
    free.shuffle(r);
    let table: Vec<i32> = (0..ctx.len() * max_pages).map(|i| free[i]).collect();
    let cache = PagedKvCache { num_pages, page_size: page, kv_heads: hkv, head_dim: d };
    let mut k_cache = stream.alloc_zeros::<T>(cache.len()).unwrap();
    let mut v_cache = stream.alloc_zeros::<T>(cache.len()).unwrap();
    for (b, &n) in ctx.iter().enumerate() {
        let (kv, _) = as_dtype::<T>(&uniform(r, n * hkv * d));
        let (vv, _) = as_dtype::<T>(&uniform(r, n * hkv * d));
        let slots: Vec<i32> = (0..n).map(|j| table[b * max_pages + j / page] * page as i32 + (j % page) as i32).collect();
        let (k, v, s) = (stream.clone_htod(&kv).unwrap(), stream.clone_htod(&vv).unwrap(), stream.clone_htod(&slots).unwrap());
        paged_append(gpu, stream, &k, &v, &mut k_cache, &mut v_cache, &s, n, hkv * d, hkv * d, &cache).unwrap();
    }
    let lens: Vec<i32> = ctx.iter().map(|&n| n as i32).collect();
    Filled { k_cache, v_cache, table: stream.clone_htod(&table).unwrap(), lens: stream.clone_htod(&lens).unwrap(), cache, max_pages }
}

fn sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let DecodeCase { p, queries, page, ctx } = decode_case(case, d, rot, gpu_scale());
        let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
        let f = fill::<T>(gpu, stream, &p, &ctx, page, &mut r);
        let tokens = ctx.len() * queries;
        let batch = DecodeBatch::contiguous(&p, ctx.len(), queries, f.max_pages, *ctx.iter().max().unwrap());
        let (qv, _) = as_dtype::<T>(&uniform(&mut r, tokens * hq * d));
        let q = stream.clone_htod(&qv).unwrap();
        for splits in [1usize, 5] {
            let mut out = stream.alloc_zeros::<T>(tokens * hq * d).unwrap();
            let mut lse = stream.alloc_zeros::<f32>(tokens * hq).unwrap();
            let mut ws = stream.alloc_zeros::<f32>(decode_workspace_len(&p, &batch, splits).max(1)).unwrap();
            let mut wsv = ws.as_view_mut();
            attention_decode_checked(gpu, stream, &q, &f.k_cache, &f.v_cache, &f.table, &f.lens, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut wsv))
                .unwrap_or_else(|e| panic!("{} d={d} hq={hq}/{hkv} queries={queries} splits={splits} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
            cases += 1;
        }
    }
    cases
}

#[test]
fn decode_matches_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("decode_matches_reference_all_dtypes") else { return };
    let n = sweep::<f32>(&gpu, &stream, 1000) + sweep::<f16>(&gpu, &stream, 2000) + sweep::<bf16>(&gpu, &stream, 3000);
    assert_eq!(n, 3 * 6 * 8 * 2);
}

/// The tensor-core decode's base steps on this card's shared memory (tests/emu_decode.rs has
/// the same cases on an H100's and an A100's): every rotation, ReRoPE, a window whose jump lands
/// inside groups; split or not. Prints the steps the launcher took.
#[test]
fn decode_base_steps_match_reference() {
    let Some((gpu, stream)) = gpu_or_skip("decode_base_steps_match_reference") else { return };
    let (hq, page) = (8usize, 16usize);
    let mut r = rng(41);
    for (d, case) in BASE_STEP_CASES {
        let (p, ctx) = base_steps_case(d, case);
        let f = fill::<bf16>(&gpu, &stream, &p, &[ctx, 37], page, &mut r);
        let batch = DecodeBatch::contiguous(&p, 2, 2, f.max_pages, ctx);
        let (qv, _) = as_dtype::<bf16>(&uniform(&mut r, 4 * hq * d));
        let q = stream.clone_htod(&qv).unwrap();
        for splits in [1usize, 2] {
            let steps = decode_base_steps::<bf16>(&p, &batch, splits, gpu.smem_per_sm());
            println!("d={d} case {case} splits {splits}: {steps} base steps ({} B of shared memory per SM)", gpu.smem_per_sm());
            let mut out = stream.alloc_zeros::<bf16>(4 * hq * d).unwrap();
            let mut lse = stream.alloc_zeros::<f32>(4 * hq).unwrap();
            let mut ws = stream.alloc_zeros::<f32>(decode_workspace_len(&p, &batch, splits).max(1)).unwrap();
            let mut wsv = ws.as_view_mut();
            attention_decode_checked(&gpu, &stream, &q, &f.k_cache, &f.v_cache, &f.table, &f.lens, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut wsv))
                .unwrap_or_else(|e| panic!("d={d} case {case} splits {splits} ({steps} steps): {e}"));
        }
    }
}

/// Decoding token by token over a cache reproduces the last rows of a prefill of the whole sequence.
#[test]
fn decode_reproduces_prefill_rows() {
    let Some((gpu, stream)) = gpu_or_skip("decode_reproduces_prefill_rows") else { return };
    let (n, hq, hkv, d, page) = (300usize, 8usize, 2usize, 128usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let mut r = rng(77);
    let (qv, _) = as_dtype::<bf16>(&uniform(&mut r, n * hq * d));
    let (kv, _) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (vv, _) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (q, k, v) = (stream.clone_htod(&qv).unwrap(), stream.clone_htod(&kv).unwrap(), stream.clone_htod(&vv).unwrap());
    let mut out = stream.alloc_zeros::<bf16>(n * hq * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(n * hq).unwrap();
    let cu = stream.clone_htod(&[0i32, n as i32]).unwrap();
    attention_fwd(&gpu, &stream, &q, &k, &v, &mut out, &mut lse, &cu, &cu, &AttentionBatch::single(&p, n, n), &p, None).unwrap();
    let pre_o: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
    let pre_l = stream.clone_dtoh(&lse).unwrap();

    let max_pages = n.div_ceil(page);
    let cache = PagedKvCache { num_pages: max_pages, page_size: page, kv_heads: hkv, head_dim: d };
    let table: Vec<i32> = (0..max_pages as i32).rev().collect();
    let table_d = stream.clone_htod(&table).unwrap();
    let mut kc = stream.alloc_zeros::<bf16>(cache.len()).unwrap();
    let mut vc = stream.alloc_zeros::<bf16>(cache.len()).unwrap();
    let row = hkv * d;
    // Prefill and decode each round O to bf16 once: twice the attention tolerance.
    let (qx, kx, vx) = (max_abs(&to64(&qv)), max_abs(&to64(&kv)), max_abs(&to64(&vv)));
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, qx, kx, vx);
    for t in 0..n {
        let slot = table[t / page] * page as i32 + (t % page) as i32;
        let (kt, vt, s) = (
            stream.clone_htod(&kv[t * row..(t + 1) * row]).unwrap(),
            stream.clone_htod(&vv[t * row..(t + 1) * row]).unwrap(),
            stream.clone_htod(&[slot]).unwrap(),
        );
        paged_append(&gpu, &stream, &kt, &vt, &mut kc, &mut vc, &s, 1, row, row, &cache).unwrap();
        if t < n - 40 {
            continue; // compare the last 40 steps
        }
        let qt = stream.clone_htod(&qv[t * hq * d..(t + 1) * hq * d]).unwrap();
        let lens = stream.clone_htod(&[(t + 1) as i32]).unwrap();
        let batch = DecodeBatch::contiguous(&p, 1, 1, max_pages, t + 1);
        let mut o = stream.alloc_zeros::<bf16>(hq * d).unwrap();
        let mut l = stream.alloc_zeros::<f32>(hq).unwrap();
        attention_decode(&gpu, &stream, &qt, &kc, &vc, &table_d, &lens, &mut o, &mut l, &cache, &batch, &p, 1, None).unwrap();
        let got_o: Vec<f64> = stream.clone_dtoh(&o).unwrap().iter().map(|x| x.to_f64()).collect();
        let got_l: Vec<f64> = stream.clone_dtoh(&l).unwrap().iter().map(|&x| x as f64).collect();
        let want_l: Vec<f64> = (0..hq).map(|h| pre_l[h * n + t] as f64).collect();
        let rep = CheckReport::compare("decode vs prefill out", &got_o, &pre_o[t * hq * d..(t + 1) * hq * d], tol_o.times(2.0))
            .worst(CheckReport::compare("decode vs prefill lse", &got_l, &want_l, tol_l.times(2.0)));
        assert!(rep.passed(), "step {t}: {rep:?}");
    }
}

/// Gemma 3n's and Gemma 4's V norm fused into the append on the GPU (tests/emu_decode.rs,
/// emulated_append_normalises_v, at GPU sizes): every dtype and head size, 300 tokens with V
/// rows at a stride; each cached V head within one rounding of the dtype (and f32's rsqrt) of
/// the f64 reference's norm, K bit for bit.
#[test]
fn gpu_append_normalises_v() {
    let Some((gpu, stream)) = gpu_or_skip("gpu_append_normalises_v") else { return };
    fn case<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, d: usize, seed: u64) {
        let (hkv, tokens, stride) = (4usize, 300usize, 4 * d + 16);
        let cache = rope_attn::cuda::PagedKvCache { num_pages: 20, page_size: 16, kv_heads: hkv, head_dim: d };
        let mut r = rng(seed);
        let row = hkv * d;
        let (k, _) = as_dtype::<T>(&uniform(&mut r, tokens * row));
        let (v, vf) = as_dtype::<T>(&uniform(&mut r, tokens * stride).iter().map(|x| 5.0 * x).collect::<Vec<f64>>());
        // Token t into slot (7·t) mod 320: every slot at most once (7 is prime to 320).
        let slots: Vec<i32> = (0..tokens as i32).map(|t| (7 * t) % 320).collect();
        let (kd, vd, sd) = (stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap(), stream.clone_htod(&slots).unwrap());
        let (mut kc, mut vc) = (stream.alloc_zeros::<T>(cache.len()).unwrap(), stream.alloc_zeros::<T>(cache.len()).unwrap());
        rope_attn::cuda::paged_append_v_normed(gpu, stream, &kd, &vd, &mut kc, &mut vc, &sd, tokens, row, stride, &cache, 1e-6).unwrap();
        let (kc, vc) = (stream.clone_dtoh(&kc).unwrap(), stream.clone_dtoh(&vc).unwrap());
        for (t, &slot) in slots.iter().enumerate() {
            let s = slot as usize;
            assert!(kc[s * row..(s + 1) * row].iter().zip(&k[t * row..(t + 1) * row]).all(|(a, b)| a.to_f64() == b.to_f64()), "{} d={d}: K of token {t}", T::NAME);
            let mut want = vf[t * stride..t * stride + row].to_vec();
            rope_attn::reference::qk_norm_row(&mut want, d, 1e-6, rope_attn::NormScope::Head, None).unwrap();
            for (c, (g, w)) in vc[s * row..(s + 1) * row].iter().zip(&want).enumerate() {
                assert!((g.to_f64() - w).abs() <= (T::EPS + 1e-6) * w.abs() + 1e-7, "{} d={d}: V of token {t}, element {c}: {} vs {w}", T::NAME, g.to_f64());
            }
        }
    }
    for (i, &d) in rope_attn::cuda::SUPPORTED_HEAD_DIMS.iter().enumerate() {
        case::<f16>(&gpu, &stream, d, 930 + i as u64);
        case::<bf16>(&gpu, &stream, d, 940 + i as u64);
        case::<f32>(&gpu, &stream, d, 950 + i as u64);
    }
}
