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
use rope_attn::cuda::{
    attention_fwd_workspace_len, paged_prefill_gather_len, paged_prefill_prefers_gather, paged_prefill_splits, paged_prefill_workspace_len,
    AttentionBatch, Dtype, PagedPrefillBatch, PagedPrefillPath, PrefillPath,
};
use rope_attn::emulator::{FwdInputs, GuardedBuf, PagedFwdInputs};
use rope_attn::{AttentionParams, Error};

/// One paged prefill, checked against the reference: fused, or (`gather`) through the gather
/// workspace, which runs gathered unless the case has ReRoPE.
fn run<T: Dtype>(case: usize, p: &AttentionParams, seq_q: &[usize], ctx: &[usize], page: usize, splits: usize, gather: bool) {
    let emu = emulator(500 + case as u64);
    let mut r = rng(500 + case as u64);
    let f = fill::<T>(&emu, p, ctx, page, &mut r);
    let tq: usize = seq_q.iter().sum();
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let mut batch = PagedPrefillBatch::contiguous(p, seq_q.len(), *seq_q.iter().max().unwrap(), tq, f.max_pages);
    if gather && case.is_multiple_of(2) {
        // The workspace sized to the contexts added up (the sequences packed, exactly: the guard
        // catches a row past the end), not every table slot (odd cases: a multiple of the page
        // per sequence, still packed).
        batch.total_context = Some(ctx.iter().sum());
    }
    let q = guard(&as_dtype::<T>(&uniform(&mut r, tq * hq * d)).0);
    let cq = guard(&cu_seqlens(seq_q));
    let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cq, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let (mut out, mut lse) = (GuardedBuf::filled(tq * hq * d, T::default()), GuardedBuf::filled(hq * tq, 0f32));
    let mut ws = GuardedBuf::filled(paged_prefill_workspace_len(p, &batch, splits), 0f32);
    let mut gws = GuardedBuf::filled(if gather { paged_prefill_gather_len(p, &batch, &f.cache) } else { 0 }, T::default());
    let rep = emu
        .attention_fwd_paged_checked(&x, &mut out, &mut lse, &f.cache, &batch, p, splits, Some(&mut ws), gather.then_some(&mut gws[..]))
        .unwrap_or_else(|e| {
            panic!("case {case} {} d={d} {:?} {:?} q={seq_q:?} ctx={ctx:?} splits {splits} gather {gather}: {e}", T::NAME, p.relative, p.mask)
        });
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
        // Every third case splits the keys (two 64-key splits of the ~100-key table rows); every
        // case runs fused and through the gather workspace (the wide kernel: 70 queries).
        let splits = if case % 3 == 2 { 2 } else { 1 };
        for gather in [false, true] {
            if case % 2 == 0 {
                run::<f16>(case, &p, &seq_q, &ctx, page, splits, gather);
            } else {
                run::<bf16>(case, &p, &seq_q, &ctx, page, splits, gather);
            }
        }
        cases += 1;
    }
    assert_eq!(cases, 48);
}

/// Split keys: a few queries against long contexts (the case splitting is for), in up to 5
/// splits of the table's 800 keys, with the short sequence's later splits empty (lse = -inf
/// partials the combine must weigh zero); causal, window with sinks and none; ReRoPE too.
#[test]
fn emulated_paged_prefill_with_split_keys() {
    for (i, (mask, relative)) in [
        (rope_attn::Mask { causal: true, window: None, sinks: 0, chunk: None }, rope_attn::Relative::None),
        (rope_attn::Mask { causal: true, window: Some(300), sinks: 4, chunk: None }, rope_attn::Relative::None),
        (rope_attn::Mask { causal: false, window: None, sinks: 0, chunk: None }, rope_attn::Relative::ReRope { window: 100 }),
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
            run::<bf16>(900 + i, &p, &[5, 20], &[790, 30], 16, splits, false);
        }
        // Gathered: the narrow kernel over the gathered keys (20 queries), in 3 splits and one.
        run::<bf16>(900 + i, &p, &[5, 20], &[790, 30], 16, 3, true);
        run::<bf16>(900 + i, &p, &[5, 20], &[790, 30], 16, 1, true);
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
    let batch = PagedPrefillBatch::contiguous(&p, 2, 100, tq, f.max_pages);
    let path = emu.attention_fwd_paged(&x, &mut o1, &mut l1, &f.cache, &batch, &p, 1, None, None).unwrap();
    assert_eq!(path, PagedPrefillPath::Fused);
    let (mut o2, mut l2) = (GuardedBuf::filled(tq * hq * d, bf16::ZERO), GuardedBuf::filled(hq * tq, 0f32));
    let xc = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cq, cu_seqlens_k: &cq, seq_starts: None };
    let cbatch = AttentionBatch::contiguous(&p, 2, 100, tq, tq);
    emu.attention_fwd(&xc, &mut o2, &mut l2, &cbatch, &p, None).unwrap();
    let same = |o1: &[bf16], o2: &[bf16], l1: &[f32], l2: &[f32], what: &str| {
        assert!(o1.iter().zip(o2).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: outputs differ");
        assert!(l1.iter().zip(l2).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: LSEs differ");
    };
    same(&o1, &o2, &l1, &l2, "fused");
    // Gathered: the rope kernel's gather is its pre-rotation of the same keys, and the same
    // (wide) kernel then runs, so the result is the contiguous pre-rotated prefill's.
    let mut gws = GuardedBuf::filled(paged_prefill_gather_len(&p, &batch, &f.cache), bf16::ZERO);
    let path = emu.attention_fwd_paged(&x, &mut o1, &mut l1, &f.cache, &batch, &p, 1, None, Some(&mut gws[..])).unwrap();
    assert_eq!(path, PagedPrefillPath::Gathered);
    let mut cws = GuardedBuf::filled(attention_fwd_workspace_len(&p, tq), bf16::ZERO);
    let cpath = emu.attention_fwd(&xc, &mut o2, &mut l2, &cbatch, &p, Some(&mut cws[..])).unwrap();
    assert_eq!(cpath, PrefillPath::PreRotated);
    same(&o1, &o2, &l1, &l2, "gathered");
    // Sized to the contexts added up, the workspace holds the sequences packed: its keys are the
    // pre-rotated workspace's, its values the contiguous ones, bit for bit, and nothing past them.
    let packed = PagedPrefillBatch { total_context: Some(tq), ..batch };
    let mut gws = GuardedBuf::filled(paged_prefill_gather_len(&p, &packed, &f.cache), bf16::ZERO);
    assert_eq!(gws.len(), 2 * tq * row);
    emu.attention_fwd_paged(&x, &mut o1, &mut l1, &f.cache, &packed, &p, 1, None, Some(&mut gws[..])).unwrap();
    same(&o1, &o2, &l1, &l2, "gathered, packed");
    let bits = |x: &[bf16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&gws[..tq * row]), bits(&cws[..]), "gathered keys");
    assert_eq!(bits(&gws[tq * row..]), bits(&v[..]), "gathered values");
    // A bound the lengths break cuts the last sequence's keys (its queries then end what is
    // left): memory-safe, and checked mode reports the wrong rows.
    let short = PagedPrefillBatch { total_context: Some(tq - 5), ..batch };
    let mut gws = GuardedBuf::filled(paged_prefill_gather_len(&p, &short, &f.cache), bf16::ZERO);
    let e = emu.attention_fwd_paged_checked(&x, &mut o1, &mut l1, &f.cache, &short, &p, 1, None, Some(&mut gws[..])).unwrap_err();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
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
        gather: None,
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
        gather: None,
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

/// The gather workspace: its length (K and V of every table slot, or of total_context keys), too
/// short refused, the gathered path split as asked over the keys it gathers, ReRoPE fused with
/// or without it, and the advice (long chunks without ReRoPE).
#[test]
fn paged_prefill_gather_plans() {
    let mut p = AttentionParams::new(32, 8, 128);
    let cache = rope_attn::cuda::PagedKvCache { num_pages: 4096, page_size: 16, kv_heads: 8, head_dim: 128 };
    let batch = PagedPrefillBatch::contiguous(&p, 2, 512, 600, 256); // up to 4096 keys a sequence
    let need = paged_prefill_gather_len(&p, &batch, &cache);
    assert_eq!(need, 2 * 2 * 4096 * 8 * 128);
    let split_ws = paged_prefill_workspace_len(&p, &batch, 4);
    let lens = |gather: Option<usize>| rope_attn::cuda::PagedFwdLens {
        q: 600 * 32 * 128,
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: 2 * 256,
        context_lens: 2,
        cu_seqlens_q: 3,
        out: 600 * 32 * 128,
        lse: 32 * 600,
        workspace: Some(split_ws),
        gather,
    };
    // Splits as the fused path has them, over the keys gathered (here the table's 4096).
    let plan = batch.check::<bf16>(&p, &cache, &lens(Some(need)), 4).unwrap();
    assert_eq!((plan.path, plan.splits, plan.keys_per_split), (PagedPrefillPath::Gathered, 4, 1024));
    assert_eq!(batch.check::<bf16>(&p, &cache, &lens(Some(need)), 1).unwrap().splits, 1);
    assert!(matches!(
        batch.check::<bf16>(&p, &cache, &lens(Some(need - 1)), 1),
        Err(Error::BufferTooSmall { what: "paged prefill gather workspace", .. })
    ));
    assert_eq!(batch.check::<bf16>(&p, &cache, &lens(None), 4).unwrap().path, PagedPrefillPath::Fused);
    // A table row whose keys overflow the kernels' i32 (the block table's length fits one).
    let wide = PagedPrefillBatch { batch: 1, max_pages: 1 << 27, ..batch };
    let wide_lens = rope_attn::cuda::PagedFwdLens { block_table: 1 << 27, ..lens(None) };
    assert!(matches!(wide.check::<bf16>(&p, &cache, &wide_lens, 1), Err(Error::Position { what: "max_pages * page_size", .. })));
    // A host bound on the contexts added up sizes it instead of every table slot (never more
    // than those).
    let bounded = PagedPrefillBatch { total_context: Some(1000), ..batch };
    assert_eq!(paged_prefill_gather_len(&p, &bounded, &cache), 2 * 1000 * 8 * 128);
    assert_eq!(paged_prefill_gather_len(&p, &PagedPrefillBatch { total_context: Some(1 << 20), ..batch }, &cache), need);
    assert!(bounded.check::<bf16>(&p, &cache, &lens(Some(2 * 1000 * 8 * 128)), 1).is_ok());
    assert!(bounded.check::<bf16>(&p, &cache, &lens(Some(2 * 1000 * 8 * 128 - 1)), 1).is_err());
    // No sequence holds more than 1000 keys then: 4 splits of 256 (a multiple of 64).
    let plan = bounded.check::<bf16>(&p, &cache, &lens(Some(2 * 1000 * 8 * 128)), 4).unwrap();
    assert_eq!((plan.splits, plan.keys_per_split), (4, 256));
    // A bound past one table row (4096 keys): a sequence still holds at most the row.
    let wide = PagedPrefillBatch { total_context: Some(6000), ..batch };
    let plan = wide.check::<bf16>(&p, &cache, &lens(Some(2 * 6000 * 8 * 128)), 4).unwrap();
    assert_eq!((plan.splits, plan.keys_per_split), (4, 1024));
    assert!(paged_prefill_prefers_gather(&p, &batch));
    assert!(!paged_prefill_prefers_gather(&p, &PagedPrefillBatch::contiguous(&p, 2, 64, 100, 256)));
    p.rope = Some(schedules(128, 128).remove(6).1);
    p.relative = rope_attn::Relative::ReRope { window: 512 };
    assert!(!paged_prefill_prefers_gather(&p, &batch));
    assert_eq!(batch.check::<bf16>(&p, &cache, &lens(Some(need)), 4).unwrap().path, PagedPrefillPath::Fused);
}

/// Many sequences: the gather shares its blocks out (16 a sequence at 128 sequences), so each
/// block strides over several keys, rewriting its angles between them. Partial rotary (the
/// pass-through components copied beside the rotated ones), mixed lengths, a sliding window;
/// then without RoPE.
#[test]
fn emulated_paged_prefill_gathers_many_sequences() {
    let mut p = AttentionParams::new(4, 2, 64);
    p.rope = Some(schedules(64, 32).remove(6).1);
    p.mask = rope_attn::Mask { causal: true, window: Some(40), sinks: 2, chunk: None };
    let n = 128;
    let seq_q: Vec<usize> = (0..n).map(|b| 1 + b % 3).collect();
    let ctx: Vec<usize> = (0..n).map(|b| seq_q[b] + 30 + (b * 37) % 70).collect();
    run::<bf16>(950, &p, &seq_q, &ctx, 16, 1, true);
    // No RoPE (ALiBi instead): the gather only copies, K whole as pass-through components.
    p.rope = None;
    p.alibi = Some(rope_attn::Alibi { total_heads: 4, head_offset: 0 });
    run::<f16>(951, &p, &seq_q[..40], &ctx[..40], 16, 1, true);
    run::<f16>(951, &p, &seq_q[..40], &ctx[..40], 16, 1, false);
}

/// A gather workspace that does not start on a 16-byte boundary is refused before any launch.
#[test]
fn paged_prefill_refuses_a_misaligned_gather_workspace() {
    let mut p = AttentionParams::new(2, 1, 64);
    p.rope = Some(schedules(64, 64).remove(0).1);
    let emu = emulator(5);
    let mut r = rng(5);
    let f = fill::<bf16>(&emu, &p, &[70], 16, &mut r);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, 70 * 2 * 64)).0);
    let cq = guard(&cu_seqlens(&[70]));
    let x = PagedFwdInputs { q: &q, cu_seqlens_q: &cq, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let batch = PagedPrefillBatch::contiguous(&p, 1, 70, 70, f.max_pages);
    let (mut out, mut lse) = (GuardedBuf::filled(70 * 2 * 64, bf16::ZERO), GuardedBuf::filled(2 * 70, 0f32));
    let mut gws = GuardedBuf::filled(paged_prefill_gather_len(&p, &batch, &f.cache) + 1, bf16::ZERO);
    let e = emu.attention_fwd_paged(&x, &mut out, &mut lse, &f.cache, &batch, &p, 1, None, Some(&mut gws[1..])).unwrap_err();
    assert!(matches!(e, Error::Shape { what: "gather workspace pointer", .. }), "{e}");
}
