//! The position-only score matrix behind the heatmaps: on the GPU `scores` kernel when a device
//! is present, on the CPU reference otherwise ([`backend`] says which ran).

use rope_attn::cuda::{self, Gpu, ScoresShape};
use rope_attn::{reference, AttentionParams};
use std::sync::OnceLock;

fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| cuda::device_status().ok().and_then(|_| Gpu::new(0).ok())).as_ref()
}

/// Where [`score_matrix`] runs (printed by `plot`).
pub fn backend() -> String {
    match gpu() {
        Some(g) => format!("GPU ({}, fused scores kernel)", g.describe()),
        None => "CPU (reference)".into(),
    }
}

/// Scores `S[a][b]` (row-major, `q_pos.len() × k_pos.len()`, masked entries `-inf`) of one head
/// whose queries and keys are all-ones vectors, at positions `q_pos` × `k_pos`: what is left is
/// the pattern the position encoding in `params` (RoPE, ALiBi, both) imposes on its own.
pub fn score_matrix(params: &AttentionParams, q_pos: &[i64], k_pos: &[i64]) -> Result<Vec<f64>, String> {
    if params.num_q_heads != 1 || params.num_kv_heads != 1 {
        return Err("score_matrix takes a single-head problem".into());
    }
    if let Some(g) = gpu() {
        return on_gpu(g, params, q_pos, k_pos).map_err(|e| format!("GPU scores: {e}"));
    }
    let d = params.head_dim;
    let q = vec![1.0; q_pos.len() * d];
    let k = vec![1.0; k_pos.len() * d];
    reference::scores(&q, &k, q_pos, k_pos, params).map_err(|e| e.to_string())
}

/// The kernel takes contiguous positions (queries from an offset, keys from 0): compute the full
/// square up to the largest sampled position (10k x 10k f32 is 400 MB, fine on a GPU) and pick
/// the sampled entries.
fn on_gpu(g: &Gpu, p: &AttentionParams, q_pos: &[i64], k_pos: &[i64]) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let max = |v: &[i64]| v.iter().copied().max().unwrap_or(0).max(0) as usize;
    let (nq, nk, d) = (max(q_pos) + 1, max(k_pos) + 1, p.head_dim);
    let stream = g.context().default_stream();
    let q = stream.clone_htod(&vec![1.0f32; nq * d])?;
    let k = stream.clone_htod(&vec![1.0f32; nk * d])?;
    let mut out = stream.alloc_zeros::<f32>(nq * nk)?;
    cuda::scores(g, &stream, &q, &k, &mut out, &ScoresShape::contiguous(p, nq, nk, 0), p)?;
    let all = stream.clone_dtoh(&out)?;
    Ok(q_pos
        .iter()
        .flat_map(|&i| k_pos.iter().map(move |&j| (i, j)))
        .map(|(i, j)| if i < 0 || j < 0 { f64::NEG_INFINITY } else { all[i as usize * nk + j as usize] as f64 })
        .collect())
}
