//! Paged prefill (chunked prefill straight from a paged KV cache), run by the SIMT emulator
//! against the f64 reference over keys gathered through the block table: every head dim and rope
//! type with full and partial rotary, f16 and bf16, GQA, masks, ALiBi, ReRoPE and Leaky ReRoPE
//! (far keys rotated in shared memory), fresh prompts and chunks deep into their contexts, pages
//! of 16 and 7 handed out in shuffled order. Every buffer guarded.
//! Tolerance (Tolerance::attention): (2·score tolerance + eps_dtype)·max|v| for O, the score tolerance for LSE.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::paged::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{paged_prefill_splits, paged_prefill_workspace_len, AttentionBatch, Dtype, PagedPrefillBatch};
use rope_attn::emulator::{FwdInputs, GuardedBuf, PagedFwdInputs};
use rope_attn::{AttentionParams, Error};

fn run<T: Dtype>(case: usize, p: &AttentionParams, seq_q: &[usize], ctx: &[usize], page: usize, splits: usize) {
    let emu = emulator(500 + case as u64);
    let mut r = rng(500 + case as u64);
    let f = fill::<T>(&emu, p, ctx, page, &mut r);
    let tq: usize = seq_q.iter().sum();
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let batch = PagedPrefillBatch::contiguous(p, seq_q.len(), *seq_q.iter().max().unwrap(), tq, f.max_pages);
    let q = guard(&as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0);
    let cq = guard(&cu_seqlens(seq_q));
    let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cq, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let (mut out, mut lse) = (GuardedBuf::filled(tq * hq * d, T::default()), GuardedBuf::filled(hq * tq, 0f32));
    let mut ws = GuardedBuf::filled(paged_prefill_workspace_len(p, &batch, splits), 0f32);
    let rep = emu
        .attention_fwd_paged_checked(&x, &mut out, &mut lse, &f.cache, &batch, p, splits, Some(&mut ws))
        .unwrap_or_else(|e| panic!("case {case} {} d={d} {:?} {:?} q={seq_q:?} ctx={ctx:?} splits {splits}: {e}", T::NAME, p.relative, p.mask));
    assert!(rep.count > 0);
}

#[test]
fn emulated_paged_prefill_matches_reference() {
    let mut cases = 0;
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let p = prefill_case(case, d, rot, false, Scale::Emulator).p;
        // A fresh 1-token prompt, a chunk deep into its context, a fresh multi-tile prompt.
        let (seq_q, ctx) = ([1usize, 17, 70], [1usize, 17 + 40 + case, 70]);
        let page = [16usize, 7][case % 2];
        // Every third case splits the keys (two 64-key splits of the ~100-key table rows).
        let splits = if case % 3 == 2 { 2 } else { 1 };
        if case % 2 == 0 {
            run::<f16>(case, &p, &seq_q, &ctx, page, splits);
        } else {
            run::<bf16>(case, &p, &seq_q, &ctx, page, splits);
        }
        cases += 1;
    }
    assert_eq!(cases, 40);
}

/// Split keys: a few queries against long contexts (the case splitting is for), in up to 5
/// splits of the table's 800 keys, with the short sequence's later splits empty (lse = -inf
/// partials the combine must weigh zero); causal, window with sinks and none; ReRoPE too.
#[test]
fn emulated_paged_prefill_with_split_keys() {
    for (i, (mask, relative)) in [
        (rope_attn::Mask { causal: true, window: None, sinks: 0 }, rope_attn::Relative::None),
        (rope_attn::Mask { causal: true, window: Some(300), sinks: 4 }, rope_attn::Relative::None),
        (rope_attn::Mask { causal: false, window: None, sinks: 0 }, rope_attn::Relative::ReRope { window: 100 }),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = AttentionParams::new(4, 2, 64);
        p.rope = Some(schedules(64, 64).remove(6).1);
        p.alibi = Some(rope_attn::Alibi { total_heads: 4, head_offset: 0 });
        p.mask = mask;
        p.relative = relative;
        for splits in [1usize, 3, 5] {
            run::<bf16>(900 + i, &p, &[5, 20], &[790, 30], 16, splits);
        }
    }
}

/// Paged prefill of a fresh prompt is the contiguous (fused) prefill of the same keys, to the bit.
#[test]
fn emulated_paged_prefill_equals_contiguous_prefill() {
    let (hq, hkv, d, page) = (8usize, 2usize, 128usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.alibi = Some(rope_attn::Alibi { total_heads: hq, head_offset: 0 });
    let seqs = [45usize, 100];
    let emu = emulator(77);
    let mut r = rng(77);
    let f = fill::<bf16>(&emu, &p, &seqs, page, &mut r);
    let tq: usize = seqs.iter().sum();
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, tq * hq * d)).0);
    let cq = guard(&cu_seqlens(&seqs));
    // The same keys, contiguous: gathered from the cache.
    let row = hkv * d;
    let gather = |buf: &[bf16]| -> Vec<bf16> {
        let mut v = Vec::new();
        for (b, &n) in seqs.iter().enumerate() {
            for j in 0..n {
                let slot = f.table[b * f.max_pages + j / page] as usize * page + j % page;
                v.extend_from_slice(&buf[slot * row..(slot + 1) * row]);
            }
        }
        v
    };
    let (k, v) = (guard(&gather(&f.k_cache)), guard(&gather(&f.v_cache)));
    let (mut o1, mut l1) = (GuardedBuf::filled(tq * hq * d, bf16::ZERO), GuardedBuf::filled(hq * tq, 0f32));
    let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cq, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    emu.attention_fwd_paged(&x, &mut o1, &mut l1, &f.cache, &PagedPrefillBatch::contiguous(&p, 2, 100, tq, f.max_pages), &p, 1, None).unwrap();
    let (mut o2, mut l2) = (GuardedBuf::filled(tq * hq * d, bf16::ZERO), GuardedBuf::filled(hq * tq, 0f32));
    let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cq, cu_seqlens_k: &cq, seq_starts: None };
    emu.attention_fwd(&x, &mut o2, &mut l2, &AttentionBatch::contiguous(&p, 2, 100, tq, tq), &p, None).unwrap();
    assert!(o1.iter().zip(o2.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "outputs differ");
    assert!(l1.iter().zip(l2.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "LSEs differ");
}

/// f32 has no tensor-core path: refused with a typed error before any launch.
#[test]
fn paged_prefill_refuses_f32() {
    let p = AttentionParams::new(2, 2, 64);
    let cache = rope_attn::cuda::PagedKvCache { num_pages: 1, page_size: 16, kv_heads: 2, head_dim: 64 };
    let batch = PagedPrefillBatch::contiguous(&p, 1, 1, 1, 1);
    let lens = rope_attn::cuda::PagedFwdLens {
        q: 128,
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: 1,
        context_lens: 1,
        cu_seqlens_q: 2,
        out: 128,
        lse: 2,
        workspace: None,
    };
    assert!(matches!(batch.check::<f32>(&p, &cache, &lens, 1), Err(Error::DtypeMismatch { .. })));
    assert!(batch.check::<f16>(&p, &cache, &lens, 1).is_ok());
    let short = rope_attn::cuda::PagedFwdLens { block_table: 0, ..lens };
    assert!(matches!(batch.check::<f16>(&p, &cache, &short, 1), Err(Error::BufferTooSmall { what: "block_table", .. })));
}

/// Split planning: keys_per_split a multiple of 64 covering the table's keys, fewer splits than
/// asked for short tables, a workspace required past one split, splits = 0 refused; and the
/// heuristic: splits for few query tiles against long tables, none for long chunks.
#[test]
fn paged_prefill_split_plans() {
    let p = AttentionParams::new(32, 8, 128);
    let cache = rope_attn::cuda::PagedKvCache { num_pages: 4096, page_size: 16, kv_heads: 8, head_dim: 128 };
    let batch = PagedPrefillBatch::contiguous(&p, 1, 32, 32, 2048); // 32 queries, up to 32768 keys
    let lens = |ws: Option<usize>| rope_attn::cuda::PagedFwdLens {
        q: 32 * 32 * 128,
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: 2048,
        context_lens: 1,
        cu_seqlens_q: 2,
        out: 32 * 32 * 128,
        lse: 32 * 32,
        workspace: ws,
    };
    let need = paged_prefill_workspace_len(&p, &batch, 8);
    assert_eq!(need, 8 * 32 * 32 * 129);
    let plan = batch.check::<bf16>(&p, &cache, &lens(Some(need)), 8).unwrap();
    assert_eq!((plan.splits, plan.keys_per_split), (8, 4096));
    assert!(matches!(batch.check::<bf16>(&p, &cache, &lens(None), 8), Err(Error::BufferTooSmall { what: "paged prefill workspace", .. })));
    assert!(matches!(batch.check::<bf16>(&p, &cache, &lens(None), 0), Err(Error::Parameter { name: "splits", .. })));
    let short = PagedPrefillBatch { max_pages: 5, ..batch }; // 80 keys: two splits of 64 at most
    assert_eq!(short.check::<bf16>(&p, &cache, &lens(Some(need)), 8).unwrap().splits, 2);
    // 1 query tile x 32 heads on 132 SMs: 9 splits; a 4096-query chunk fills the machine alone.
    assert_eq!(paged_prefill_splits(&p, &batch, &cache, 132), 9);
    let long = PagedPrefillBatch::contiguous(&p, 1, 4096, 4096, 2048);
    assert_eq!(paged_prefill_splits(&p, &long, &cache, 132), 1);
}
