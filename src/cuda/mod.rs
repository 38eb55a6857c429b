//! The safe launch layer: kernels from `kernels/*.cu` launched on the caller's stream and
//! device buffers (cudarc), every input validated before a launch, and a checked mode that
//! re-runs the CPU reference on the same inputs.
//!
//! Nothing here allocates in the hot path: any workspace is sized by a query function and
//! passed in by the caller; nothing synchronizes the host (checked mode excepted, by design).
//!
//! ```no_run
//! use rope_attn::cuda::{Gpu, RopeShape};
//! use rope_attn::{Layout, RopeSchedule, Rotary};
//! let gpu = Gpu::new(0)?;                      // loads the embedded kernels once per context
//! let stream = gpu.context().default_stream();
//! let (tokens, heads, d) = (4, 2, 64);
//! let mut q = stream.clone_htod(&vec![half::bf16::ONE; tokens * heads * d])?;
//! let mut k = stream.clone_htod(&vec![half::bf16::ONE; tokens * heads * d])?;
//! let pos = stream.clone_htod(&[0i32, 1, 2, 3])?;
//! let rot = Rotary::from_schedule(&RopeSchedule::plain(10000.0, d)?, Layout::Half);
//! let shape = RopeShape::contiguous(tokens, heads, heads, d);
//! rope_attn::cuda::rope_inplace(&gpu, &stream, &mut q, &mut k, &pos, &shape, &rot)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod append;
pub(crate) mod attention;
pub(crate) mod checked;
pub(crate) mod decode;
pub(crate) mod device;
mod dtype;
pub(crate) mod gated;
pub(crate) mod launch;
pub(crate) mod merge;
pub(crate) mod paged_prefill;
pub(crate) mod params;
pub(crate) mod rope;
pub(crate) mod scores;

pub use append::{paged_append, paged_append_v_normed};
pub use attention::{
    attention_fwd, attention_fwd_at, attention_fwd_checked, attention_fwd_gated, attention_fwd_gated_checked, attention_fwd_workspace_len, prefill_prefers_workspace, AttentionBatch, FwdLens,
    PrefillPath,
};
pub use checked::{max_abs, CheckReport, Tolerance};
pub use decode::{
    attention_decode, attention_decode_checked, attention_decode_gated, attention_decode_gated_checked, decode_base_steps, decode_splits, decode_workspace_len, DecodeBatch, DecodeLens,
    DecodePlan, PagedKvCache,
};
pub use device::{device_status, Gpu};
pub use dtype::Dtype;
pub use gated::{qk_norm_rope_gated, qk_norm_rope_gated_checked, GatedRotation, GATED_NORM_ONLY};
pub use merge::{merge_states, merge_states_gated};
pub use paged_prefill::{
    attention_fwd_paged, attention_fwd_paged_checked, attention_fwd_paged_gated, attention_fwd_paged_gated_checked, paged_prefill_gather_len, paged_prefill_prefers_gather, paged_prefill_splits,
    paged_prefill_workspace_len, PagedFwdLens, PagedPrefillBatch, PagedPrefillPath, PagedPrefillPlan,
};
pub use rope::{
    qk_norm_inplace, qk_norm_inplace_checked, rope_inplace, rope_inplace_checked, rope_inplace_mrope, rope_inplace_mrope_checked,
    rope_inplace_mrope_normed, rope_inplace_mrope_normed_checked, rope_inplace_normed, rope_inplace_normed_checked, rope_into, RopeShape,
    ROPE_MAX_HEAD_DIM,
};
pub use scores::{scores, scores_checked, ScoresShape};

/// Sizes and field offsets of the kernel parameter mirrors (for the ABI test; not a stable API).
#[doc(hidden)]
pub fn abi_layout() -> Vec<(String, usize)> {
    params::abi_layout()
}

/// Head dimensions the attention kernels (prefill, paged prefill, decode, merge) are
/// instantiated for. 512 (Gemma 4's full layers) takes no ReRoPE, and the score-matrix kernel
/// stops at 256 ([`SCORES_HEAD_DIMS`]).
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[64, 80, 96, 128, 256, 512];

/// Head dimensions of [`scores`]: its Q and K tiles of 64 rows at 512 would not fit in an
/// sm_86 block's 99 KB.
pub const SCORES_HEAD_DIMS: &[usize] = &[64, 80, 96, 128, 256];
