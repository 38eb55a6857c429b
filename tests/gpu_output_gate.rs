//! The output gate fused into the attention kernels on a GPU (tests/emu_output_gate.rs runs the
//! same checks in the emulator at smaller sizes): prefill over every supported head dim, fused and
//! pre-rotated keys, f16 / bf16 / f32, and decode over a paged cache with one split and with
//! five, the paged prefill (fused with one split and four, gathered into the wide kernel) and
//! the merge of two prefills over halves of the keys (a cascade's last merge), for Qwen3-Next's
//! per-component gate and LFM3's per-head gate. Checked mode compares O
//! (gated) and the LSE with the f64 reference; against the same call ungated, the LSE is equal
//! to the bit and O is `O_ungated · sigmoid(g)` within two roundings of the dtype.
//! Tolerance (Tolerance::attention), as tests/gpu_attention.rs. Aliased and short gates are refused.

mod common;

use common::gate::{check_gated, gates};
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    attention_decode, attention_decode_gated, attention_decode_gated_checked, attention_fwd, attention_fwd_gated, attention_fwd_gated_checked,
    attention_fwd_paged, attention_fwd_paged_gated_checked, attention_fwd_workspace_len, decode_workspace_len, merge_states, merge_states_gated, paged_prefill_gather_len,
    paged_prefill_workspace_len, AttentionBatch, DecodeBatch, Dtype, Gpu, PagedKvCache, PagedPrefillBatch, PagedPrefillPath, SUPPORTED_HEAD_DIMS,
};
use rope_attn::{AttentionParams, Error, OutputGate};
use std::sync::Arc;

type Stream = Arc<cudarc::driver::CudaStream>;

fn params(d: usize) -> AttentionParams {
    let mut p = AttentionParams::new(8, 2, d);
    p.rope = Some(turning_rotary(d));
    p
}

fn prefill<T: Dtype>(gpu: &Gpu, stream: &Stream, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    let f32_path = std::mem::size_of::<T>() == 4;
    for &d in SUPPORTED_HEAD_DIMS {
        let p = params(d);
        let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
        let seq = [1usize, 77, 300];
        let cu = cu_seqlens(&seq);
        let total = *cu.last().unwrap() as usize;
        let batch = AttentionBatch::contiguous(&p, seq.len(), 300, total, total);
        let q = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, total * hq * d)).0).unwrap();
        let k = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, total * hkv * d)).0).unwrap();
        let v = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, total * hkv * d)).0).unwrap();
        let cu = stream.clone_htod(&cu).unwrap();
        let gate_sets = gates::<T>(&mut r, total, hq, d);
        for use_ws in [false, true].into_iter().filter(|&w| w || !f32_path) {
            let mut ws = stream.alloc_zeros::<T>(attention_fwd_workspace_len(&p, total)).unwrap();
            let mut out_u = stream.alloc_zeros::<T>(total * hq * d).unwrap();
            let mut lse_u = stream.alloc_zeros::<f32>(hq * total).unwrap();
            let mut wsv = ws.as_view_mut();
            attention_fwd(gpu, stream, &q, &k, &v, &mut out_u, &mut lse_u, &cu, &cu, &batch, &p, use_ws.then_some(&mut wsv)).unwrap();
            let (out_u, lse_u) = (stream.clone_dtoh(&out_u).unwrap(), stream.clone_dtoh(&lse_u).unwrap());
            for (name, layout, gate, offset) in &gate_sets {
                let what = format!("{} d={d} ws={use_ws} {name}", T::NAME);
                let g = stream.clone_htod(gate).unwrap();
                let mut out = stream.alloc_zeros::<T>(total * hq * d).unwrap();
                let mut lse = stream.alloc_zeros::<f32>(hq * total).unwrap();
                let mut wsv = ws.as_view_mut();
                let (_, rep) = attention_fwd_gated_checked(gpu, stream, &q, &k, &v, &g.slice(*offset..), layout, &mut out, &mut lse, &cu, &cu, &batch, &p, use_ws.then_some(&mut wsv))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(rep.count > 0, "{what}");
                let (out, lse) = (stream.clone_dtoh(&out).unwrap(), stream.clone_dtoh(&lse).unwrap());
                check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
                cases += 1;
            }
        }
    }
    cases
}

#[test]
fn gpu_prefill_output_gate() {
    let Some((gpu, stream)) = gpu_or_skip("gpu_prefill_output_gate") else { return };
    let n = SUPPORTED_HEAD_DIMS.len();
    assert_eq!(prefill::<f16>(&gpu, &stream, 9400), 4 * n);
    assert_eq!(prefill::<bf16>(&gpu, &stream, 9401), 4 * n);
    assert_eq!(prefill::<f32>(&gpu, &stream, 9402), 2 * n);
}

fn decode<T: Dtype>(gpu: &Gpu, stream: &Stream, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in SUPPORTED_HEAD_DIMS {
        let p = params(d);
        let (hq, hkv, queries, page) = (p.num_q_heads, p.num_kv_heads, 3usize, 16usize);
        let lens = [3usize, 700, 2000];
        let max_pages = 2000usize.div_ceil(page);
        // Sequence b owns pages b·max_pages.. in order: the block table is the identity.
        let cache = PagedKvCache { num_pages: lens.len() * max_pages, page_size: page, kv_heads: hkv, head_dim: d };
        let k_cache = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, cache.len())).0).unwrap();
        let v_cache = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, cache.len())).0).unwrap();
        let table = stream.clone_htod(&(0..cache.num_pages as i32).collect::<Vec<_>>()).unwrap();
        let ctx = stream.clone_htod(&lens.iter().map(|&n| n as i32).collect::<Vec<_>>()).unwrap();
        let rows = lens.len() * queries;
        let q = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, rows * hq * d)).0).unwrap();
        let batch = DecodeBatch::contiguous(&p, lens.len(), queries, max_pages, 2000);
        let gate_sets = gates::<T>(&mut r, rows, hq, d);
        for splits in [1usize, 5] {
            let mut ws = stream.alloc_zeros::<f32>(decode_workspace_len(&p, &batch, splits).max(1)).unwrap();
            let mut out_u = stream.alloc_zeros::<T>(rows * hq * d).unwrap();
            let mut lse_u = stream.alloc_zeros::<f32>(rows * hq).unwrap();
            let mut wsv = ws.as_view_mut();
            attention_decode(gpu, stream, &q, &k_cache, &v_cache, &table, &ctx, &mut out_u, &mut lse_u, &cache, &batch, &p, splits, Some(&mut wsv)).unwrap();
            let (out_u, lse_u) = (stream.clone_dtoh(&out_u).unwrap(), stream.clone_dtoh(&lse_u).unwrap());
            for (name, layout, gate, offset) in &gate_sets {
                let what = format!("{} decode d={d} splits={splits} {name}", T::NAME);
                let g = stream.clone_htod(gate).unwrap();
                let mut out = stream.alloc_zeros::<T>(rows * hq * d).unwrap();
                let mut lse = stream.alloc_zeros::<f32>(rows * hq).unwrap();
                let mut wsv = ws.as_view_mut();
                let rep = attention_decode_gated_checked(gpu, stream, &q, &k_cache, &v_cache, &table, &ctx, &g.slice(*offset..), layout, &mut out, &mut lse, &cache, &batch, &p, splits, Some(&mut wsv))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(rep.count > 0, "{what}");
                let (out, lse) = (stream.clone_dtoh(&out).unwrap(), stream.clone_dtoh(&lse).unwrap());
                check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
                cases += 1;
            }
        }
    }
    cases
}

#[test]
fn gpu_decode_output_gate() {
    let Some((gpu, stream)) = gpu_or_skip("gpu_decode_output_gate") else { return };
    let n = SUPPORTED_HEAD_DIMS.len();
    assert_eq!(decode::<f16>(&gpu, &stream, 9500), 4 * n);
    assert_eq!(decode::<bf16>(&gpu, &stream, 9501), 4 * n);
    assert_eq!(decode::<f32>(&gpu, &stream, 9502), 4 * n);
}

/// Chunks of 1, 200 and 300 new tokens at the end of contexts of 9, 1500 and 300 keys (a fresh
/// prompt), pages of 16 in a reversed table.
fn paged_prefill<T: Dtype>(gpu: &Gpu, stream: &Stream, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in SUPPORTED_HEAD_DIMS {
        let p = params(d);
        let (hq, hkv, page) = (p.num_q_heads, p.num_kv_heads, 16usize);
        let (seq_q, ctx) = ([1usize, 200, 300], [9usize, 1500, 300]);
        let max_pages = 1500usize.div_ceil(page);
        let cache = PagedKvCache { num_pages: ctx.len() * max_pages, page_size: page, kv_heads: hkv, head_dim: d };
        let k_cache = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, cache.len())).0).unwrap();
        let v_cache = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, cache.len())).0).unwrap();
        let table = stream.clone_htod(&(0..cache.num_pages as i32).rev().collect::<Vec<_>>()).unwrap();
        let lens = stream.clone_htod(&ctx.iter().map(|&n| n as i32).collect::<Vec<_>>()).unwrap();
        let tq: usize = seq_q.iter().sum();
        let cu = stream.clone_htod(&cu_seqlens(&seq_q)).unwrap();
        let q = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0).unwrap();
        let batch = PagedPrefillBatch::contiguous(&p, seq_q.len(), 300, tq, max_pages);
        let gate_sets = gates::<T>(&mut r, tq, hq, d);
        for (splits, gather) in [(1usize, false), (4, false), (1, true)] {
            let mut ws = stream.alloc_zeros::<f32>(paged_prefill_workspace_len(&p, &batch, splits).max(1)).unwrap();
            let mut gws = stream.alloc_zeros::<T>(if gather { paged_prefill_gather_len(&p, &batch, &cache) } else { 1 }).unwrap();
            let mut out_u = stream.alloc_zeros::<T>(tq * hq * d).unwrap();
            let mut lse_u = stream.alloc_zeros::<f32>(hq * tq).unwrap();
            let (mut wsv, mut gv) = (ws.as_view_mut(), gws.as_view_mut());
            let path = attention_fwd_paged(gpu, stream, &q, &k_cache, &v_cache, &table, &lens, &cu, &mut out_u, &mut lse_u, &cache, &batch, &p, splits, Some(&mut wsv), gather.then_some(&mut gv))
                .unwrap();
            assert_eq!(path == PagedPrefillPath::Gathered, gather);
            let (out_u, lse_u) = (stream.clone_dtoh(&out_u).unwrap(), stream.clone_dtoh(&lse_u).unwrap());
            for (name, layout, gate, offset) in &gate_sets {
                let what = format!("{} paged prefill d={d} splits={splits} {path:?} {name}", T::NAME);
                let g = stream.clone_htod(gate).unwrap();
                let mut out = stream.alloc_zeros::<T>(tq * hq * d).unwrap();
                let mut lse = stream.alloc_zeros::<f32>(hq * tq).unwrap();
                let (mut wsv, mut gv) = (ws.as_view_mut(), gws.as_view_mut());
                let rep = attention_fwd_paged_gated_checked(gpu, stream, &q, &k_cache, &v_cache, &table, &lens, &cu, &g.slice(*offset..), layout, &mut out, &mut lse, &cache, &batch, &p, splits, Some(&mut wsv), gather.then_some(&mut gv))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(rep.count > 0, "{what}");
                let (out, lse) = (stream.clone_dtoh(&out).unwrap(), stream.clone_dtoh(&lse).unwrap());
                check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
                cases += 1;
            }
        }
    }
    cases
}

#[test]
fn gpu_paged_prefill_output_gate() {
    let Some((gpu, stream)) = gpu_or_skip("gpu_paged_prefill_output_gate") else { return };
    let n = SUPPORTED_HEAD_DIMS.len();
    assert_eq!(paged_prefill::<f16>(&gpu, &stream, 9700), 6 * n);
    assert_eq!(paged_prefill::<bf16>(&gpu, &stream, 9701), 6 * n);
}

/// Two prefills over the two halves of one sequence's keys (attention_fwd_at's positions),
/// merged ungated and gated: the LSE to the bit, O the product with the gate.
fn merge<T: Dtype>(gpu: &Gpu, stream: &Stream, seed: u64) -> usize {
    use rope_attn::cuda::attention_fwd_at;
    let mut r = rng(seed);
    let mut cases = 0;
    for &d in SUPPORTED_HEAD_DIMS {
        let p = params(d);
        let (hq, hkv, nq, n, split) = (p.num_q_heads, p.num_kv_heads, 100usize, 900usize, 500usize);
        let q = stream.clone_htod(&as_dtype::<T>(&uniform(&mut r, nq * hq * d)).0).unwrap();
        let (k, v) = (as_dtype::<T>(&uniform(&mut r, n * hkv * d)).0, as_dtype::<T>(&uniform(&mut r, n * hkv * d)).0);
        let mut parts = Vec::new();
        for (a, b) in [(0usize, split), (split, n)] {
            let (cq, ck) = (stream.clone_htod(&[0i32, nq as i32]).unwrap(), stream.clone_htod(&[0i32, (b - a) as i32]).unwrap());
            let starts = stream.clone_htod(&[(n - nq) as i32, a as i32]).unwrap();
            let (kb, vb) = (stream.clone_htod(&k[a * hkv * d..b * hkv * d]).unwrap(), stream.clone_htod(&v[a * hkv * d..b * hkv * d]).unwrap());
            let mut o = stream.alloc_zeros::<T>(nq * hq * d).unwrap();
            let mut l = stream.alloc_zeros::<f32>(nq * hq).unwrap();
            // (f32 takes its keys pre-rotated into the workspace.)
            let mut ws = stream.alloc_zeros::<T>(attention_fwd_workspace_len(&p, b - a)).unwrap();
            let mut wsv = ws.as_view_mut();
            attention_fwd_at(gpu, stream, &q, &kb, &vb, &mut o, &mut l, &cq, &ck, &starts, &AttentionBatch::single(&p, nq, b - a), &p, Some(&mut wsv)).unwrap();
            parts.push((o, l));
        }
        let mut out_u = stream.alloc_zeros::<T>(nq * hq * d).unwrap();
        let mut lse_u = stream.alloc_zeros::<f32>(nq * hq).unwrap();
        merge_states(gpu, stream, &parts[0].0, &parts[0].1, &parts[1].0, &parts[1].1, &mut out_u, &mut lse_u, nq, hq, d).unwrap();
        let (out_u, lse_u) = (stream.clone_dtoh(&out_u).unwrap(), stream.clone_dtoh(&lse_u).unwrap());
        for (name, layout, gate, offset) in &gates::<T>(&mut r, nq, hq, d) {
            let what = format!("{} merge d={d} {name}", T::NAME);
            let g = stream.clone_htod(gate).unwrap();
            let mut out = stream.alloc_zeros::<T>(nq * hq * d).unwrap();
            let mut lse = stream.alloc_zeros::<f32>(nq * hq).unwrap();
            merge_states_gated(gpu, stream, &parts[0].0, &parts[0].1, &parts[1].0, &parts[1].1, &g.slice(*offset..), layout, &mut out, &mut lse, nq, hq, d)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (out, lse) = (stream.clone_dtoh(&out).unwrap(), stream.clone_dtoh(&lse).unwrap());
            check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
            cases += 1;
        }
    }
    cases
}

#[test]
fn gpu_merge_output_gate() {
    let Some((gpu, stream)) = gpu_or_skip("gpu_merge_output_gate") else { return };
    let n = SUPPORTED_HEAD_DIMS.len();
    assert_eq!(merge::<f16>(&gpu, &stream, 9900), 2 * n);
    assert_eq!(merge::<bf16>(&gpu, &stream, 9901), 2 * n);
    assert_eq!(merge::<f32>(&gpu, &stream, 9902), 2 * n);
}

/// A gate that aliases O (safe code cannot build one, a server's own allocator can) and a gate
/// one element short are refused with typed errors before any launch: O stays as it was.
#[test]
fn gpu_output_gate_refuses_aliased_and_short_gates() {
    use cudarc::driver::{CudaSlice, DevicePtr};
    let Some((gpu, stream)) = gpu_or_skip("gpu_output_gate_refuses_aliased_and_short_gates") else { return };
    let p = params(64);
    let (hq, hkv, d, total) = (p.num_q_heads, p.num_kv_heads, p.head_dim, 5usize);
    let batch = AttentionBatch::contiguous(&p, 1, total, total, total);
    let q = stream.alloc_zeros::<f16>(total * hq * d).unwrap();
    let kv = stream.alloc_zeros::<f16>(total * hkv * d).unwrap();
    let cu = stream.clone_htod(&cu_seqlens(&[total])).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(hq * total).unwrap();
    let mut out = stream.clone_htod(&vec![f16::from_f32(7.0); total * hq * d]).unwrap();
    let layout = OutputGate::dense(hq, d);
    let ptr = out.device_ptr(&stream).0;
    // SAFETY: the alias is only handed to the validation, which refuses it before any launch,
    // and it is leaked, so the allocation is freed once, by `out`.
    let alias: CudaSlice<f16> = unsafe { stream.upgrade_device_ptr(ptr, total * hq * d) };
    let err = attention_fwd_gated(&gpu, &stream, &q, &kv, &kv, &alias, &layout, &mut out, &mut lse, &cu, &cu, &batch, &p, None).unwrap_err();
    assert!(matches!(err, Error::Shape { what: "output gate", .. }), "prefill: {err}");
    let short = stream.alloc_zeros::<f16>(total * hq * d - 1).unwrap();
    let err = attention_fwd_gated(&gpu, &stream, &q, &kv, &kv, &short, &layout, &mut out, &mut lse, &cu, &cu, &batch, &p, None).unwrap_err();
    assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "prefill: {err}");

    let cache = PagedKvCache { num_pages: 1, page_size: 16, kv_heads: hkv, head_dim: d };
    let kc = stream.alloc_zeros::<f16>(cache.len()).unwrap();
    let table = stream.clone_htod(&[0i32]).unwrap();
    let ctx = stream.clone_htod(&[total as i32]).unwrap();
    let dbatch = DecodeBatch::contiguous(&p, 1, total, 1, 16);
    let err = attention_decode_gated(&gpu, &stream, &q, &kc, &kc, &table, &ctx, &alias, &layout, &mut out, &mut lse, &cache, &dbatch, &p, 1, None).unwrap_err();
    assert!(matches!(err, Error::Shape { what: "output gate", .. }), "decode: {err}");
    let err = attention_decode_gated(&gpu, &stream, &q, &kc, &kc, &table, &ctx, &short, &layout, &mut out, &mut lse, &cache, &dbatch, &p, 1, None).unwrap_err();
    assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "decode: {err}");
    alias.leak();
    assert!(stream.clone_dtoh(&out).unwrap().iter().all(|&x| x == f16::from_f32(7.0)), "O was written");
}
