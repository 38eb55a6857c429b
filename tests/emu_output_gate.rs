//! The output gate fused into the attention kernels (Qwen3-Next's per-component gate where
//! `q_proj` left it, LFM3's per-head gate), run by the SIMT emulator: every prefill kernel (the
//! fused and pre-rotated tensor-core kernels at head_dim 64, 96 and 512, the f32 rows kernel at
//! 64 and 512) and the decode kernels (tensor cores at 64, CUDA cores at 512) with one split
//! and with three (the combine gates), the paged prefill (fused
//! with one split and three, gathered into the wide kernel) and the merge of partial states
//! (a cascade's last merge), in checked mode against the
//! f64 reference with the gate applied, and against the same call ungated: the LSE to the bit,
//! O within two roundings of the dtype of `O_ungated · sigmoid(g)`, gates of +inf leaving O as
//! it was and -inf zeroing it exactly. A gate buffer one element short is refused before launch.
#![cfg(feature = "emulator")]

mod common;

use common::gate::{check_gated, gates};
use common::paged::fill;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    attention_fwd_workspace_len, decode_workspace_len, paged_prefill_gather_len, paged_prefill_workspace_len, AttentionBatch, DecodeBatch, Dtype,
    PagedPrefillBatch, PagedPrefillPath,
};
use rope_attn::emulator::{DecodeInputs, Emulator, FwdInputs, GuardedBuf, PagedFwdInputs};
use rope_attn::{AttentionParams, Error};

fn params(d: usize) -> AttentionParams {
    let mut p = AttentionParams::new(4, 2, d);
    p.rope = Some(turning_rotary(d));
    p
}

fn prefill<T: Dtype>(emu: &Emulator, d: usize, use_ws: bool, seed: u64) {
    let p = params(d);
    let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
    let mut r = rng(seed);
    let seq = [7usize, 70];
    let cu = cu_seqlens(&seq);
    let total = *cu.last().unwrap() as usize;
    let batch = AttentionBatch::contiguous(&p, seq.len(), 70, total, total);
    let q = guard(&as_dtype::<T>(&uniform(&mut r, total * hq * d)).0);
    let k = guard(&as_dtype::<T>(&uniform(&mut r, total * hkv * d)).0);
    let v = guard(&as_dtype::<T>(&uniform(&mut r, total * hkv * d)).0);
    let cu = guard(&cu);
    let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    let fresh = || (GuardedBuf::filled(total * hq * d, T::default()), GuardedBuf::filled(hq * total, 0f32));
    let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(&p, total), T::default());
    let (mut out_u, mut lse_u) = fresh();
    let path = emu.attention_fwd(&x, &mut out_u, &mut lse_u, &batch, &p, use_ws.then_some(&mut ws[..])).unwrap();
    for (name, layout, gate, offset) in gates::<T>(&mut r, total, hq, d) {
        let what = format!("{} d={d} ws={use_ws} {path:?} {name}", T::NAME);
        let gbuf = guard(&gate);
        let (mut out, mut lse) = fresh();
        let (gpath, rep) = emu
            .attention_fwd_gated_checked(&x, &gbuf[offset..], &layout, &mut out, &mut lse, &batch, &p, use_ws.then_some(&mut ws[..]))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(gpath, path, "{what}");
        assert!(rep.count > 0, "{what}");
        check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[offset..], &layout, hq, d);
        // One element short: refused before any launch, nothing written.
        let (mut out, mut lse) = fresh();
        let short = &gbuf[offset..gbuf.len() - 1];
        let err = emu.attention_fwd_gated(&x, short, &layout, &mut out, &mut lse, &batch, &p, use_ws.then_some(&mut ws[..])).unwrap_err();
        assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "{what}: {err:?}");
        assert!(out.iter().all(|o| o.to_f64() == 0.0), "{what}: nothing written");
    }
}

#[test]
fn emulated_prefill_output_gate_16_bit() {
    let emu = emulator(9100);
    for d in [64, 96, 512] {
        for use_ws in [false, true] {
            prefill::<f16>(&emu, d, use_ws, 9101 + d as u64);
            prefill::<bf16>(&emu, d, use_ws, 9102 + d as u64);
        }
    }
}

#[test]
fn emulated_prefill_output_gate_f32() {
    prefill::<f32>(&emulator(9200), 64, true, 9201);
    prefill::<f32>(&emulator(9200), 512, true, 9202);
}

fn decode<T: Dtype>(emu: &Emulator, d: usize, seed: u64) {
    let p = params(d);
    let (hq, queries) = (p.num_q_heads, 2usize);
    let mut r = rng(seed);
    let lens = [5usize, 40];
    let f = fill::<T>(emu, &p, &lens, 16, &mut r);
    let rows = lens.len() * queries;
    let q = guard(&as_dtype::<T>(&uniform(&mut r, rows * hq * d)).0);
    let batch = DecodeBatch::contiguous(&p, lens.len(), queries, f.max_pages, 40);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let fresh = || (GuardedBuf::filled(rows * hq * d, T::default()), GuardedBuf::filled(rows * hq, 0f32));
    let gate_sets = gates::<T>(&mut r, rows, hq, d);
    for splits in [1usize, 3] {
        let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
        let (mut out_u, mut lse_u) = fresh();
        emu.attention_decode(&x, &mut out_u, &mut lse_u, &f.cache, &batch, &p, splits, Some(&mut ws)).unwrap();
        for (name, layout, gate, offset) in &gate_sets {
            let what = format!("{} decode splits={splits} {name}", T::NAME);
            let gbuf = guard(gate);
            let (mut out, mut lse) = fresh();
            let rep = emu
                .attention_decode_gated_checked(&x, &gbuf[*offset..], layout, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(rep.count > 0, "{what}");
            check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
            let (mut out, mut lse) = fresh();
            let short = &gbuf[*offset..gbuf.len() - 1];
            let err = emu.attention_decode_gated(&x, short, layout, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws)).unwrap_err();
            assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "{what}: {err:?}");
            assert!(out.iter().all(|o| o.to_f64() == 0.0), "{what}: nothing written");
        }
    }
}

#[test]
fn emulated_decode_output_gate() {
    let emu = emulator(9300);
    for d in [64, 512] {
        decode::<f16>(&emu, d, 9301 + d as u64);
        decode::<bf16>(&emu, d, 9302 + d as u64);
        decode::<f32>(&emu, d, 9303 + d as u64);
    }
}

fn paged_prefill<T: Dtype>(emu: &Emulator, seed: u64) {
    let p = params(64);
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let mut r = rng(seed);
    let (seq_q, ctx) = ([3usize, 70], [40usize, 200]);
    let f = fill::<T>(emu, &p, &ctx, 16, &mut r);
    let tq: usize = seq_q.iter().sum();
    let batch = PagedPrefillBatch::contiguous(&p, seq_q.len(), 70, tq, f.max_pages);
    let q = guard(&as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0);
    let cq = guard(&cu_seqlens(&seq_q));
    let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cq, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let fresh = || (GuardedBuf::filled(tq * hq * d, T::default()), GuardedBuf::filled(hq * tq, 0f32));
    let gate_sets = gates::<T>(&mut r, tq, hq, d);
    for (splits, gather) in [(1usize, false), (3, false), (1, true)] {
        let mut ws = GuardedBuf::filled(paged_prefill_workspace_len(&p, &batch, splits), 0f32);
        let mut gws = GuardedBuf::filled(if gather { paged_prefill_gather_len(&p, &batch, &f.cache) } else { 0 }, T::default());
        let (mut out_u, mut lse_u) = fresh();
        let path = emu.attention_fwd_paged(&x, &mut out_u, &mut lse_u, &f.cache, &batch, &p, splits, Some(&mut ws), gather.then_some(&mut gws[..])).unwrap();
        assert_eq!(path == PagedPrefillPath::Gathered, gather);
        for (name, layout, gate, offset) in &gate_sets {
            let what = format!("{} paged prefill splits={splits} {path:?} {name}", T::NAME);
            let gbuf = guard(gate);
            let (mut out, mut lse) = fresh();
            let rep = emu
                .attention_fwd_paged_gated_checked(&x, &gbuf[*offset..], layout, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws), gather.then_some(&mut gws[..]))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(rep.count > 0, "{what}");
            check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[*offset..], layout, hq, d);
            let (mut out, mut lse) = fresh();
            let short = &gbuf[*offset..gbuf.len() - 1];
            let err = emu
                .attention_fwd_paged_gated(&x, short, layout, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws), gather.then_some(&mut gws[..]))
                .unwrap_err();
            assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "{what}: {err:?}");
            assert!(out.iter().all(|o| o.to_f64() == 0.0), "{what}: nothing written");
        }
    }
}

#[test]
fn emulated_paged_prefill_output_gate() {
    let emu = emulator(9600);
    paged_prefill::<f16>(&emu, 9601);
    paged_prefill::<bf16>(&emu, 9602);
}

/// The merge of two partial states (random O and LSE, one row's side fully masked) gated: the
/// LSE as the ungated merge's, O its product with the gate.
fn merge<T: Dtype>(emu: &Emulator, seed: u64) {
    let (tokens, heads, d) = (6usize, 4usize, 64usize);
    let mut r = rng(seed);
    let part = |r: &mut rand::rngs::StdRng| {
        let o = guard(&as_dtype::<T>(&uniform(r, tokens * heads * d)).0);
        let mut l: Vec<f32> = uniform(r, tokens * heads).iter().map(|&x| 3.0 * x as f32).collect();
        l[1] = f32::NEG_INFINITY;
        (o, guard(&l))
    };
    let ((o1, l1), (o2, l2)) = (part(&mut r), part(&mut r));
    let fresh = || (GuardedBuf::filled(tokens * heads * d, T::default()), GuardedBuf::filled(tokens * heads, 0f32));
    let (mut out_u, mut lse_u) = fresh();
    emu.merge_states([(&o1, &l1), (&o2, &l2)], &mut out_u, &mut lse_u, tokens, heads, d).unwrap();
    for (name, layout, gate, offset) in gates::<T>(&mut r, tokens, heads, d) {
        let what = format!("{} merge {name}", T::NAME);
        let gbuf = guard(&gate);
        let (mut out, mut lse) = fresh();
        emu.merge_states_gated([(&o1, &l1), (&o2, &l2)], &gbuf[offset..], &layout, &mut out, &mut lse, tokens, heads, d).unwrap();
        check_gated(&what, (&out, &lse), (&out_u, &lse_u), &gate[offset..], &layout, heads, d);
        let (mut out, mut lse) = fresh();
        let err = emu.merge_states_gated([(&o1, &l1), (&o2, &l2)], &gbuf[offset..gbuf.len() - 1], &layout, &mut out, &mut lse, tokens, heads, d).unwrap_err();
        assert!(matches!(err, Error::BufferTooSmall { what: "output gate", .. }), "{what}: {err:?}");
    }
}

#[test]
fn emulated_merge_output_gate() {
    let emu = emulator(9800);
    merge::<f16>(&emu, 9801);
    merge::<bf16>(&emu, 9802);
    merge::<f32>(&emu, 9803);
}
