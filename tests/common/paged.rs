//! A paged KV cache for the emulated suites, filled through the emulated `paged_append`.
#![cfg(feature = "emulator")]

use super::{as_dtype, guard, uniform};
use rand::seq::SliceRandom;
use rope_attn::cuda::{Dtype, PagedKvCache};
use rope_attn::emulator::{Emulator, GuardedBuf};
use rope_attn::AttentionParams;

/// A paged cache filled through `paged_append` from per-sequence K/V, pages handed out in a
/// shuffled order so the block table really indirects.
pub struct Filled<T: Copy> {
    pub k_cache: GuardedBuf<T>,
    pub v_cache: GuardedBuf<T>,
    pub table: GuardedBuf<i32>,
    pub lens: GuardedBuf<i32>,
    pub cache: PagedKvCache,
    pub max_pages: usize,
}

pub fn fill<T: Dtype>(emu: &Emulator, p: &AttentionParams, ctx: &[usize], page: usize, r: &mut rand::rngs::StdRng) -> Filled<T> {
    let (hkv, d) = (p.num_kv_heads, p.head_dim);
    let max_pages = ctx.iter().max().unwrap().div_ceil(page);
    let num_pages = ctx.len() * max_pages + 3;
    let mut free: Vec<i32> = (0..num_pages as i32).collect();
    free.shuffle(r);
    let table: Vec<i32> = (0..ctx.len() * max_pages).map(|i| free[i]).collect();
    let cache = PagedKvCache { num_pages, page_size: page, kv_heads: hkv, head_dim: d };
    let (mut k_cache, mut v_cache) = (GuardedBuf::filled(cache.len(), T::default()), GuardedBuf::filled(cache.len(), T::default()));
    for (b, &n) in ctx.iter().enumerate() {
        let (k, _) = as_dtype::<T>(&uniform(r, n * hkv * d));
        let (v, _) = as_dtype::<T>(&uniform(r, n * hkv * d));
        let slots: Vec<i32> = (0..n).map(|j| table[b * max_pages + j / page] * page as i32 + (j % page) as i32).collect();
        emu.paged_append(&guard(&k), &guard(&v), &mut k_cache, &mut v_cache, &guard(&slots), n, hkv * d, hkv * d, &cache).unwrap();
        for (j, &s) in slots.iter().enumerate() {
            let row = hkv * d;
            let (got, want) = (&k_cache[s as usize * row..(s as usize + 1) * row], &k[j * row..(j + 1) * row]);
            assert!(got.iter().zip(want).all(|(a, b)| a.to_f64() == b.to_f64()), "append: key {j} of sequence {b}");
        }
    }
    let lens: Vec<i32> = ctx.iter().map(|&n| n as i32).collect();
    Filled { k_cache, v_cache, table: guard(&table), lens: guard(&lens), cache, max_pages }
}


/// Global bytes one bf16 query's checked decode reads over a filled one-sequence cache of `ctx`
/// keys (pages of `page`), with `splits` key splits: what the kernels stage (the emulator's count).
pub fn decode_bytes_read(emu: &Emulator, p: &AttentionParams, ctx: usize, page: usize, splits: usize, seed: u64) -> usize {
    use rope_attn::cuda::{decode_workspace_len, DecodeBatch};
    use rope_attn::emulator::DecodeInputs;
    let (hq, d) = (p.num_q_heads, p.head_dim);
    let mut r = super::rng(seed);
    let f = fill::<half::bf16>(emu, p, &[ctx], page, &mut r);
    let q = guard(&as_dtype::<half::bf16>(&uniform(&mut r, hq * d)).0);
    let batch = DecodeBatch::contiguous(p, 1, 1, f.max_pages, ctx);
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    let (mut out, mut lse) = (GuardedBuf::filled(hq * d, half::bf16::ZERO), GuardedBuf::filled(hq, 0f32));
    let mut ws = GuardedBuf::filled(decode_workspace_len(p, &batch, splits), 0f32);
    emu.take_work();
    emu.attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, p, splits, Some(&mut ws)).unwrap();
    emu.take_work().global_bytes as usize
}

/// Checked decode of 16 queries per sequence (speculative decoding) over a cache of `lens` keys
/// per sequence (pages of 16), split and not (1 and 3 key splits); panics naming `what`.
pub fn decode_16_queries_checked<T: Dtype>(emu: &Emulator, p: &AttentionParams, lens: &[usize], seed: u64, what: &str) {
    use rope_attn::cuda::{decode_workspace_len, DecodeBatch};
    use rope_attn::emulator::DecodeInputs;
    let (hq, d, queries, n) = (p.num_q_heads, p.head_dim, 16usize, lens.len());
    let mut r = super::rng(seed);
    let f = fill::<T>(emu, p, lens, 16, &mut r);
    let q = guard(&as_dtype::<T>(&uniform(&mut r, n * queries * hq * d)).0);
    let batch = DecodeBatch::contiguous(p, n, queries, f.max_pages, *lens.iter().max().unwrap());
    let x = DecodeInputs { q: &q, k_cache: &f.k_cache, v_cache: &f.v_cache, block_table: &f.table, context_lens: &f.lens };
    for splits in [1usize, 3] {
        let (mut out, mut lse) = (GuardedBuf::filled(n * queries * hq * d, T::default()), GuardedBuf::filled(n * queries * hq, 0f32));
        let mut ws = GuardedBuf::filled(decode_workspace_len(p, &batch, splits), 0f32);
        let rep = emu
            .attention_decode_checked(&x, &mut out, &mut lse, &f.cache, &batch, p, splits, Some(&mut ws))
            .unwrap_or_else(|e| panic!("{} d={d} {what} splits {splits}: {e}", T::NAME));
        assert!(rep.count > 0);
    }
}
