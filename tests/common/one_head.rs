//! One sequence of one head for the emulated trigonometry counts: random bf16 Q `[nq, d]`, K and
//! V `[nk, d]`, each guarded, with the sequence's offsets.
#![cfg(feature = "emulator")]

use super::{as_dtype, guard, rng, uniform};
use half::bf16;
use rope_attn::emulator::{FwdInputs, GuardedBuf};

pub struct OneHead {
    pub q: GuardedBuf<bf16>,
    pub k: GuardedBuf<bf16>,
    pub v: GuardedBuf<bf16>,
    pub cq: GuardedBuf<i32>,
    pub ck: GuardedBuf<i32>,
}

impl OneHead {
    pub fn new(seed: u64, nq: usize, nk: usize, d: usize) -> Self {
        let mut r = rng(seed);
        let mut draw = |n: usize| guard(&as_dtype::<bf16>(&uniform(&mut r, n)).0);
        let (q, k, v) = (draw(nq * d), draw(nk * d), draw(nk * d));
        OneHead { q, k, v, cq: guard(&[0i32, nq as i32]), ck: guard(&[0i32, nk as i32]) }
    }

    pub fn inputs(&self) -> FwdInputs<'_, bf16> {
        FwdInputs { q: &self.q, k: &self.k, v: &self.v, cu_seqlens_q: &self.cq, cu_seqlens_k: &self.ck, seq_starts: None }
    }
}
