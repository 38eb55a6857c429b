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

