//! # rope-attn
//!
//! Hand-written CUDA kernels for position-encoded attention — RoPE and every long-context
//! schedule Hugging Face configs use (linear, dynamic NTK, NTK, YaRN, Llama 3.1, LongRoPE),
//! ALiBi, ReRoPE and Leaky ReRoPE — fused into scoring and flash attention, multimodal RoPE
//! (M-RoPE, [`MRope`]) and the QK norm ([`QkNorm`]: Qwen3, Gemma 3, OLMo 2, Llama 4) in the rope
//! kernel, learned attention sinks (GPT-OSS) and logit soft-capping (Gemma 2) in every attention
//! kernel, the output gate ([`OutputGate`]: Qwen3-Next, Qwen3.5, LFM3) in the prefill and decode
//! epilogues, with an exact f64 CPU reference for every kernel so that any GPU result can be checked.
//!
//! * [`config`]: `config.json` → [`RopeConfig`] → [`RopeSchedule`] (inverse frequencies, rotary
//!   dim, attention factor), matching transformers to ~1e-15 in f64.
//! * [`alibi`]: BLOOM's slopes.
//! * [`reference`](mod@reference): the f64 CPU twin of every kernel.
//! * [`cuda`]: the safe launch layer over cudarc (device buffers, the caller's stream).
//! * `emulator` (feature `emulator`): the same kernels run on the CPU by a SIMT model, through
//!   the same validation and launch planning, for machines without a GPU.
//!
//! ```
//! use rope_attn::{reference, AttentionParams, Layout, RopeSchedule, Rotary};
//! let sched = RopeSchedule::plain(10000.0, 4).unwrap();
//! let mut p = AttentionParams::new(1, 1, 4);
//! p.rope = Some(Rotary::from_schedule(&sched, Layout::Half));
//! let q = vec![0.1, 0.2, 0.3, 0.4];
//! let k = vec![0.5, -0.1, 0.2, 0.3, 0.0, 0.1, -0.2, 0.4];
//! let v = k.clone();
//! let o = reference::attention(&q, &k, &v, &[1], &[0, 1], &p).unwrap();
//! assert_eq!(o.out.len(), 4);
//! ```
#![warn(missing_docs)]

pub mod alibi;
pub mod attention;
pub mod config;
pub mod cuda;
#[cfg(feature = "emulator")]
pub mod emulator;
#[cfg(feature = "candle")]
pub mod candle;
pub mod error;
pub mod output_gate;
pub mod qk_norm;
pub mod reference;

pub use attention::{Alibi, AttentionParams, Layout, Mask, QueryTemperature, Relative, Rotary};
pub use config::{hf_layers, HfLayer, HfQkNorm, LayerAttention, LayerHeads, MRope, NormWeight, RopeConfig, RopeScaling, RopeSchedule};
pub use error::{Error, Result};
pub use output_gate::OutputGate;
pub use qk_norm::{NormScope, QkNorm};
