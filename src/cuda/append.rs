//! The paged cache's append (kernels/attention_decode.cu, `append_body`): new unrotated K/V
//! rows written at their slots (vLLM's slot mapping), optionally with Gemma 3n's and Gemma 4's
//! V norm fused, so V costs no pass of its own before it is cached.

use super::decode::PagedKvCache;
use super::device::{Gpu, Module};
use super::dtype::Dtype;
use super::launch::{Backend, Launch, OnStream};
use super::params::{to_i32, AppendParams};
use super::scores::check_rows;
use crate::error::{Error, Result};
use crate::qk_norm::eps_is_valid;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Append new unrotated K/V rows `[tokens, Hkv, d]` into the paged cache at `slots[t]`
/// (`page * page_size + offset`, vLLM's slot mapping; negative slots are skipped).
#[allow(clippy::too_many_arguments)]
pub fn paged_append<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    k_cache: &mut impl DevicePtrMut<T>,
    v_cache: &mut impl DevicePtrMut<T>,
    slots: &impl DevicePtr<i32>,
    tokens: usize,
    k_row_stride: usize,
    v_row_stride: usize,
    cache: &PagedKvCache,
) -> Result<()> {
    append(gpu, stream, k, v, k_cache, v_cache, slots, AppendRows { tokens, k_row_stride, v_row_stride, v_norm_eps: None }, cache)
}

/// [`paged_append`] with Gemma 3n's and Gemma 4's V norm fused (`HfLayer::v_norm`): each V head
/// is cached RMS-normalised without weights, `v / sqrt(mean(v²) + eps)` in f32, rounded once;
/// K is cached as it is. Its f64 twin: [`crate::reference::qk_norm_row`] over each V head
/// (`NormScope::Head`, no weight).
#[allow(clippy::too_many_arguments)]
pub fn paged_append_v_normed<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    k_cache: &mut impl DevicePtrMut<T>,
    v_cache: &mut impl DevicePtrMut<T>,
    slots: &impl DevicePtr<i32>,
    tokens: usize,
    k_row_stride: usize,
    v_row_stride: usize,
    cache: &PagedKvCache,
    v_norm_eps: f64,
) -> Result<()> {
    append(gpu, stream, k, v, k_cache, v_cache, slots, AppendRows { tokens, k_row_stride, v_row_stride, v_norm_eps: Some(v_norm_eps) }, cache)
}

#[allow(clippy::too_many_arguments)]
fn append<T: Dtype>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    k_cache: &mut impl DevicePtrMut<T>,
    v_cache: &mut impl DevicePtrMut<T>,
    slots: &impl DevicePtr<i32>,
    rows: AppendRows,
    cache: &PagedKvCache,
) -> Result<()> {
    let be = OnStream::new(gpu, stream)?;
    let lens = [k.len(), v.len(), k_cache.len(), v_cache.len(), slots.len()];
    rows.check(lens, cache)?;
    let (kp, _g1) = k.device_ptr(stream);
    let (vp, _g2) = v.device_ptr(stream);
    let (kc, _g3) = k_cache.device_ptr_mut(stream);
    let (vc, _g4) = v_cache.device_ptr_mut(stream);
    let (sp, _g5) = slots.device_ptr(stream);
    launch_append::<T, _>(&be, [kp, vp, kc, vc, sp], &rows, cache)
}

/// The new rows of a [`paged_append`].
pub(crate) struct AppendRows {
    pub tokens: usize,
    pub k_row_stride: usize,
    pub v_row_stride: usize,
    /// The V norm's epsilon ([`paged_append_v_normed`]), if V is normalised as it is cached.
    pub v_norm_eps: Option<f64>,
}

impl AppendRows {
    /// Validate lengths `[k, v, k_cache, v_cache, slots]` (elements).
    pub(crate) fn check(&self, [k, v, k_cache, v_cache, slots]: [usize; 5], cache: &PagedKvCache) -> Result<()> {
        let (hkv, d) = (cache.kv_heads, cache.head_dim);
        check_rows("k", k, self.tokens, self.k_row_stride, hkv, d)?;
        check_rows("v", v, self.tokens, self.v_row_stride, hkv, d)?;
        for (what, got, needed) in [("k_cache", k_cache, cache.len()), ("v_cache", v_cache, cache.len()), ("slots", slots, self.tokens)] {
            if got < needed {
                return Err(Error::BufferTooSmall { what, needed, got });
            }
        }
        to_i32("tokens", self.tokens)?;
        to_i32("num_pages * page_size", cache.num_pages * cache.page_size)?;
        check_v_norm_eps(self.v_norm_eps)
    }
}

/// The V norm's epsilon, if any, as the kernel takes it: finite and > 0 in f32 (the candle
/// ops' CPU path checks it the same way).
pub(crate) fn check_v_norm_eps(v_norm_eps: Option<f64>) -> Result<()> {
    match v_norm_eps.filter(|&e| !eps_is_valid(e)) {
        Some(eps) => Err(Error::Parameter { name: "v_norm eps", value: eps, reason: "must be finite and > 0 in f32" }),
        None => Ok(()),
    }
}

/// Plan and run an append on buffers `[k, v, k_cache, v_cache, slots]` that [`AppendRows::check`] accepted.
pub(crate) fn launch_append<T: Dtype, B: Backend>(be: &B, [k, v, k_cache, v_cache, slots]: [u64; 5], rows: &AppendRows, cache: &PagedKvCache) -> Result<()> {
    if rows.tokens == 0 {
        return Ok(());
    }
    let params = AppendParams {
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k_row_stride: rows.k_row_stride as i64,
        v_row_stride: rows.v_row_stride as i64,
        tokens: rows.tokens as i32,
        kv_heads: cache.kv_heads as i32,
        head_dim: cache.head_dim as i32,
        num_slots: (cache.num_pages * cache.page_size) as i32,
        v_norm_eps: rows.v_norm_eps.map_or(0.0, |e| e as f32),
        pad_: 0,
    };
    // The kernel skips slots outside the pool.
    let name = format!("paged_append_{}", T::NAME);
    be.run(&Launch { module: Module::AttentionDecode, name, grid: (rows.tokens as u32, 1, 1), threads: 128, smem: 0, params })
}
