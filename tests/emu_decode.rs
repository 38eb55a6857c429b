//! Paged decode (split-K and its combine step) and the paged append kernel, run by the SIMT
//! emulator (the real kernel source on the CPU) against the f64 reference: the sweep of
//! tests/gpu_decode.rs at emulator-sized contexts, and decode agreeing with prefill step by step.
//! Tolerance (Tolerance::attention), twice it where two kernels each round O once.
#![cfg(feature = "emulator")]

mod common;

use common::cases::*;
use common::paged::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{
    decode_base_steps, decode_workspace_len, max_abs, AttentionBatch, CheckReport, DecodeBatch, Dtype, PagedKvCache, RopeShape, Tolerance,
};
use rope_attn::emulator::{DecodeInputs, Emulator, FwdInputs, GuardedBuf};
use rope_attn::{Alibi, AttentionParams, Error};

fn sweep<T: Dtype>(seed: u64) -> usize {
    let emu = emulator(seed);
    let mut r = rng(seed);
    let mut cases = 0;
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let DecodeCase { p, queries, page, ctx } = decode_case(case, d, rot, Scale::Emulator);
        let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
        let f = fill::<T>(&emu, &p, &ctx, page, &mut r);
        let tokens = ctx.len() * queries;
        let batch = DecodeBatch::contiguous(&p, ctx.len(), queries, f.max_pages, *ctx.iter().max().unwrap());
        let q = guard(&as_dtype::<T>(&uniform(&mut r, tokens * hq * d)).0);
        let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
        for splits in [1usize, 3] {
            let (mut out, mut lse) = (GuardedBuf::filled(tokens * hq * d, T::default()), GuardedBuf::filled(tokens * hq, 0f32));
            let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
            emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
                .unwrap_or_else(|e| panic!("{} d={d} hq={hq}/{hkv} queries={queries} splits={splits} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
            cases += 1;
        }
    }
    cases
}

#[test]
fn emulated_decode_matches_reference_f32() {
    assert_eq!(sweep::<f32>(1000), 6 * 8 * 2);
}

#[test]
fn emulated_decode_matches_reference_f16() {
    assert_eq!(sweep::<f16>(2000), 6 * 8 * 2);
}

#[test]
fn emulated_decode_matches_reference_bf16() {
    assert_eq!(sweep::<bf16>(3000), 6 * 8 * 2);
}

/// Decoding token by token over a cache reproduces the last rows of a prefill of the whole
/// sequence (llama3 RoPE + ALiBi, GQA 4).
#[test]
fn emulated_decode_reproduces_prefill_rows() {
    let emu = emulator(0);
    let (n, hq, hkv, d, page) = (150usize, 8usize, 2usize, 128usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let mut r = rng(77);
    let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, n * hq * d));
    let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
    let (mut pre_o, mut pre_l) = (vec![bf16::ZERO; n * hq * d], vec![0f32; n * hq]);
    let cu = [0i32, n as i32];
    let x = FwdInputs { q: &q, k: &k, v: &v, cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
    emu.attention_fwd(&x, &mut pre_o, &mut pre_l, &AttentionBatch::single(&p, n, n), &p, None).unwrap();

    let max_pages = n.div_ceil(page);
    let cache = PagedKvCache { num_pages: max_pages, page_size: page, kv_heads: hkv, head_dim: d };
    let table: Vec<i32> = (0..max_pages as i32).rev().collect();
    let (mut kc, mut vc) = (vec![bf16::ZERO; cache.len()], vec![bf16::ZERO; cache.len()]);
    let row = hkv * d;
    let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    for t in 0..n {
        let slot = [table[t / page] * page as i32 + (t % page) as i32];
        emu.paged_append(&k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row], &mut kc, &mut vc, &slot, 1, row, row, &cache).unwrap();
        if t < n - 12 {
            continue; // compare the last 12 steps
        }
        let lens = [(t + 1) as i32];
        let batch = DecodeBatch::contiguous(&p, 1, 1, max_pages, t + 1);
        let (mut o, mut l) = (vec![bf16::ZERO; hq * d], vec![0f32; hq]);
        let xd = DecodeInputs { q: &q[t * hq * d..(t + 1) * hq * d], k_cache: &kc, v_cache: &vc, block_table: &table, context_lens: &lens };
        emu.attention_decode(&xd, &mut o, &mut l, &cache, &batch, &p, 1, None).unwrap();
        let got_o: Vec<f64> = o.iter().map(|x| x.to_f64()).collect();
        let want_o: Vec<f64> = pre_o[t * hq * d..(t + 1) * hq * d].iter().map(|x| x.to_f64()).collect();
        let got_l: Vec<f64> = l.iter().map(|&x| x as f64).collect();
        let want_l: Vec<f64> = (0..hq).map(|h| pre_l[h * n + t] as f64).collect();
        let rep = CheckReport::compare("decode vs prefill out", &got_o, &want_o, tol_o.times(2.0))
            .worst(CheckReport::compare("decode vs prefill lse", &got_l, &want_l, tol_l.times(2.0)));
        assert!(rep.passed(), "step {t}: {rep:?}");
    }
}

/// A slot of -1 or past the pool is skipped: nothing else in the cache changes.
#[test]
fn emulated_append_skips_bad_slots() {
    let cache = PagedKvCache { num_pages: 2, page_size: 4, kv_heads: 1, head_dim: 64 };
    let k: Vec<f16> = (0..3 * 64).map(|i| f16::from_f32(i as f32)).collect();
    let (mut kc, mut vc) = (vec![f16::ZERO; cache.len()], vec![f16::ZERO; cache.len()]);
    emulator(0).paged_append(&k, &k, &mut kc, &mut vc, &[5, -1, 8], 3, 64, 64, &cache).unwrap();
    for s in 0..8 {
        let want: Vec<f16> = if s == 5 { k[..64].to_vec() } else { vec![f16::ZERO; 64] };
        assert_eq!(&kc[s * 64..(s + 1) * 64], &want[..], "slot {s}");
        assert_eq!(&vc[s * 64..(s + 1) * 64], &want[..], "slot {s}");
    }
}

/// Gemma 3n's and Gemma 4's V norm fused into the append: every V head cached as the f64
/// reference's RMS norm without weights within one rounding of the dtype (and f32's rsqrt), K
/// cached bit for bit; V rows read at a stride (a packed KV projection); a skipped slot stays
/// empty; an epsilon that is not positive in f32 is refused before launch.
#[test]
fn emulated_append_normalises_v() {
    fn case<T: Dtype>(emu: &Emulator, d: usize, seed: u64) {
        let (hkv, tokens, stride) = (3usize, 5usize, 3 * d + 8);
        let cache = PagedKvCache { num_pages: 3, page_size: 4, kv_heads: hkv, head_dim: d };
        let mut r = rng(seed);
        let row = hkv * d;
        let (k, _) = as_dtype::<T>(&uniform(&mut r, tokens * row));
        // V rows `stride` apart, scaled up so the norm moves them.
        let (v, vf) = as_dtype::<T>(&uniform(&mut r, tokens * stride).iter().map(|x| 5.0 * x).collect::<Vec<f64>>());
        let slots = [7i32, -1, 0, 11, 4];
        let (mut kc, mut vc) = (vec![T::default(); cache.len()], vec![T::default(); cache.len()]);
        let eps = 1e-6;
        emu.paged_append_v_normed(&k, &v, &mut kc, &mut vc, &slots, tokens, row, stride, &cache, eps).unwrap();
        for (t, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let s = slot as usize;
            assert!(kc[s * row..(s + 1) * row].iter().zip(&k[t * row..(t + 1) * row]).all(|(a, b)| a.to_f64() == b.to_f64()), "{} d={d}: K of token {t}", T::NAME);
            let mut want = vf[t * stride..t * stride + row].to_vec();
            rope_attn::reference::qk_norm_row(&mut want, d, eps, rope_attn::NormScope::Head, None).unwrap();
            for (c, (g, w)) in vc[s * row..(s + 1) * row].iter().zip(&want).enumerate() {
                let tol = (T::EPS + 1e-6) * w.abs() + 1e-7;
                assert!((g.to_f64() - w).abs() <= tol, "{} d={d}: V of token {t}, element {c}: {} vs {w}", T::NAME, g.to_f64());
            }
        }
        // Slots 1..=3 (pages 0's tail) were never written: token 1's slot was skipped.
        assert!(vc[row..4 * row].iter().all(|x| x.to_f64() == 0.0), "{} d={d}: unwritten slots", T::NAME);
        for bad in [0.0, -1e-6, f64::NAN, 1e-50] {
            let err = emu.paged_append_v_normed(&k, &v, &mut kc, &mut vc, &slots, tokens, row, stride, &cache, bad).unwrap_err();
            assert!(matches!(err, Error::Parameter { name: "v_norm eps", .. }), "{bad}: {err:?}");
        }
    }
    let emu = emulator(0);
    for (i, &d) in rope_attn::cuda::SUPPORTED_HEAD_DIMS.iter().enumerate() {
        case::<f16>(&emu, d, 900 + i as u64);
        case::<bf16>(&emu, d, 910 + i as u64);
        case::<f32>(&emu, d, 920 + i as u64);
    }
}

/// Decode rotates cached keys by composition (kernels/tile.cuh): the trigonometry per key and
/// rotation pair must stay far below the one sincos a direct rotation costs — counted by the
/// emulator, since no GPU timing is available to show it. Also pins the bytes streamed: each
/// cached K and V element once, plus Q.
#[test]
fn emulated_decode_does_little_trigonometry_per_key() {
    let (hq, hkv, d, page, ctx) = (4usize, 1usize, 128usize, 16usize, 1024usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    let emu = emulator(9);
    let mut r = rng(9);
    let f = fill::<bf16>(&emu, &p, &[ctx], page, &mut r);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, hq * d)).0);
    let batch = DecodeBatch::contiguous(&p, 1, 1, f.max_pages, ctx);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let (mut out, mut lse) = (GuardedBuf::filled(hq * d, bf16::ZERO), GuardedBuf::filled(hq, 0f32));
    emu.take_work();
    emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, 1, None).unwrap();
    let w = emu.take_work();
    let pairs = (ctx * d / 2) as f64;
    println!("decode of {ctx} keys: {w:?}, {:.3} sincos per key and pair", w.trig as f64 / pairs);
    assert!((w.trig as f64) < pairs / 6.0, "{} sincos for {pairs} key-pairs", w.trig);
    // K and V streamed once through cp.async (Q and the output are scalar accesses, uncounted).
    assert_eq!(w.global_bytes as usize, 2 * ctx * hkv * d * 2, "{w:?}");
}

/// The tensor-core decode's base steps (kernels/attention_decode_mma.cu): where a warp runs
/// enough tiles and the table costs the SM no resident block, each warp evaluates one exact
/// anchor per 4 or 8 of its tiles and takes the tiles' bases from a table of exact steps. Over
/// every rotation the kernel has (rotate_half and interleaved in registers, partial rotate_half
/// in shared memory, ReRoPE), with a window and sinks whose jump lands inside a group, split or
/// not: checked against the f64 reference on an H100's shared memory (steps) and an A100's (at
/// head_dim 128 none: its two blocks per SM leave no byte for the table).
#[test]
fn emulated_decode_base_steps_match_reference() {
    let (hq, page) = (8usize, 16usize);
    let mut r = rng(41);
    let mut runs = 0;
    for (d, case) in BASE_STEP_CASES {
        let (p, ctx) = base_steps_case(d, case);
        let emu = emulator(41 + case as u64);
        let f = fill::<bf16>(&emu, &p, &[ctx, 37], page, &mut r);
        let batch = DecodeBatch::contiguous(&p, 2, 2, f.max_pages, ctx);
        let q = guard(&as_dtype::<bf16>(&uniform(&mut r, 4 * hq * d)).0);
        let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
        for splits in [1usize, 2] {
            let h100 = decode_base_steps::<bf16>(&p, &batch, splits, Emulator::H100_SMEM_PER_SM);
            let a100 = decode_base_steps::<bf16>(&p, &batch, splits, Emulator::A100_SMEM_PER_SM);
            // (Under the window 257 keys are shared out: 5 tiles per warp in one split, 3 in two.)
            let want = match (case, splits) {
                (4, 1) => 4,
                (4, _) => 1,
                (_, 1) => 8,
                _ => 4,
            };
            assert_eq!(h100, want, "d={d} case {case} splits {splits}");
            // (ReRoPE's far copies already hold an A100 to one block: the table costs none.)
            assert_eq!(a100, if d == 128 && case != 3 { 1 } else { want }, "d={d} case {case} splits {splits}");
            for smem in [Emulator::H100_SMEM_PER_SM, Emulator::A100_SMEM_PER_SM] {
                let emu = emulator(41 + case as u64).with_smem_per_sm(smem);
                let (mut out, mut lse) = (GuardedBuf::filled(4 * hq * d, bf16::ZERO), GuardedBuf::filled(4 * hq, 0f32));
                let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
                emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
                    .unwrap_or_else(|e| panic!("d={d} case {case} splits {splits} smem {smem}: {e}"));
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 24);
}

/// What the base steps save, counted: at head_dim 128 over 1024 keys in one split each of the
/// four warps runs 16 tiles. Direct bases cost 64 sincos per tile (one per pair); with 8 steps
/// a warp evaluates two anchors (64 each), and the block its table of 2 x 8 rows once.
#[test]
fn emulated_decode_base_steps_save_trigonometry() {
    let (hq, hkv, d, page, ctx) = (4usize, 1usize, 128usize, 16usize, 1024usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(6).1);
    let mut r = rng(42);
    let f = fill::<bf16>(&emulator(42), &p, &[ctx], page, &mut r);
    let q = guard(&as_dtype::<bf16>(&uniform(&mut r, hq * d)).0);
    let batch = DecodeBatch::contiguous(&p, 1, 1, f.max_pages, ctx);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let mut trig = Vec::new();
    for smem in [Emulator::A100_SMEM_PER_SM, Emulator::H100_SMEM_PER_SM] {
        let emu = emulator(42).with_smem_per_sm(smem);
        let (mut out, mut lse) = (GuardedBuf::filled(hq * d, bf16::ZERO), GuardedBuf::filled(hq, 0f32));
        emu.take_work();
        emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, 1, None).unwrap();
        trig.push(emu.take_work().trig);
    }
    assert_eq!(decode_base_steps::<bf16>(&p, &batch, 1, Emulator::H100_SMEM_PER_SM), 8);
    let half = (d / 2) as u64;
    let (tiles, anchors, table) = (64 * half, 4 * 2 * half, 2 * 8 * half);
    assert_eq!(trig[0] - trig[1], tiles - anchors - table, "{trig:?}");
}

/// A sliding window with sinks over a long context: decode reads only the key tiles some query
/// sees (the sinks' tile and the window's), not the whole cache. 1024 keys, window 100, 4
/// sinks, one query at 1023: keys 0..4 and 924..1024, i.e. tiles 0 and 57..=63 of 16 keys (the
/// decode tile at head_dim 64, 16-bit): 128 keys, split or not (the splits' tiles start at the
/// window, the sinks' split reads its last tile only up to its end).
#[test]
fn emulated_decode_reads_only_the_tiles_a_window_shows() {
    let (hq, hkv, d, page, ctx) = (8usize, 2usize, 64usize, 16usize, 1024usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(2).1);
    p.mask = rope_attn::Mask { causal: true, window: Some(100), sinks: 4, chunk: None };
    let emu = emulator(14);
    for splits in [1usize, 4] {
        assert_eq!(decode_bytes_read(&emu, &p, ctx, page, splits, 14), 128 * hkv * d * 2 * 2, "splits {splits}");
    }
}

/// A sliding window without sinks over a long context, split (five asked, four needed: the
/// splits share out the window's 101 keys, not the context): the short sequence's later splits
/// see no key at all and write lse = -inf partials, which the combine step must weigh zero.
/// Also a packed-QKV query view and a wider output stride.
#[test]
fn emulated_decode_with_fully_masked_splits_and_strided_rows() {
    let (hq, hkv, d, page, ctx) = (4usize, 2usize, 64usize, 16usize, 300usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(0).1);
    p.mask = rope_attn::Mask { causal: true, window: Some(100), sinks: 0, chunk: None };
    let emu = emulator(13);
    let mut r = rng(13);
    let f = fill::<f16>(&emu, &p, &[ctx, 7], page, &mut r);
    let (q_stride, o_stride) = ((hq + 2 * hkv) * d, hq * d + 16);
    let mut batch = DecodeBatch::contiguous(&p, 2, 2, f.max_pages, ctx);
    batch.q_row_stride = q_stride;
    batch.o_row_stride = o_stride;
    let q = guard(&as_dtype::<f16>(&uniform(&mut r, 3 * q_stride + hq * d)).0);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    for splits in [1usize, 5] {
        let (mut out, mut lse) = (GuardedBuf::filled(3 * o_stride + hq * d, f16::ZERO), GuardedBuf::filled(4 * hq, 0f32));
        let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
        let rep = emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws)).unwrap();
        assert!(rep.count > 0);
    }
}

/// merge with a side that saw no key (O = 0, lse = -inf) returns the other side unchanged; two
/// such sides give O = 0, lse = -inf.
#[test]
fn emulated_merge_with_empty_sides() {
    let (tokens, heads, d) = (3usize, 2usize, 64usize);
    let mut r = rng(14);
    let (o1, _) = as_dtype::<bf16>(&uniform(&mut r, tokens * heads * d));
    let l1: Vec<f32> = (0..tokens * heads).map(|i| 0.5 + i as f32).collect();
    let (empty_o, empty_l) = (vec![bf16::ZERO; o1.len()], vec![f32::NEG_INFINITY; l1.len()]);
    let emu = emulator(14);
    let (mut out, mut lse) = (GuardedBuf::filled(o1.len(), bf16::ZERO), GuardedBuf::filled(l1.len(), 0f32));
    emu.merge_states([(&guard(&empty_o), &guard(&empty_l)), (&guard(&o1), &guard(&l1))], &mut out, &mut lse, tokens, heads, d).unwrap();
    assert!(out.iter().zip(&o1).all(|(a, b)| a.to_f64() == b.to_f64()));
    assert_eq!(&lse[..], &l1[..]);
    emu.merge_states([(&guard(&empty_o), &guard(&empty_l)), (&guard(&empty_o), &guard(&empty_l))], &mut out, &mut lse, tokens, heads, d).unwrap();
    assert!(out.iter().all(|x| x.to_f64() == 0.0));
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

/// Decode with no position encoding (the kernel's path for a cache of pre-rotated keys, or a
/// model without RoPE): every head dim, both 16-bit dtypes, GQA, a query run, ALiBi, a window
/// with sinks, split and not, against the f64 reference.
#[test]
fn emulated_decode_without_rope_matches_reference() {
    let emu = emulator(21);
    let mut r = rng(21);
    for (i, &d) in rope_attn::cuda::SUPPORTED_HEAD_DIMS.iter().enumerate() {
        let mut p = AttentionParams::new(8, 2, d);
        p.rope = None;
        if i % 2 == 1 {
            p.alibi = Some(Alibi { total_heads: 8, head_offset: 0 });
            p.mask = rope_attn::Mask { causal: true, window: Some(40), sinks: 3, chunk: None };
        }
        let queries = [1usize, 3][i % 2];
        let ctx = [queries, 90 + 7 * i];
        let run = |splits: usize, r: &mut rand::rngs::StdRng| -> Result<CheckReport, rope_attn::Error> {
            macro_rules! go {
                ($t:ty) => {{
                    let f = fill::<$t>(&emu, &p, &ctx, 16, r);
                    let tokens = ctx.len() * queries;
                    let batch = DecodeBatch::contiguous(&p, ctx.len(), queries, f.max_pages, ctx[1]);
                    let q = guard(&as_dtype::<$t>(&uniform(r, tokens * 8 * d)).0);
                    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
                    let (mut out, mut lse) = (GuardedBuf::filled(tokens * 8 * d, <$t>::default()), GuardedBuf::filled(tokens * 8, 0f32));
                    let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
                    emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
                }};
            }
            if i % 2 == 0 { go!(f16) } else { go!(bf16) }
        };
        for splits in [1usize, 2] {
            let rep = run(splits, &mut r).unwrap_or_else(|e| panic!("d={d} splits={splits}: {e}"));
            assert!(rep.passed(), "d={d} splits={splits}: {rep:?}");
        }
    }
}

/// A server may rotate keys once, before appending them (a pre-rotated cache), and decode with
/// no PE; or keep the cache unrotated and let decode rotate. Both give the same attention, up to
/// the extra rounding of rotated Q and K to bf16: YaRN (attention factor != 1, which the decode
/// kernel folds into Q as its square) and an interleaved schedule.
#[test]
fn emulated_decode_over_a_prerotated_cache_equals_in_kernel_rope() {
    let emu = emulator(22);
    let mut r = rng(22);
    let (hq, hkv, ctx, queries, page) = (8usize, 2usize, 140usize, 2usize, 16usize);
    for (d, which) in [(128usize, 5usize), (64, 4)] {
        let rot = schedules(d, d).remove(which).1;
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(rot.clone());
        let mut plain = p.clone();
        plain.rope = None;
        let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, ctx * hkv * d));
        let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, ctx * hkv * d));
        let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, queries * hq * d));
        let max_pages = ctx.div_ceil(page);
        let cache = PagedKvCache { num_pages: max_pages, page_size: page, kv_heads: hkv, head_dim: d };
        let table: Vec<i32> = (0..max_pages as i32).rev().collect();
        let slots: Vec<i32> = (0..ctx).map(|j| table[j / page] * page as i32 + (j % page) as i32).collect();
        let batch = DecodeBatch::contiguous(&p, 1, queries, max_pages, ctx);
        let lens = [ctx as i32];
        let decode = |q: &[bf16], k: &[bf16], p: &AttentionParams| {
            let (mut kc, mut vc) = (vec![bf16::ZERO; cache.len()], vec![bf16::ZERO; cache.len()]);
            emu.paged_append(k, &v, &mut kc, &mut vc, &slots, ctx, hkv * d, hkv * d, &cache).unwrap();
            let (mut o, mut l) = (vec![bf16::ZERO; queries * hq * d], vec![0f32; queries * hq]);
            let x = DecodeInputs { q, k_cache: &kc, v_cache: &vc, block_table: &table, context_lens: &lens };
            emu.attention_decode(&x, &mut o, &mut l, &cache, &batch, p, 1, None).unwrap();
            (o.iter().map(|x| x.to_f64()).collect::<Vec<f64>>(), l.iter().map(|&x| x as f64).collect::<Vec<f64>>())
        };
        let (o_fused, l_fused) = decode(&q, &k, &p);
        // Rotate the keys at 0..ctx and the queries at their positions with the rope kernel
        // (each as the "Q" operand of a rope call with no K).
        let (mut k_rot, mut q_rot) = (k.clone(), q.clone());
        let key_pos: Vec<i32> = (0..ctx as i32).collect();
        let q_pos: Vec<i32> = ((ctx - queries) as i32..ctx as i32).collect();
        emu.rope_inplace(&mut k_rot, &mut [], &key_pos, &RopeShape::contiguous(ctx, hkv, 0, d), &rot).unwrap();
        emu.rope_inplace(&mut q_rot, &mut [], &q_pos, &RopeShape::contiguous(queries, hq, 0, d), &rot).unwrap();
        let (o_pre, l_pre) = decode(&q_rot, &k_rot, &plain);
        let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
        let rep = CheckReport::compare("pre-rotated vs in-kernel out", &o_pre, &o_fused, tol_o.times(2.0))
            .worst(CheckReport::compare("pre-rotated vs in-kernel lse", &l_pre, &l_fused, tol_l.times(2.0)));
        assert!(rep.passed(), "d={d}: {rep:?}");
    }
}

/// The M-RoPE recipe for vision-language models (README): rotate Q and K with their time,
/// height and width positions (`rope_inplace_mrope`), prefill with `rope: None`, append the
/// rotated keys to the paged cache, decode the next text tokens with `rope: None`. Positions as
/// Qwen2-VL's `get_rope_index` lays them out for text, a 3 × 4 image grid, then text resuming
/// after the grid's largest position. Both section layouts; checked against the f64 reference
/// of attention over exactly rotated (f64) Q and K, so the rope kernel's rounding of the
/// rotated operands to bf16 is inside the doubled tolerance.
#[test]
fn emulated_mrope_prefill_and_decode_recipe() {
    let emu = emulator(23);
    let mut r = rng(23);
    let (hq, hkv, d, page) = (4usize, 2usize, 128usize, 16usize);
    let (rows_img, cols_img) = (3i64, 4i64);
    let mut pos3: Vec<[i64; 3]> = (0..4).map(|i| [i; 3]).collect();
    for y in 0..rows_img {
        for x in 0..cols_img {
            pos3.push([4, 4 + y, 4 + x]);
        }
    }
    let resume = 4 + rows_img.max(cols_img);
    pos3.extend((0..7).map(|i| [resume + i; 3]));
    let n = pos3.len(); // 23 tokens: the last 2 are decoded
    let (prompt, queries) = (n - 2, 2);
    let rot = schedules(d, d).remove(0).1;
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = None;
    for m in mrope_cases(d) {
        let (q, qf) = as_dtype::<bf16>(&uniform(&mut r, n * hq * d));
        let (k, kf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
        let (v, vf) = as_dtype::<bf16>(&uniform(&mut r, n * hkv * d));
        let rows: Vec<i32> = (0..3).flat_map(|c| pos3.iter().map(move |p| p[c] as i32)).collect();
        let (mut q_rot, mut k_rot) = (q.clone(), k.clone());
        emu.rope_inplace_mrope(&mut q_rot, &mut k_rot, &rows, n, &RopeShape::contiguous(n, hq, hkv, d), &rot, &m).unwrap();
        // The exact answer: f64 M-RoPE, then attention with no PE (causal over token indices).
        let (mut qx, mut kx) = (qf.clone(), kf.clone());
        rope_attn::reference::rotate_mrope(&mut qx, n, hq, d, hq * d, &pos3, &rot, &m).unwrap();
        rope_attn::reference::rotate_mrope(&mut kx, n, hkv, d, hkv * d, &pos3, &rot, &m).unwrap();
        let idx: Vec<i64> = (0..n as i64).collect();
        let want = rope_attn::reference::attention(&qx[..prompt * hq * d], &kx[..prompt * hkv * d], &vf[..prompt * hkv * d], &idx[..prompt], &idx[..prompt], &p).unwrap();
        let (tol_o, tol_l) = Tolerance::attention::<bf16>(&p, max_abs(&qx), max_abs(&kx), max_abs(&vf));
        let f64s = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
        let f32s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();

        // Prefill of the prompt.
        let batch = AttentionBatch::contiguous(&p, 1, prompt, prompt, prompt);
        let cu = [0, prompt as i32];
        let x = FwdInputs { q: &q_rot[..prompt * hq * d], k: &k_rot[..prompt * hkv * d], v: &v[..prompt * hkv * d], cu_seqlens_q: &cu, cu_seqlens_k: &cu, seq_starts: None };
        let (mut o, mut l) = (vec![bf16::ZERO; prompt * hq * d], vec![0f32; hq * prompt]);
        emu.attention_fwd(&x, &mut o, &mut l, &batch, &p, None).unwrap();
        let rep = CheckReport::compare("M-RoPE prefill out", &f64s(&o), &want.out, tol_o.times(2.0))
            .worst(CheckReport::compare("M-RoPE prefill lse", &f32s(&l), &want.lse, tol_l.times(2.0)));
        // Tighter than the worst-case tolerance: O lies in [-1, 1] and the rotated Q, K and the
        // output are each rounded once to bf16 (2^-9 relative); a wrong section moves O by ~0.05.
        assert!(rep.passed() && rep.max_abs <= 8e-3, "{m:?} prefill: {rep:?}");

        // Decode of the last two text tokens over the paged cache of all n rotated keys.
        let max_pages = n.div_ceil(page);
        let cache = PagedKvCache { num_pages: max_pages + 1, page_size: page, kv_heads: hkv, head_dim: d };
        let table: Vec<i32> = (1..=max_pages as i32).rev().collect();
        let slots: Vec<i32> = (0..n).map(|j| table[j / page] * page as i32 + (j % page) as i32).collect();
        let (mut kc, mut vc) = (vec![bf16::ZERO; cache.len()], vec![bf16::ZERO; cache.len()]);
        emu.paged_append(&k_rot, &v, &mut kc, &mut vc, &slots, n, hkv * d, hkv * d, &cache).unwrap();
        let lens = [n as i32];
        let dbatch = DecodeBatch::contiguous(&p, 1, queries, max_pages, n);
        let x = DecodeInputs { q: &q_rot[prompt * hq * d..], k_cache: &kc, v_cache: &vc, block_table: &table, context_lens: &lens };
        let (mut o, mut l) = (vec![bf16::ZERO; queries * hq * d], vec![0f32; queries * hq]);
        emu.attention_decode(&x, &mut o, &mut l, &cache, &dbatch, &p, 1, None).unwrap();
        let want = rope_attn::reference::attention(&qx[prompt * hq * d..], &kx, &vf, &idx[prompt..], &idx, &p).unwrap();
        let rep = CheckReport::compare("M-RoPE decode out", &f64s(&o), &want.out, tol_o.times(2.0))
            .worst(CheckReport::compare("M-RoPE decode lse", &f32s(&l), &want.lse, tol_l.times(2.0)));
        assert!(rep.passed() && rep.max_abs <= 8e-3, "{m:?} decode: {rep:?}");
        // Plain RoPE at the token indices is a different answer: the positions matter.
        let mut qp = qf[prompt * hq * d..].to_vec();
        let mut kp = kf.clone();
        rope_attn::reference::rotate(&mut qp, queries, hq, d, hq * d, &idx[prompt..], &rot).unwrap();
        rope_attn::reference::rotate(&mut kp, n, hkv, d, hkv * d, &idx, &rot).unwrap();
        let other = rope_attn::reference::attention(&qp, &kp, &vf, &idx[prompt..], &idx, &p).unwrap();
        // (The tolerance is a worst-case bound; the measured errors say more.)
        let diff = CheckReport::compare("plain", &f64s(&o), &other.out, tol_o.times(2.0));
        assert!(diff.max_abs > 10.0 * rep.max_abs, "{m:?}: M-RoPE made no difference: {diff:?} against {rep:?}");
    }
}

/// Masks without ReRoPE, where both decode kernels take their unmasked path for the tiles every
/// query sees and must mask the rest key by key: a window with sinks and a run of queries, and a
/// causal run of 16 speculative tokens whose last tiles are full but partly in every query's
/// future; then ALiBi, whose bias the tensor-core kernel takes as linear in j on tiles at or
/// before every query: causal, and non-causal, where full tiles past the first query are seen
/// by every row but not linear. Both dtypes' kernels (f32 on CUDA cores, bf16 on tensor
/// cores), split and not, against the f64 reference.
#[test]
fn emulated_decode_unmasked_tiles_next_to_masked_ones() {
    fn run<T: Dtype>(seed: u64) {
        let emu = emulator(seed);
        let mut r = rng(seed);
        let causal = rope_attn::Mask { causal: true, window: None, sinks: 0, chunk: None };
        for (queries, mask, ctx, alibi) in [
            (3usize, rope_attn::Mask { causal: true, window: Some(50), sinks: 2, chunk: None }, [200usize, 131], false),
            (16, causal, [128, 64], false),
            (16, causal, [128, 64], true),
            (16, rope_attn::Mask { causal: false, ..causal }, [128, 64], true),
        ] {
            let mut p = AttentionParams::new(8, 2, 128);
            p.rope = Some(schedules(128, 128).remove(6).1);
            p.mask = mask;
            p.alibi = alibi.then_some(Alibi { total_heads: 16, head_offset: 4 });
            let f = fill::<T>(&emu, &p, &ctx, 16, &mut r);
            let tokens = ctx.len() * queries;
            let batch = DecodeBatch::contiguous(&p, ctx.len(), queries, f.max_pages, ctx[0]);
            let q = guard(&as_dtype::<T>(&uniform(&mut r, tokens * 8 * 128)).0);
            let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
            for splits in [1usize, 2] {
                let (mut out, mut lse) = (GuardedBuf::filled(tokens * 8 * 128, T::default()), GuardedBuf::filled(tokens * 8, 0f32));
                let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
                let rep = emu
                    .attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
                    .unwrap_or_else(|e| panic!("{} queries={queries} {mask:?} alibi={alibi} splits={splits}: {e}", T::NAME));
                assert!(rep.passed(), "{} queries={queries} {mask:?} alibi={alibi} splits={splits}: {rep:?}", T::NAME);
            }
        }
    }
    run::<f32>(31);
    run::<bf16>(32);
}
