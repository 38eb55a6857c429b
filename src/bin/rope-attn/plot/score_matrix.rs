//! The position-only score matrix behind the heatmaps.
//!
//! ======================= GPU ROUTING POINT =======================
//! [`score_matrix`] is the one place that computes scores for the plots. It takes the same
//! [`AttentionParams`] the GPU `scores` kernel takes, so routing it to the device when one is
//! present is a change to this file only; [`BACKEND`] says which one ran.
//! =================================================================

use rope_attn::{reference, AttentionParams};

/// Where [`score_matrix`] runs (printed by `plot`).
pub const BACKEND: &str = "CPU (reference)";

/// Scores `S[a][b]` (row-major, `q_pos.len() × k_pos.len()`, masked entries `-inf`) of one head
/// whose queries and keys are all-ones vectors, at positions `q_pos` × `k_pos`: what is left is
/// the pattern the position encoding in `params` (RoPE, ALiBi, both) imposes on its own.
pub fn score_matrix(params: &AttentionParams, q_pos: &[i64], k_pos: &[i64]) -> Result<Vec<f64>, String> {
    if params.num_q_heads != 1 || params.num_kv_heads != 1 {
        return Err("score_matrix takes a single-head problem".into());
    }
    let d = params.head_dim;
    let q = vec![1.0; q_pos.len() * d];
    let k = vec![1.0; k_pos.len() * d];
    reference::scores(&q, &k, q_pos, k_pos, params).map_err(|e| e.to_string())
}
