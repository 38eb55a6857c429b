//! Chunked attention (Llama 4's `attention_chunk_size`, `Mask::chunk`) through the emulated
//! kernels in checked mode: prefill at explicit positions (chunk starts inside tiles, negative
//! query positions, non-causal), decode whose queries straddle a chunk start (every row bound
//! the tensor-core kernel keeps per row), the keys decode reads (the chunk's, not the cache's),
//! and the typed refusal where the 16-bit decode at head_dim 256 leaves chunks out.
#![cfg(feature = "emulator")]

mod common;

use common::paged::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{attention_fwd_workspace_len, decode_workspace_len, max_abs, AttentionBatch, CheckReport, DecodeBatch, Dtype, Tolerance};
use rope_attn::emulator::{DecodeInputs, Emulator, FwdInputs, GuardedBuf};
use rope_attn::{reference, Alibi, AttentionParams, Error, Mask};

fn chunked(causal: bool, window: Option<usize>, sinks: usize, chunk: usize) -> Mask {
    Mask { causal, window, sinks, chunk: Some(chunk) }
}

/// Two sequences at explicit starting positions (ring attention's key blocks, a chunk of a
/// longer prompt): the first's queries start at -5 (below zero: chunk -1 holds them), the second
/// crosses the chunk starts 1008 and 1024 inside the 64-key tiles. Against the reference at the
/// same positions (checked mode takes default positions only).
fn prefill_at<T: Dtype>(emu: &Emulator, p: &AttentionParams, seed: u64, use_ws: bool) {
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    let (seq_q, seq_k) = ([30usize, 70], [40usize, 130]);
    let starts = [-5i32, 0, 1000, 960];
    let (tq, tk) = (100, 170);
    let mut r = rng(seed);
    let (q, qf) = as_dtype::<T>(&uniform(&mut r, tq * hq * d));
    let (k, kf) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let (v, vf) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let (qg, kg, vg) = (guard(&q), guard(&k), guard(&v));
    let (cq, ck, st) = (guard(&cu_seqlens(&seq_q)), guard(&cu_seqlens(&seq_k)), guard(&starts));
    let batch = AttentionBatch::contiguous(p, 2, 70, tq, tk);
    let mut out = GuardedBuf::filled(tq * hq * d, T::default());
    let mut lse = GuardedBuf::filled(hq * tq, 0f32);
    let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(p, tk), T::default());
    let x = FwdInputs { q: &qg, k: &kg, v: &vg, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: Some(&st) };
    emu.attention_fwd(&x, &mut out, &mut lse, &batch, p, use_ws.then_some(&mut ws[..])).unwrap();
    let (tol_o, tol_l) = Tolerance::attention::<T>(p, max_abs(&qf), max_abs(&kf), max_abs(&vf));
    let (mut q0, mut k0) = (0usize, 0usize);
    for b in 0..2 {
        let (nq, nk) = (seq_q[b], seq_k[b]);
        let q_pos: Vec<i64> = (0..nq as i64).map(|m| starts[2 * b] as i64 + m).collect();
        let k_pos: Vec<i64> = (0..nk as i64).map(|j| starts[2 * b + 1] as i64 + j).collect();
        let (kr, qr) = (k0 * hkv * d..(k0 + nk) * hkv * d, q0 * hq * d..(q0 + nq) * hq * d);
        let want = reference::attention(&qf[qr.clone()], &kf[kr.clone()], &vf[kr], &q_pos, &k_pos, p).unwrap();
        let got_o: Vec<f64> = out[qr].iter().map(|x| x.to_f64()).collect();
        let got_l: Vec<f64> = (0..hq).flat_map(|h| (0..nq).map(move |m| (h, m))).map(|(h, m)| lse[h * tq + q0 + m] as f64).collect();
        let rep = CheckReport::compare("out", &got_o, &want.out, tol_o).worst(CheckReport::compare("lse", &got_l, &want.lse, tol_l));
        assert!(rep.passed(), "{} {:?} workspace {use_ws} sequence {b}: {rep:?}", T::NAME, p.mask);
        q0 += nq;
        k0 += nk;
    }
}

#[test]
fn emulated_chunked_prefill_at_explicit_positions() {
    let emu = emulator(40);
    let mut n = 0;
    for (i, mask) in [chunked(true, None, 0, 16), chunked(true, Some(20), 3, 16), chunked(false, None, 2, 7), chunked(true, None, 0, 64)]
        .into_iter()
        .enumerate()
    {
        let mut p = AttentionParams::new(4, 2, 64);
        p.rope = Some(schedules(64, 64).remove(0).1);
        p.mask = mask;
        if i % 2 == 1 {
            p.alibi = Some(Alibi { total_heads: 4, head_offset: 0 });
        }
        prefill_at::<f16>(&emu, &p, 40 + i as u64, false);
        prefill_at::<bf16>(&emu, &p, 50 + i as u64, true);
        prefill_at::<f32>(&emu, &p, 60 + i as u64, true);
        n += 3;
    }
    assert_eq!(n, 12);
}

/// Sixteen queries straddling the chunk start 1024 (positions 1014..=1029 of a 1030-key
/// context): the first ten see keys from 0 (its chunk), the last six only 1024..; with sinks,
/// with a window, causal and not, split and not, on the tensor-core kernel (16-bit, head_dim
/// 128 and 64) and the CUDA-core one (f32).
fn straddle<T: Dtype>(emu: &Emulator, d: usize, mask: Mask, seed: u64) {
    let (hq, hkv, page, ctx, queries) = (8usize, 2usize, 16usize, 1030usize, 16usize);
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(schedules(d, d).remove(1).1);
    p.mask = mask;
    let mut r = rng(seed);
    let f = fill::<T>(emu, &p, &[ctx, 1040], page, &mut r);
    let q = guard(&as_dtype::<T>(&uniform(&mut r, 2 * queries * hq * d)).0);
    let batch = DecodeBatch::contiguous(&p, 2, queries, f.max_pages, 1040);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    for splits in [1usize, 3] {
        let (mut out, mut lse) = (GuardedBuf::filled(2 * queries * hq * d, T::default()), GuardedBuf::filled(2 * queries * hq, 0f32));
        let mut ws = GuardedBuf::filled(decode_workspace_len(&p, &batch, splits), 0f32);
        let rep = emu
            .attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, splits, Some(&mut ws))
            .unwrap_or_else(|e| panic!("{} d={d} {mask:?} splits {splits}: {e}", T::NAME));
        assert!(rep.count > 0);
    }
}

#[test]
fn emulated_decode_with_queries_straddling_a_chunk_start() {
    let emu = emulator(41);
    let masks = [chunked(true, None, 0, 1024), chunked(true, None, 4, 1024), chunked(true, Some(300), 2, 1024), chunked(false, None, 0, 1024)];
    for (i, &m) in masks.iter().enumerate() {
        straddle::<bf16>(&emu, 128, m, 70 + i as u64);
        straddle::<f16>(&emu, 64, m, 80 + i as u64);
        straddle::<f32>(&emu, 128, m, 90 + i as u64);
    }
    // Chunks smaller than a tile and than the queries: many chunks among the 16 rows.
    straddle::<bf16>(&emu, 64, chunked(true, None, 1, 5), 99);
    straddle::<f32>(&emu, 64, chunked(false, None, 0, 3), 98);
}

/// Decode reads the keys of the query's chunk, not the cache: 1074 keys, chunk 256, one query
/// at 1073 sees 1024..1074 (50 keys), split or not (the splits share out chunk + queries - 1
/// keys from the chunk start). With 4 sinks the sinks' tile is read too (16 keys, the head_dim
/// 64 decode tile).
#[test]
fn emulated_decode_reads_only_the_chunk() {
    let (hq, hkv, d, page, ctx) = (8usize, 2usize, 64usize, 16usize, 1074usize);
    for (sinks, keys) in [(0usize, 50usize), (4, 66)] {
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(schedules(d, d).remove(2).1);
        p.mask = chunked(true, None, sinks, 256);
        let emu = emulator(42);
        for splits in [1usize, 4] {
            assert_eq!(decode_bytes_read(&emu, &p, ctx, page, splits, 42), keys * hkv * d * 2 * 2, "sinks {sinks} splits {splits}");
        }
    }
}

/// The 16-bit decode at head_dim 256 leaves chunks out (its registers): a typed error before
/// any launch, not a wrong answer; f32 at 256 and 16-bit at 128 take them.
#[test]
fn emulated_chunked_decode_at_head_dim_256_is_refused_in_16_bit() {
    let emu = emulator(43);
    let (hq, hkv, page, ctx) = (4usize, 2usize, 16usize, 100usize);
    let run = |d: usize, dtype16: bool| -> Result<(), Error> {
        let mut p = AttentionParams::new(hq, hkv, d);
        p.rope = Some(schedules(d, d).remove(0).1);
        p.mask = chunked(true, None, 0, 32);
        let mut r = rng(43);
        let batch = DecodeBatch::contiguous(&p, 1, 2, ctx.div_ceil(page), ctx);
        if dtype16 {
            let f = fill::<bf16>(&emu, &p, &[ctx], page, &mut r);
            let q = guard(&as_dtype::<bf16>(&uniform(&mut r, 2 * hq * d)).0);
            let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
            let (mut out, mut lse) = (GuardedBuf::filled(2 * hq * d, bf16::ZERO), GuardedBuf::filled(2 * hq, 0f32));
            emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, 1, None).map(|_| ())
        } else {
            let f = fill::<f32>(&emu, &p, &[ctx], page, &mut r);
            let q = guard(&as_dtype::<f32>(&uniform(&mut r, 2 * hq * d)).0);
            let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
            let (mut out, mut lse) = (GuardedBuf::filled(2 * hq * d, 0f32), GuardedBuf::filled(2 * hq, 0f32));
            emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, &p, 1, None).map(|_| ())
        }
    };
    assert!(matches!(run(256, true), Err(Error::Parameter { name: "chunk", .. })), "{:?}", run(256, true));
    run(256, false).unwrap();
    run(128, true).unwrap();
}
