//! Multimodal RoPE (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V): each token has three
//! positions (time, height, width), and each rotation pair takes its angle from one of them.
//!
//! The frequencies are those of the config's schedule; only the position each pair is rotated
//! to changes. The two assignments transformers uses, for `sections = [t, h, w]` (pairs, summing
//! to `rotary_dim / 2`):
//! - chunked (Qwen2-VL, Qwen2.5-VL: `apply_multimodal_rotary_pos_emb`): pairs `0..t` take the
//!   time position, `t..t+h` the height, the rest the width (both halves of a rotate_half pair
//!   come from the same split of `cat(freqs, freqs)`, so a pair is never split);
//! - interleaved (Qwen3-VL: `apply_interleaved_mrope`, `mrope_interleaved: true`): pair `i`
//!   takes the height when `i % 3 == 1` and `i < 3h`, the width when `i % 3 == 2` and `i < 3w`,
//!   and the time position otherwise.
//!
//! A text token has three equal positions, and then M-RoPE is plain RoPE at that position: the
//! attention kernels' in-kernel rotation (one position per token) is exact for text-only
//! sequences. Image and video tokens need the three positions: rotate Q and K with
//! `cuda::rope_inplace_mrope`, then attend with `rope: None` (a pre-rotated cache for decode).

use crate::error::{Error, Result};

/// Which of a token's three positions each rotation pair takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MRope {
    /// Pairs per position component, `[time, height, width]` (`mrope_section`).
    pub sections: [usize; 3],
    /// Qwen3-VL's interleaved assignment (`mrope_interleaved`); chunked otherwise.
    pub interleaved: bool,
}

impl MRope {
    /// Qwen3-VL's default `mrope_section` (transformers uses it when a config omits the key).
    pub const QWEN3_VL_SECTIONS: [usize; 3] = [24, 20, 20];

    /// The sections must cover the rotation pairs exactly, as transformers' `split` requires.
    pub fn validate(&self, pairs: usize) -> Result<()> {
        let sum: usize = self.sections.iter().sum();
        if sum != pairs {
            return Err(Error::InvalidValue {
                key: "mrope_section".into(),
                reason: format!("{:?} adds up to {sum} pairs, the rotary dim has {pairs}", self.sections),
            });
        }
        Ok(())
    }

    /// The position component (0 time, 1 height, 2 width) of rotation pair `i`.
    pub fn component(&self, i: usize) -> usize {
        let [t, h, w] = self.sections;
        if self.interleaved {
            match i % 3 {
                1 if i < 3 * h => 1,
                2 if i < 3 * w => 2,
                _ => 0,
            }
        } else if i < t {
            0
        } else if i < t + h {
            1
        } else {
            2
        }
    }
}
