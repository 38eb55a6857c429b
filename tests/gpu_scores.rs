//! The fused RoPE·QKᵀ·ALiBi score kernel against the reference: every dtype and head dim,
//! every rope type, ReRoPE and Leaky ReRoPE, ALiBi with a tensor-parallel head offset, causal /
//! window / sink masks, GQA 1/4/8, decode offset, sizes that are not multiples of any tile.
//! Tolerance (Tolerance::scores): 4 eps_dtype sqrt(d)·scale·max|q|·max|k| (+ f32 ulps), per element.

mod common;

use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{scores_checked, Dtype, ScoresShape};
use rope_attn::{Alibi, AttentionParams, Mask, Relative};

fn sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    let relatives = [Relative::None, Relative::ReRope { window: 7 }, Relative::Leaky { window: 5, k: 3.0 }];
    for (ci, &d) in [64usize, 80, 96, 128, 256].iter().enumerate() {
        for (si, (name, rot)) in schedules(d, d).into_iter().enumerate() {
            // Rotate through the option space rather than taking its full product.
            let case = ci * 8 + si;
            let (hq, hkv) = [(4usize, 4usize), (8, 2), (8, 1)][case % 3];
            let (nq, nk, off) = [(1usize, 1usize, 0usize), (13, 70, 57), (65, 65, 0), (130, 131, 1)][case % 4];
            let mut p = AttentionParams::new(hq, hkv, d);
            p.rope = Some(rot);
            p.relative = relatives[case % 3];
            p.mask = match case % 4 {
                0 => Mask { causal: true, window: None, sinks: 0 },
                1 => Mask { causal: true, window: Some(9), sinks: 2 },
                2 => Mask { causal: false, window: None, sinks: 0 },
                _ => Mask { causal: false, window: Some(20), sinks: 0 },
            };
            if case % 2 == 1 {
                p.alibi = Some(Alibi { total_heads: 4 * hq, head_offset: hq });
            }
            let shape = ScoresShape::contiguous(&p, nq, nk, off);
            let (qv, _) = as_dtype::<T>(&uniform(&mut r, nq * hq * d));
            let (kv, _) = as_dtype::<T>(&uniform(&mut r, nk * hkv * d));
            let q = stream.clone_htod(&qv).unwrap();
            let k = stream.clone_htod(&kv).unwrap();
            let mut out = stream.alloc_zeros::<f32>(hq * nq * nk).unwrap();
            scores_checked(gpu, stream, &q, &k, &mut out, &shape, &p)
                .unwrap_or_else(|e| panic!("{} d={d} {name} case {case} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
            cases += 1;
        }
    }
    cases
}

#[test]
fn scores_match_reference_all_dtypes() {
    let Some((gpu, stream)) = gpu_or_skip("scores_match_reference_all_dtypes") else { return };
    let n = sweep::<f32>(&gpu, &stream, 11) + sweep::<f16>(&gpu, &stream, 12) + sweep::<bf16>(&gpu, &stream, 13);
    assert_eq!(n, 3 * 5 * 8);
}

/// Without RoPE the kernel is plain scaled QKᵀ + ALiBi: checked at a long window too.
#[test]
fn scores_without_rope_and_alibi_only() {
    let Some((gpu, stream)) = gpu_or_skip("scores_without_rope_and_alibi_only") else { return };
    let mut r = rng(14);
    let (hq, d, nq, nk) = (12, 64, 100, 1000);
    let mut p = AttentionParams::new(hq, hq, d);
    p.alibi = Some(Alibi { total_heads: hq, head_offset: 0 });
    let shape = ScoresShape::contiguous(&p, nq, nk, nk - nq);
    let (qv, _) = as_dtype::<bf16>(&uniform(&mut r, nq * hq * d));
    let (kv, _) = as_dtype::<bf16>(&uniform(&mut r, nk * hq * d));
    let q = stream.clone_htod(&qv).unwrap();
    let k = stream.clone_htod(&kv).unwrap();
    let mut out = stream.alloc_zeros::<f32>(hq * nq * nk).unwrap();
    scores_checked(&gpu, &stream, &q, &k, &mut out, &shape, &p).unwrap();
}
