//! The fused RoPE·QKᵀ·ALiBi score kernel against the reference: every dtype and head dim,
//! every rope type, ReRoPE and Leaky ReRoPE, ALiBi with a tensor-parallel head offset, causal /
//! window / sink masks, GQA 1/4/8, decode offset, sizes that are not multiples of any tile.
//! Tolerance (Tolerance::scores): 4 eps_dtype sqrt(d)·scale·max|q|·max|k| (+ f32 ulps), per element.

mod common;

use common::cases::*;
use common::*;
use half::{bf16, f16};
use rope_attn::cuda::{scores_checked, Dtype, ScoresShape};
use rope_attn::{Alibi, AttentionParams};

fn sweep<T: Dtype>(gpu: &rope_attn::cuda::Gpu, stream: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64) -> usize {
    let mut r = rng(seed);
    let mut cases = 0;
    // The score-matrix kernel stops at head_dim 256 (tests/emu_rope_scores.rs checks the refusal).
    for (case, d, name, rot) in dims_and_schedules(full_or_half).into_iter().filter(|c| c.1 <= 256) {
        let (p, shape) = scores_case(case, d, rot, gpu_scale());
        let (hq, hkv) = (p.num_q_heads, p.num_kv_heads);
        let (qv, _) = as_dtype::<T>(&uniform(&mut r, shape.nq * hq * d));
        let (kv, _) = as_dtype::<T>(&uniform(&mut r, shape.nk * hkv * d));
        let q = stream.clone_htod(&qv).unwrap();
        let k = stream.clone_htod(&kv).unwrap();
        let mut out = stream.alloc_zeros::<f32>(hq * shape.nq * shape.nk).unwrap();
        scores_checked(gpu, stream, &q, &k, &mut out, &shape, &p)
            .unwrap_or_else(|e| panic!("{} d={d} {name} case {case} {:?} {:?}: {e}", T::NAME, p.relative, p.mask));
        cases += 1;
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
