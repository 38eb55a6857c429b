//! What the launchers cannot validate without a device sync — cumulative sequence offsets,
//! seq_starts, block-table entries, context lengths, append slots and rope positions live in
//! device memory — the kernels clamp into the buffers the host did validate. The documented
//! promise: corrupt values give wrong numbers, never an out-of-bounds access. Checked here by the
//! SIMT emulator with every buffer guarded (an access past any end would stop the test).
#![cfg(feature = "emulator")]

mod common;

use common::*;
use half::bf16;
use rope_attn::cuda::{
    attention_fwd_workspace_len, decode_workspace_len, paged_prefill_gather_len, paged_prefill_workspace_len, AttentionBatch, DecodeBatch, PagedKvCache,
    PagedPrefillBatch, RopeShape,
};
use rope_attn::emulator::{DecodeInputs, FwdInputs, GuardedBuf, PagedFwdInputs};
use rope_attn::{AttentionParams, Relative};

#[test]
fn prefill_with_corrupt_offsets_and_starts_stays_in_bounds() {
    let emu = emulator(0);
    let (hq, hkv, d) = (4usize, 2usize, 64usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(0).1);
    let (tq, tk) = (40usize, 50usize);
    let mut r = rng(5);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, tq * hq * d)).0);
    let k = guard(&as_dtype::<bf16>(&uniform(&mut r, tk * hkv * d)).0);
    let v = guard(&as_dtype::<bf16>(&uniform(&mut r, tk * hkv * d)).0);
    let batch = AttentionBatch::contiguous(&p, 3, 40, tq, tk);
    let corrupt: [[i32; 4]; 4] = [[0, 1000, -5, 7], [-100, 39, 40, i32::MAX], [i32::MIN, 0, 0, 41], [40, 20, 10, 0]];
    for relative in [Relative::None, Relative::Leaky { window: 4, k: 2.0 }] {
        p.relative = relative;
        for (i, cq) in corrupt.iter().enumerate() {
            let ck = corrupt[(i + 1) % 4];
            let starts = [i32::MAX, i32::MIN, -7, 1 << 30, 0, -1];
            for (ws, seq_starts) in [(false, None), (true, Some(&starts[..]))] {
                if !ws && relative != Relative::None {
                    continue; // ReRoPE always pre-rotates
                }
                let (cqg, ckg, sg) = (guard(cq), guard(&ck), guard(&starts));
                let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cqg, cu_seqlens_k: &ckg, seq_starts: seq_starts.map(|_| &sg[..]) };
                let (mut out, mut lse) = (GuardedBuf::filled(tq * hq * d, bf16::ZERO), GuardedBuf::filled(hq * tq, 0f32));
                let mut w = GuardedBuf::filled(attention_fwd_workspace_len(&p, tk), bf16::ZERO);
                emu.attention_fwd(&x, &mut out, &mut lse, &batch, &p, ws.then_some(&mut w[..]))
                    .unwrap_or_else(|e| panic!("cu_q {cq:?} cu_k {ck:?}: {e}"));
            }
        }
    }
}

#[test]
fn decode_with_corrupt_table_and_lengths_stays_in_bounds() {
    let emu = emulator(0);
    let (hq, hkv, d, page) = (8usize, 2usize, 128usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.relative = Relative::ReRope { window: 8 };
    let cache = PagedKvCache { num_pages: 5, page_size: page, kv_heads: hkv, head_dim: d };
    let mut r = rng(6);
    let kc = guard(&as_dtype::<bf16>(&uniform(&mut r, cache.len())).0);
    let vc = guard(&as_dtype::<bf16>(&uniform(&mut r, cache.len())).0);
    let (batch_n, queries, max_pages) = (3usize, 2usize, 4usize);
    let batch = DecodeBatch::contiguous(&p, batch_n, queries, max_pages, max_pages * page);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, batch_n * queries * hq * d)).0);
    let table = guard(&[0, 999, -3, i32::MAX, 4, 1, 2, 3, i32::MIN, -1, 5, 6]);
    for lens in [[i32::MAX, -5, 0], [64, 65, 1], [1, i32::MIN, 1000]] {
        let lens = guard(&lens);
        let x = DecodeInputs { q: &q, k_cache: &kc, v_cache: &vc, block_table: &table, context_lens: &lens };
        for splits in [1usize, 3] {
            let (mut out, mut lse) = (GuardedBuf::filled(batch_n * queries * hq * d, bf16::ZERO), GuardedBuf::filled(batch_n * queries * hq, 0f32));
            let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
            emu.attention_decode(&x, &mut out, &mut lse, &cache, &batch, &p, splits, Some(&mut ws)).unwrap();
        }
    }
    // Slots outside the pool are skipped by the append kernel.
    let (mut kc2, mut vc2) = (guard(&kc), guard(&vc));
    let rows = guard(&as_dtype::<bf16>(&uniform(&mut r, 4 * hkv * d)).0);
    emu.paged_append(&rows, &rows, &mut kc2, &mut vc2, &guard(&[i32::MAX, -1, 80, i32::MIN]), 4, hkv * d, hkv * d, &cache).unwrap();
}

/// Paged prefill reads the same device-side block table and context lengths as decode, through
/// its own loader (the tensor-core prefill kernel): corrupt entries must stay inside the pool.
#[test]
fn paged_prefill_with_corrupt_table_and_lengths_stays_in_bounds() {
    let emu = emulator(0);
    let (hq, hkv, d, page) = (8usize, 2usize, 64usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(2).1);
    let cache = PagedKvCache { num_pages: 5, page_size: page, kv_heads: hkv, head_dim: d };
    let mut r = rng(7);
    let kc = guard(&as_dtype::<bf16>(&uniform(&mut r, cache.len())).0);
    let vc = guard(&as_dtype::<bf16>(&uniform(&mut r, cache.len())).0);
    let (batch_n, seq_q, max_pages) = (3usize, 5usize, 4usize);
    let total_q = batch_n * seq_q;
    let batch = PagedPrefillBatch::contiguous(&p, batch_n, seq_q, total_q, max_pages);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, total_q * hq * d)).0);
    let cu = guard(&cu_seqlens(&[seq_q; 3]));
    let table = guard(&[0, 999, -3, i32::MAX, 4, 1, 2, 3, i32::MIN, -1, 5, 6]);
    for lens in [[i32::MAX, -5, 0], [64, 65, 1], [1, i32::MIN, 1000]] {
        let lens = guard(&lens);
        let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cu, k_cache: &kc, v_cache: &vc, block_table: &table, context_lens: &lens };
        for splits in [1usize, 2] {
            let (mut out, mut lse) = (GuardedBuf::filled(total_q * hq * d, bf16::ZERO), GuardedBuf::filled(total_q * hq, 0f32));
            let mut ws = GuardedBuf::filled(paged_prefill_workspace_len(&p, &batch, splits), 0f32);
            emu.attention_fwd_paged(&x, &mut out, &mut lse, &cache, &batch, &p, splits, Some(&mut ws), None).unwrap();
        }
        // Gathered: the rope kernel's gather reads the same table and lengths, with the workspace
        // sized for every table slot and for host bounds the lengths break (20 and 70 keys in
        // all: the sequences packed into them are cut, a later one to nothing).
        for total_context in [None, Some(20), Some(70)] {
            let batch = PagedPrefillBatch { total_context, ..batch };
            let (mut out, mut lse) = (GuardedBuf::filled(total_q * hq * d, bf16::ZERO), GuardedBuf::filled(total_q * hq, 0f32));
            let mut gws = GuardedBuf::filled(paged_prefill_gather_len(&p, &batch, &cache), bf16::ZERO);
            let path = emu.attention_fwd_paged(&x, &mut out, &mut lse, &cache, &batch, &p, 1, None, Some(&mut gws[..])).unwrap();
            assert_eq!(path, rope_attn::cuda::PagedPrefillPath::Gathered);
        }
    }
}

#[test]
fn rope_at_extreme_positions_stays_in_bounds() {
    let d = 96;
    let shape = RopeShape::contiguous(4, 2, 1, d);
    let mut r = rng(7);
    let mut q = guard(&as_dtype::<bf16>(&uniform(&mut r, 4 * 2 * d)).0);
    let mut k = guard(&as_dtype::<bf16>(&uniform(&mut r, 4 * d)).0);
    let rot = schedules(d, d / 2).remove(3).1;
    emulator(0).rope_inplace(&mut q, &mut k, &guard(&[i32::MIN, i32::MAX, -1, 0]), &shape, &rot).unwrap();
}
