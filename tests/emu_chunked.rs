//! Chunked attention (Llama 4's `attention_chunk_size`, `Mask::chunk`) through the emulated
//! kernels in checked mode: prefill at explicit positions (chunk starts inside tiles, negative
//! query positions, non-causal), decode whose queries straddle a chunk start (every row bound
//! the tensor-core kernel keeps per row), the keys decode reads (the chunk's, not the cache's),
//! and the 16-bit decode at head_dim 256, whose chunks the CUDA-core kernel takes.
#![cfg(feature = "emulator")]

mod common;

use common::explicit::prefill_at_explicit_positions;
use common::paged::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{DecodeBatch, Dtype};
use rope_attn::emulator::{DecodeInputs, Emulator, GuardedBuf};
use rope_attn::{Alibi, AttentionParams, Error, Mask};

fn chunked(causal: bool, window: Option<usize>, sinks: usize, chunk: usize) -> Mask {
    Mask { causal, window, sinks, chunk: Some(chunk) }
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
        prefill_at_explicit_positions::<f16>(&emu, &p, 40 + i as u64, false);
        prefill_at_explicit_positions::<bf16>(&emu, &p, 50 + i as u64, true);
        prefill_at_explicit_positions::<f32>(&emu, &p, 60 + i as u64, true);
        n += 3;
    }
    assert_eq!(n, 12);
}

/// Sixteen queries straddling the chunk start 1024 (positions 1014..=1029 of a 1030-key
/// context): the first ten see keys from 0 (its chunk), the last six only 1024..; with sinks,
/// with a window, causal and not, split and not, on the tensor-core kernel (16-bit, head_dim
/// 128 and 64) and the CUDA-core one (f32, and 16-bit at head_dim 256).
fn straddle<T: Dtype>(emu: &Emulator, d: usize, mask: Mask, seed: u64) {
    let mut p = AttentionParams::new(8, 2, d);
    p.rope = Some(schedules(d, d).remove(1).1);
    p.mask = mask;
    decode_16_queries_checked::<T>(emu, &p, &[1030, 1040], seed, &format!("{mask:?}"));
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
    straddle::<f16>(&emu, 256, masks[2], 97);
    // Chunks smaller than a tile and than the queries: many chunks among the 16 rows.
    straddle::<bf16>(&emu, 64, chunked(true, None, 1, 5), 99);
    straddle::<bf16>(&emu, 256, chunked(true, None, 1, 5), 96);
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

/// The tensor-core decode's head_dim-256 build leaves chunks out (its registers): a 16-bit
/// chunked decode at 256 runs on the CUDA-core kernel instead (the f32 one's code, 4 rows a
/// block; no mma), checked against the reference as f32 at 256 and 16-bit at 128 (on tensor
/// cores) are.
#[test]
fn emulated_chunked_decode_at_head_dim_256_runs_in_16_bit() {
    let emu = emulator(43);
    let (hq, hkv, page, ctx) = (4usize, 2usize, 16usize, 100usize);
    let run = |d: usize, dtype16: bool| -> Result<(), Error> {
        emu.take_work();
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
    run(256, true).unwrap();
    // On CUDA cores: no mma.sync (the tensor-core kernel at 128 takes them).
    assert_eq!(emu.take_work().mma, 0);
    run(256, false).unwrap();
    run(128, true).unwrap();
    assert!(emu.take_work().mma > 0);
}
