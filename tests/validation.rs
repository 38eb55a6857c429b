//! Bad input is refused with a typed error before any launch. The launchers run exactly these
//! `check` functions first, so testing them needs no GPU.

use half::bf16;
use rope_attn::cuda::{AttentionBatch, DecodeBatch, DecodeLens, FwdLens, PagedKvCache, PrefillPath, RopeShape, ScoresShape};
use rope_attn::{Alibi, AttentionParams, Error, Layout, Relative, RopeSchedule, Rotary};

fn rot(d: usize) -> Rotary {
    Rotary::from_schedule(&RopeSchedule::plain(10000.0, d).unwrap(), Layout::Half)
}

fn params(hq: usize, hkv: usize, d: usize) -> AttentionParams {
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rot(d));
    p
}

#[test]
fn rope_shape_errors() {
    let s = RopeShape::contiguous(4, 2, 1, 64);
    let ok = s.check(4 * 2 * 64, 4 * 64, 4, &rot(64));
    assert_eq!(ok, Ok(()));
    // odd / oversized rotary dim
    let mut odd = rot(64);
    odd.rotary_dim = 63;
    assert!(matches!(s.check(512, 256, 4, &odd), Err(Error::RotaryDim { rotary_dim: 63, .. })));
    // frequencies of the wrong length
    let mut short = rot(64);
    short.inv_freq.pop();
    assert!(matches!(s.check(512, 256, 4, &short), Err(Error::Shape { what: "inv_freq", .. })));
    // NaN attention factor / frequency
    let mut nan = rot(64);
    nan.attention_factor = f64::NAN;
    assert!(matches!(s.check(512, 256, 4, &nan), Err(Error::Parameter { name: "attention_factor", .. })));
    let mut nanf = rot(64);
    nanf.inv_freq[3] = f64::NAN;
    assert!(matches!(s.check(512, 256, 4, &nanf), Err(Error::Parameter { name: "inv_freq", .. })));
    // buffers too small, stride too small, odd stride, too few positions
    assert!(matches!(s.check(511, 256, 4, &rot(64)), Err(Error::BufferTooSmall { what: "q", needed: 512, got: 511 })));
    assert!(matches!(s.check(512, 255, 4, &rot(64)), Err(Error::BufferTooSmall { what: "k", .. })));
    assert!(matches!(s.check(512, 256, 3, &rot(64)), Err(Error::BufferTooSmall { what: "positions", .. })));
    let narrow = RopeShape { q_row_stride: 100, ..s };
    assert!(matches!(narrow.check(4096, 256, 4, &rot(64)), Err(Error::Stride { what: "q", stride: 100, min: 128 })));
    let odd_stride = RopeShape { q_row_stride: 129, ..s };
    assert!(matches!(odd_stride.check(4096, 256, 4, &rot(64)), Err(Error::Stride { what: "q", .. })));
    // more tokens than an i32 grid dimension holds
    let huge = RopeShape::contiguous(3_000_000_000, 1, 1, 2);
    assert!(matches!(huge.check(usize::MAX / 4, usize::MAX / 4, usize::MAX / 4, &rot(2)), Err(Error::Position { what: "tokens", .. })));
    // 256 turning pairs: the kernels hold 128 frequencies (pairs past them must not turn)
    let big = RopeShape::contiguous(1, 1, 1, 512);
    assert!(matches!(big.check(512, 512, 1, &rot(512)), Err(Error::Parameter { name: "inv_freq", .. })));
    let mut proportional = rot(512);
    proportional.inv_freq[128..].iter_mut().for_each(|f| *f = 0.0);
    assert_eq!(big.check(512, 512, 1, &proportional), Ok(()));
    // rotary dim beyond 512
    let huge_d = RopeShape::contiguous(1, 1, 1, 1024);
    assert!(matches!(huge_d.check(1024, 1024, 1, &rot(1024)), Err(Error::RotaryDim { rotary_dim: 1024, .. })));
}

#[test]
fn attention_params_errors() {
    let d = 128;
    let shape = ScoresShape { nq: 4, nk: 4, q_row_stride: 8 * d, k_row_stride: 2 * d, q_offset: 0 };
    let good = params(8, 2, d);
    assert_eq!(shape.check(&good, 4 * 8 * d, 4 * 2 * d, 8 * 16), Ok(()));
    // head_dim not instantiated
    let p = params(8, 2, 72);
    let s72 = ScoresShape::contiguous(&p, 4, 4, 0);
    assert!(matches!(s72.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::UnsupportedHeadDim { head_dim: 72, .. })));
    // GQA ratio not integral, zero heads
    for (hq, hkv) in [(8, 3), (8, 0), (0, 1)] {
        let p = params(hq, hkv, d);
        assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::GqaRatio { .. })), "{hq}/{hkv}");
    }
    // NaN scale, ReRoPE without RoPE, zero window, leak k <= 1, ALiBi heads out of range
    let mut p = good.clone();
    p.scale = Some(f64::NAN);
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Parameter { name: "scale", .. })));
    let mut p = good.clone();
    p.rope = None;
    p.relative = Relative::ReRope { window: 4 };
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Parameter { name: "relative", .. })));
    let mut p = good.clone();
    p.relative = Relative::ReRope { window: 0 };
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Parameter { name: "rerope window", .. })));
    let mut p = good.clone();
    p.relative = Relative::Leaky { window: 4, k: 1.0 };
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Parameter { name: "leaky k", .. })));
    let mut p = good.clone();
    p.alibi = Some(Alibi { total_heads: 8, head_offset: 4 });
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Shape { what: "alibi heads", .. })));
    let mut p = good.clone();
    p.mask.window = Some(0);
    assert!(matches!(shape.check(&p, 1 << 20, 1 << 20, 1 << 20), Err(Error::Parameter { name: "window", .. })));
    // score buffer too small
    assert!(matches!(shape.check(&good, 4 * 8 * d, 4 * 2 * d, 8 * 16 - 1), Err(Error::BufferTooSmall { what: "scores out", .. })));
}

fn fwd_lens(p: &AttentionParams, b: &AttentionBatch, ws: Option<usize>) -> FwdLens {
    FwdLens {
        q: b.total_q * p.num_q_heads * p.head_dim,
        k: b.total_k * p.num_kv_heads * p.head_dim,
        v: b.total_k * p.num_kv_heads * p.head_dim,
        out: b.total_q * p.num_q_heads * p.head_dim,
        lse: b.total_q * p.num_q_heads,
        cu_seqlens_q: b.batch + 1,
        cu_seqlens_k: b.batch + 1,
        workspace: ws,
    }
}

#[test]
fn prefill_paths_and_errors() {
    let p = params(8, 2, 128);
    let b = AttentionBatch::contiguous(&p, 3, 100, 150, 150);
    let ws = rope_attn::cuda::attention_fwd_workspace_len(&p, 150);
    assert_eq!(ws, 150 * 2 * 128);
    assert_eq!(b.check::<bf16>(&p, &fwd_lens(&p, &b, None)), Ok(PrefillPath::Fused));
    assert_eq!(b.check::<bf16>(&p, &fwd_lens(&p, &b, Some(ws))), Ok(PrefillPath::PreRotated));
    let mut plain = p.clone();
    plain.rope = None;
    assert_eq!(b.check::<bf16>(&plain, &fwd_lens(&plain, &b, None)), Ok(PrefillPath::Plain));
    // f32 and ReRoPE need the workspace; a short one is refused
    assert!(matches!(b.check::<f32>(&p, &fwd_lens(&p, &b, None)), Err(Error::BufferTooSmall { needed, .. }) if needed == ws));
    let mut re = p.clone();
    re.relative = Relative::Leaky { window: 8, k: 2.0 };
    assert!(matches!(b.check::<bf16>(&re, &fwd_lens(&re, &b, None)), Err(Error::BufferTooSmall { .. })));
    assert!(matches!(b.check::<bf16>(&re, &fwd_lens(&re, &b, Some(ws))), Err(Error::BufferTooSmall { needed, .. }) if needed == 2 * ws));
    // cu_seqlens too short, lse too short, max_seqlen_q inconsistent
    let mut l = fwd_lens(&p, &b, None);
    l.cu_seqlens_k = 3;
    assert!(matches!(b.check::<bf16>(&p, &l), Err(Error::BufferTooSmall { what: "cu_seqlens_k", .. })));
    let mut l = fwd_lens(&p, &b, None);
    l.lse -= 1;
    assert!(matches!(b.check::<bf16>(&p, &l), Err(Error::BufferTooSmall { what: "lse", .. })));
    let bad = AttentionBatch { max_seqlen_q: 151, ..b };
    assert!(matches!(bad.check::<bf16>(&p, &fwd_lens(&p, &bad, None)), Err(Error::Shape { what: "max_seqlen_q", .. })));
    // a K row stride that breaks 16-byte cp.async alignment for 16-bit types (fine for f32)
    let odd = AttentionBatch { k_row_stride: 2 * 128 + 4, ..b };
    let mut l = fwd_lens(&p, &odd, Some(ws));
    l.k = 1 << 20;
    assert!(matches!(odd.check::<bf16>(&p, &l), Err(Error::Stride { what: "k", .. })));
    assert_eq!(odd.check::<f32>(&p, &l), Ok(PrefillPath::PreRotated));
}

#[test]
fn decode_plans_and_errors() {
    let p = params(32, 8, 128);
    let cache = PagedKvCache { num_pages: 1024, page_size: 16, kv_heads: 8, head_dim: 128 };
    let b = DecodeBatch::contiguous(&p, 4, 1, 256, 4000);
    let lens = |ws: Option<usize>| DecodeLens {
        q: 4 * 32 * 128,
        k_cache: cache.len(),
        v_cache: cache.len(),
        block_table: 4 * 256,
        context_lens: 4,
        out: 4 * 32 * 128,
        lse: 4 * 32,
        workspace: ws,
    };
    let one = b.check(&p, &cache, &lens(None), 1).unwrap();
    assert_eq!((one.splits, one.keys_per_split), (1, 4000usize.div_ceil(32) * 32));
    let need = rope_attn::cuda::decode_workspace_len(&p, &b, 8);
    let eight = b.check(&p, &cache, &lens(Some(need)), 8).unwrap();
    assert_eq!(eight.splits, 8);
    assert!(eight.keys_per_split * 8 >= 4000 && eight.keys_per_split.is_multiple_of(32));
    assert!(matches!(b.check(&p, &cache, &lens(None), 8), Err(Error::BufferTooSmall { what: "decode workspace", .. })));
    assert!(matches!(b.check(&p, &cache, &lens(None), 0), Err(Error::Parameter { name: "splits", .. })));
    for queries in [0, 17] {
        let bq = DecodeBatch { queries, ..b };
        assert!(matches!(bq.check(&p, &cache, &lens(None), 1), Err(Error::Shape { what: "decode queries", .. })));
    }
    // A table row whose keys overflow the kernels' i32 (the block table's length fits one).
    let wide = DecodeBatch { max_pages: 1 << 27, batch: 1, ..b };
    let wide_lens = DecodeLens { block_table: 1 << 27, ..lens(None) };
    assert!(matches!(wide.check(&p, &cache, &wide_lens, 1), Err(Error::Position { what: "max_pages * page_size", .. })));
    let long = DecodeBatch { max_context: 256 * 16 + 1, ..b };
    assert!(matches!(long.check(&p, &cache, &lens(None), 1), Err(Error::Position { what: "max_context", .. })));
    let wrong = PagedKvCache { kv_heads: 4, ..cache };
    assert!(matches!(b.check(&p, &wrong, &lens(None), 1), Err(Error::Shape { what: "paged cache", .. })));
    let mut short = lens(None);
    short.block_table -= 1;
    assert!(matches!(b.check(&p, &cache, &short, 1), Err(Error::BufferTooSmall { what: "block_table", .. })));
    // a short context takes fewer splits than asked
    let tiny = DecodeBatch { max_context: 40, ..b };
    let plan = tiny.check(&p, &cache, &lens(Some(need)), 8).unwrap();
    assert_eq!(plan.splits, 2);
    // Under a sliding window the splits share out the keys the window shows (window + queries - 1),
    // not the context: 8 splits of 4000 keys, but of a 1000-key window 8 x 128.
    let mut pw = p.clone();
    pw.mask.window = Some(1000);
    let windowed = b.check(&pw, &cache, &lens(Some(need)), 8).unwrap();
    assert_eq!((windowed.splits, windowed.keys_per_split), (8, 128));
    // decode_splits sizes from the same span: one sequence x 8 KV heads = 8 blocks per split on
    // 132 SMs wants 33 splits; the window's 1000 keys allow 4 of >= 256.
    let one_seq = DecodeBatch::contiguous(&p, 1, 1, 256, 4000);
    assert_eq!(rope_attn::cuda::decode_splits(&p, &one_seq, 132), 16);
    assert_eq!(rope_attn::cuda::decode_splits(&pw, &one_seq, 132), 4);
}

/// Learned sinks: one finite logit per query head (f32-representable), at most 128 heads per
/// GPU launch; refused before any launch.
#[test]
fn learned_sinks_are_validated() {
    let mut p = rope_attn::AttentionParams::new(4, 2, 64);
    p.sink_logits = Some(vec![0.0; 3]);
    assert!(matches!(p.validate(), Err(Error::Shape { what: "sink_logits", .. })));
    for bad in [f64::NAN, f64::INFINITY, 1e39] {
        p.sink_logits = Some(vec![0.0, bad, 0.0, 0.0]);
        assert!(matches!(p.validate(), Err(Error::Parameter { name: "sink_logits", .. })), "{bad}");
    }
    p.sink_logits = Some(vec![-2.0, 0.0, 1.5, 30.0]);
    p.validate().unwrap();
}

/// Soft-capping: a finite cap > 0 whose scale / cap is a normal f32.
#[test]
fn softcap_is_validated() {
    let mut p = rope_attn::AttentionParams::new(4, 2, 64);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
        p.softcap = Some(bad);
        assert!(matches!(p.validate(), Err(Error::Parameter { name: "softcap", .. })), "{bad}");
    }
    p.softcap = Some(50.0);
    p.validate().unwrap();
}
