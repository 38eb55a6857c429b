//! Paged prefill on the GPU against the reference (the sweep of tests/emu_paged_prefill.rs at
//! GPU lengths): every head dim and rope type, f16/bf16, GQA, masks, ALiBi, ReRoPE and Leaky
//! ReRoPE, fresh prompts and chunks deep into long contexts, shuffled pages of 16 and 7, one
//! key split and four, fused and through the gather workspace.
//! Tolerance (Tolerance::attention), checked by attention_fwd_paged_checked.

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rope_attn::cuda::{attention_fwd_paged_checked, paged_prefill_gather_len, paged_prefill_workspace_len, Dtype, PagedKvCache, PagedPrefillBatch};
use rope_attn::AttentionParams;

type Stream = std::sync::Arc<cudarc::driver::CudaStream>;

#[allow(clippy::too_many_arguments)]
fn run<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &Stream, case: usize, p: &AttentionParams, seq_q: &[usize], ctx: &[usize], page: usize, splits: usize, gather: bool) {
    let mut r = rng(700 + case as u64);
    let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
    let max_pages = ctx.iter().max().unwrap().div_ceil(page);
    let num_pages = ctx.len() * max_pages + 2;
    let mut pages: Vec<i32> = (0..num_pages as i32).collect();
    pages.shuffle(&mut r);
    let cache = PagedKvCache { num_pages, page_size: page, kv_heads: hkv, head_dim: d };
    let (kc, _) = as_dtype::<T>(&uniform(&mut r, cache.len()));
    let (vc, _) = as_dtype::<T>(&uniform(&mut r, cache.len()));
    let tq: usize = seq_q.iter().sum();
    let (q, _) = as_dtype::<T>(&uniform(&mut r, tq * hq * d));
    let cu = cu_seqlens(seq_q);
    let lens: Vec<i32> = ctx.iter().map(|&c| c as i32).collect();
    let up = |x: &[T]| stream.clone_htod(x).unwrap();
    let (qd, kd, vd) = (up(&q), up(&kc), up(&vc));
    let (table, lens, cu) = (stream.clone_htod(&pages[..ctx.len() * max_pages]).unwrap(), stream.clone_htod(&lens).unwrap(), stream.clone_htod(&cu).unwrap());
    let mut out = stream.alloc_zeros::<T>(tq * hq * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(hq * tq).unwrap();
    let batch = PagedPrefillBatch::contiguous(p, seq_q.len(), *seq_q.iter().max().unwrap(), tq, max_pages);
    let mut ws = stream.alloc_zeros::<f32>(paged_prefill_workspace_len(p, &batch, splits).max(1)).unwrap();
    let mut wsv = ws.as_view_mut();
    let mut gws = stream.alloc_zeros::<T>(if gather { paged_prefill_gather_len(p, &batch, &cache) } else { 1 }).unwrap();
    let mut gv = gws.as_view_mut();
    let g = gather.then_some(&mut gv);
    attention_fwd_paged_checked(gpu, stream, &qd, &kd, &vd, &table, &lens, &cu, &mut out, &mut lse, &cache, &batch, p, splits, Some(&mut wsv), g)
        .unwrap_or_else(|e| panic!("case {case} {} d={d} {:?} {:?} splits {splits} gather {gather}: {e}", T::NAME, p.relative, p.mask));
}

#[test]
fn paged_prefill_matches_reference() {
    let Some((gpu, stream)) = gpu_or_skip("paged_prefill_matches_reference") else { return };
    for (case, d, _name, rot) in dims_and_schedules(full_or_half) {
        let scale = gpu_scale();
        let p = prefill_case(case, d, rot, false, scale).p;
        let (seq_q, ctx) = match scale {
            Scale::Gpu => ([1usize, 64, 257], [1usize, 2000 + case, 257]),
            Scale::Emulator => ([1usize, 16, 57], [1usize, 200 + case, 57]),
        };
        let page = [16usize, 7][case % 2];
        // Split keys on odd cases (up to 4 splits of the ~2000-key table rows); bf16 goes
        // through the gather workspace on even cases (gathered unless the case has ReRoPE).
        let splits = [1usize, 4][case % 2];
        run::<f16>(&gpu, &stream, case, &p, &seq_q, &ctx, page, splits, false);
        run::<bf16>(&gpu, &stream, case, &p, &seq_q, &ctx, page, 5 - splits, case % 2 == 0);
    }
}
