//! CUDA tensors: our launchers on the tensor's device and on the stream candle uses for it.
//!
//! Tensors are reached through candle's op traits, so candle takes the storage locks (read for
//! inputs, write for in-place outputs, aliasing checked): `CustomOp3` for the ops that return
//! new tensors (a second output, K or the LSE, leaves through the op struct), `InplaceOp2/3` for
//! the in-place ones. Integer side inputs (positions, block table, lengths, slots) are read as
//! i32 through their own storage guard (I32 and U32 as they are, I64 after a cast to U32).
//! Operands arrive validated by the public functions; the launchers validate again against the
//! real allocations (lengths from the tensor's offset to the end of its storage, alignment).

use super::output_gate::Gate;
use super::{candle_error, same_storage, with_dtype, Elem, ErrSlot, RopeCall, Rows};
use crate::attention::{AttentionParams, Rotary};
use crate::config::MRope;
use crate::cuda::{self as rc, AttentionBatch, DecodeBatch, Gpu, PagedKvCache, PagedPrefillBatch, RopeShape};
use crate::error::{Error, Result};
use crate::output_gate::OutputGate;
use crate::qk_norm::{NormScope, QkNorm};
use candle_core::op::BackpropOp;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout as CLayout, Shape, Storage, Tensor};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaView};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Our kernels loaded into a candle device's CUDA context, once per context.
pub(super) fn gpu_for(dev: &CudaDevice) -> Arc<Gpu> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let mut map = GPUS.get_or_init(Default::default).lock().unwrap();
    map.entry(ctx.cu_ctx() as usize).or_insert_with(|| Arc::new(Gpu::from_context(ctx.clone()))).clone()
}

pub(super) fn slice<T: Elem>(s: &CudaStorage) -> Result<&CudaSlice<T>> {
    s.as_cuda_slice::<T>().map_err(candle_error)
}

/// An integer tensor the kernels can read as i32: I32 and U32 as they are (U32 bits read as
/// i32 are the same values up to i32::MAX), I64 through candle's I64 → U32 cast (the low 32 bits:
/// the same values within i32's range). candle 0.11 has no CUDA cast *to* I32.
pub(super) fn int32_tensor(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::I32 | DType::U32 => Ok(t.clone()),
        _ => t.to_dtype(DType::U32).map_err(candle_error),
    }
}

/// `len` elements of an I32 or U32 CUDA storage from the layout's offset, read as i32.
pub(super) fn i32_view<'a>(s: &'a CudaStorage, l: &CLayout, len: usize, what: &'static str) -> Result<CudaView<'a, i32>> {
    let off = l.start_offset();
    match &s.slice {
        CudaStorageSlice::I32(x) => Ok(x.slice(off..off + len)),
        CudaStorageSlice::U32(x) => {
            let v = x.slice(off..off + len);
            // SAFETY: u32 and i32 have one size and every bit pattern is a valid i32.
            unsafe { v.transmute::<i32>(len) }.ok_or_else(|| Error::BufferTooSmall { what, needed: len, got: v.len() })
        }
        _ => Err(Error::DtypeMismatch { expected: "i32 or u32 (after the i64 cast)", got: "another dtype" }),
    }
}

/// A CUDA tensor's storage behind its read guard.
fn cuda_storage<'a>(guard: &'a candle_core::StorageRef<'_>, what: &'static str) -> Result<&'a CudaStorage> {
    match &**guard {
        Storage::Cuda(s) => Ok(s),
        _ => Err(Error::NoDevice(format!("{what} is not a CUDA tensor"))),
    }
}

fn new_tensor(s: CudaStorage, dims: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), dims, BackpropOp::none(), false)
}

/// The output gate as an op reads it: its storage, the layout's offset, where its gates lie.
#[derive(Clone, Copy)]
struct GateRef<'a> {
    storage: &'a CudaStorage,
    offset: usize,
    layout: OutputGate,
}

impl GateRef<'_> {
    /// The gate's elements from its offset, as `T` (the op's dtype, which the gate shares).
    fn view<T: Elem>(&self) -> Result<CudaView<'_, T>> {
        Ok(slice::<T>(self.storage)?.slice(self.offset..))
    }
}

/// The gate tensor an op may lock beside its operands: the gate itself, or a contiguous copy
/// where it shares storage with one of them (candle holds their locks during the op; a second
/// read lock on one from this thread may deadlock). Returns it with the layout of its gates.
fn lockable_gate(g: &Gate<'_>, operands: &[&Tensor]) -> Result<(Tensor, OutputGate)> {
    if operands.iter().any(|t| same_storage(t, g.tensor)) {
        return Ok((g.tensor.force_contiguous().map_err(candle_error)?, g.packed));
    }
    Ok((g.tensor.clone(), g.strided))
}

/// The op's view of a gate whose storage `held` holds (its read guard and layout).
fn gate_ref<'a>(held: &'a Option<(candle_core::StorageRef<'_>, &CLayout)>, layout: Option<OutputGate>) -> Result<Option<GateRef<'a>>> {
    match (held, layout) {
        (Some((g, l)), Some(layout)) => Ok(Some(GateRef { storage: cuda_storage(g, "gate")?, offset: l.start_offset(), layout })),
        _ => Ok(None),
    }
}

/// The op traits' CPU entry points are never reached: CPU tensors take the reference path.
pub(super) fn not_cpu<T>() -> candle_core::Result<T> {
    candle_core::bail!("rope-attn: CPU tensors take the reference path, not this CUDA op")
}

/// Out-of-place rotation of Q (returned) and K (left in `k_out`).
struct RopeOut<'a> {
    rot: &'a Rotary,
    shape: RopeShape,
    dtype: DType,
    k_out: RefCell<Option<CudaStorage>>,
    err: ErrSlot,
}

impl RopeOut<'_> {
    fn run<T: Elem>(&self, q: &CudaStorage, ql: &CLayout, k: &CudaStorage, kl: &CLayout, pos: &CudaStorage, pl: &CLayout) -> Result<CudaStorage> {
        let dev = &q.device;
        let (stream, gpu, s) = (dev.cuda_stream(), gpu_for(dev), &self.shape);
        let qv = slice::<T>(q)?.slice(ql.start_offset()..);
        let kv = slice::<T>(k)?.slice(kl.start_offset()..);
        let pv = i32_view(pos, pl, s.tokens, "positions")?;
        let mut qo = stream.alloc_zeros::<T>(s.tokens * s.q_heads * s.head_dim)?;
        let mut ko = stream.alloc_zeros::<T>(s.tokens * s.k_heads * s.head_dim)?;
        rc::rope_into(&gpu, &stream, &qv, &kv, &mut qo, &mut ko, &pv, s, self.rot)?;
        *self.k_out.borrow_mut() = Some(CudaStorage::wrap_cuda_slice(ko, dev.clone()));
        Ok(CudaStorage::wrap_cuda_slice(qo, dev.clone()))
    }
}

impl CustomOp3 for RopeOut<'_> {
    fn name(&self) -> &'static str {
        "rope-attn rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<(CpuStorage, Shape)> {
        not_cpu()
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &CLayout,
        k: &CudaStorage,
        kl: &CLayout,
        pos: &CudaStorage,
        pl: &CLayout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = &self.shape;
        let out = with_dtype!(self.dtype, T => self.run::<T>(q, ql, k, kl, pos, pl)).map_err(|e| self.err.keep(e))?;
        Ok((out, Shape::from((s.tokens, s.q_heads, s.head_dim))))
    }
}

pub(super) fn rope(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, shape: &RopeShape) -> Result<(Tensor, Tensor)> {
    let (t, hq, hk, d) = (shape.tokens, shape.q_heads, shape.k_heads, shape.head_dim);
    if t == 0 {
        let z = |h| Tensor::zeros((0, h, d), q.dtype(), q.device()).map_err(candle_error);
        return Ok((z(hq)?, z(hk)?));
    }
    let pos = int32_tensor(positions)?;
    let op = RopeOut { rot, shape: *shape, dtype: q.dtype(), k_out: RefCell::new(None), err: ErrSlot::default() };
    let q_out = q.apply_op3_no_bwd(k, &pos, &op).map_err(|e| op.err.or(e))?;
    let k_out = op.k_out.take().ok_or_else(|| Error::Cuda("rope: the kernel left no K output".into()))?;
    Ok((q_out, new_tensor(k_out, &[t, hk, d])))
}

/// Rotates the rows of one tensor in place (the rope kernel with no K heads).
struct RotateInPlace<'a> {
    rot: &'a Rotary,
    mrope: Option<&'a MRope>,
    shape: RopeShape,
    dtype: DType,
    err: ErrSlot,
}

impl RotateInPlace<'_> {
    fn run<T: Elem>(&self, x: &mut CudaStorage, xl: &CLayout, pos: &CudaStorage, pl: &CLayout) -> Result<()> {
        let dev = x.device.clone();
        let (stream, gpu) = (dev.cuda_stream(), gpu_for(&dev));
        let n = self.shape.tokens;
        let pv = i32_view(pos, pl, if self.mrope.is_some() { 3 * n } else { n }, "positions")?;
        let xs = x.as_cuda_slice_mut::<T>().map_err(candle_error)?;
        let mut view = xs.slice_mut(xl.start_offset()..);
        // The launcher rotates Q and K together; K is an empty view here (k_heads = 0).
        let (mut none, mut rows) = view.split_at_mut(0);
        match self.mrope {
            None => rc::rope_inplace(&gpu, &stream, &mut rows, &mut none, &pv, &self.shape, self.rot),
            Some(m) => rc::rope_inplace_mrope(&gpu, &stream, &mut rows, &mut none, &pv, n, &self.shape, self.rot, m),
        }
    }
}

impl InplaceOp2 for RotateInPlace<'_> {
    fn name(&self) -> &'static str {
        "rope-attn rope_inplace"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<()> {
        not_cpu()
    }

    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &CLayout, pos: &CudaStorage, pl: &CLayout) -> candle_core::Result<()> {
        with_dtype!(self.dtype, T => self.run::<T>(x, xl, pos, pl)).map_err(|e| self.err.keep(e))
    }
}

/// One launch per tensor, each holding only its own storage: Q and K may be views of one
/// packed QKV tensor, whose rows interleave.
pub(super) fn rope_inplace(q: &Tensor, k: &Tensor, positions: &Tensor, rot: &Rotary, mrope: Option<&MRope>, call: &RopeCall) -> Result<()> {
    if call.shape.tokens == 0 {
        return Ok(());
    }
    let pos = int32_tensor(positions)?;
    for (x, r) in [(q, call.q), (k, call.k)] {
        let shape = RopeShape { tokens: r.rows, q_heads: r.heads, k_heads: 0, head_dim: r.head_dim, q_row_stride: r.stride, k_row_stride: 0 };
        let op = RotateInPlace { rot, mrope, shape, dtype: x.dtype(), err: ErrSlot::default() };
        x.inplace_op2(&pos, &op).map_err(|e| op.err.or(e))?;
    }
    Ok(())
}

/// The QK norm on the rows of one tensor in place, then its rotation if any (M-RoPE with
/// `mrope`; the rope kernel with no K heads): side inputs the positions and the weights, each a
/// stand-in when absent.
struct NormInPlace<'a> {
    rot: Option<&'a Rotary>,
    mrope: Option<&'a MRope>,
    eps: f64,
    scope: NormScope,
    weighted: bool,
    shape: RopeShape,
    dtype: DType,
    err: ErrSlot,
}

impl NormInPlace<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem>(&self, x: &mut CudaStorage, xl: &CLayout, pos: &CudaStorage, pl: &CLayout, w: &CudaStorage, wl: &CLayout) -> Result<()> {
        let dev = x.device.clone();
        let (stream, gpu) = (dev.cuda_stream(), gpu_for(&dev));
        let s = &self.shape;
        let len = self.scope.weight_len(s.q_heads, s.head_dim);
        let wv = match self.weighted {
            true => Some(slice::<f32>(w)?.slice(wl.start_offset()..wl.start_offset() + len)),
            false => None,
        };
        let norm = QkNorm { eps: self.eps, scope: self.scope, q_weight: wv.as_ref(), k_weight: None };
        let xs = x.as_cuda_slice_mut::<T>().map_err(candle_error)?;
        let mut view = xs.slice_mut(xl.start_offset()..);
        let (mut none, mut rows) = view.split_at_mut(0);
        match (self.rot, self.mrope) {
            (Some(rot), None) => {
                let pv = i32_view(pos, pl, s.tokens, "positions")?;
                rc::rope_inplace_normed(&gpu, &stream, &mut rows, &mut none, &pv, s, rot, &norm)
            }
            (Some(rot), Some(m)) => {
                let pv = i32_view(pos, pl, 3 * s.tokens, "positions")?;
                rc::rope_inplace_mrope_normed(&gpu, &stream, &mut rows, &mut none, &pv, s.tokens, s, rot, m, &norm)
            }
            (None, _) => rc::qk_norm_inplace(&gpu, &stream, &mut rows, &mut none, s, &norm),
        }
    }
}

impl InplaceOp3 for NormInPlace<'_> {
    fn name(&self) -> &'static str {
        "rope-attn qk_norm_inplace"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<()> {
        not_cpu()
    }

    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &CLayout, pos: &CudaStorage, pl: &CLayout, w: &CudaStorage, wl: &CLayout) -> candle_core::Result<()> {
        with_dtype!(self.dtype, T => self.run::<T>(x, xl, pos, pl, w, wl)).map_err(|e| self.err.keep(e))
    }
}

/// One launch per tensor, as [`rope_inplace`]: Q with Q's weights, K with K's (each its own
/// "all heads" under [`NormScope::Heads`]).
pub(super) fn normed_inplace(q: &Tensor, k: &Tensor, rotation: Option<(&Tensor, &Rotary)>, norm: &QkNorm<&Tensor>, call: &RopeCall) -> Result<()> {
    if call.shape.tokens == 0 {
        return Ok(());
    }
    let rotation = rotation.map(|(p, r)| (p, r, None));
    normed_rows_inplace(q, call.q, rotation, norm.eps, norm.scope, norm.q_weight)?;
    normed_rows_inplace(k, call.k, rotation, norm.eps, norm.scope, norm.k_weight)
}

/// A one-element stand-in for an absent side input (no kernel reads it).
pub(super) fn stand_in(like: &Tensor) -> Result<Tensor> {
    Tensor::zeros(1, DType::U32, like.device()).map_err(candle_error)
}

/// The QK norm on the rows of one tensor in place, with its weights (`None`: ones), then the
/// rotation if any: positions, rotation and (M-RoPE, positions `[3, tokens]`) sections.
pub(super) fn normed_rows_inplace(
    x: &Tensor,
    r: Rows,
    rotation: Option<(&Tensor, &Rotary, Option<&MRope>)>,
    eps: f64,
    scope: NormScope,
    w: Option<&Tensor>,
) -> Result<()> {
    if r.rows == 0 {
        return Ok(());
    }
    let pos = match rotation {
        Some((p, _, _)) => int32_tensor(p)?,
        None => stand_in(x)?,
    };
    let shape = RopeShape { tokens: r.rows, q_heads: r.heads, k_heads: 0, head_dim: r.head_dim, q_row_stride: r.stride, k_row_stride: 0 };
    let weight = match w {
        Some(w) => w.clone(),
        None => stand_in(x)?,
    };
    let op = NormInPlace {
        rot: rotation.map(|(_, r, _)| r),
        mrope: rotation.and_then(|(_, _, m)| m),
        eps,
        scope,
        weighted: w.is_some(),
        shape,
        dtype: x.dtype(),
        err: ErrSlot::default(),
    };
    x.inplace_op3(&pos, &weight, &op).map_err(|e| op.err.or(e))
}

/// Prefill: the output is returned, the LSE left in `lse`.
struct Prefill<'a> {
    p: &'a AttentionParams,
    batch: &'a AttentionBatch,
    cu_q: &'a [usize],
    cu_k: &'a [usize],
    gate: Option<GateRef<'a>>,
    dtype: DType,
    lse: RefCell<Option<CudaStorage>>,
    err: ErrSlot,
}

impl Prefill<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem>(&self, q: &CudaStorage, ql: &CLayout, k: &CudaStorage, kl: &CLayout, v: &CudaStorage, vl: &CLayout) -> Result<CudaStorage> {
        let (p, b) = (self.p, self.batch);
        let dev = &q.device;
        let (stream, gpu) = (dev.cuda_stream(), gpu_for(dev));
        let qv = slice::<T>(q)?.slice(ql.start_offset()..);
        let kv = slice::<T>(k)?.slice(kl.start_offset()..);
        let vv = slice::<T>(v)?.slice(vl.start_offset()..);
        // Totals fit i32: AttentionBatch::check said so.
        let cu = |c: &[usize]| c.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let cq = stream.clone_htod(&cu(self.cu_q))?;
        let ck = stream.clone_htod(&cu(self.cu_k))?;
        let mut out = stream.alloc_zeros::<T>(b.total_q * p.num_q_heads * p.head_dim)?;
        let mut lse = stream.alloc_zeros::<f32>(p.num_q_heads * b.total_q)?;
        let pre_rotate = rc::prefill_prefers_workspace::<T>(p, b);
        let mut ws = match pre_rotate {
            true => Some(stream.alloc_zeros::<T>(rc::attention_fwd_workspace_len(p, b.total_k).max(1))?),
            false => None,
        };
        let mut wsv = ws.as_mut().map(|w| w.as_view_mut());
        match &self.gate {
            Some(g) => rc::attention_fwd_gated(&gpu, &stream, &qv, &kv, &vv, &g.view::<T>()?, &g.layout, &mut out, &mut lse, &cq, &ck, b, p, wsv.as_mut())?,
            None => rc::attention_fwd(&gpu, &stream, &qv, &kv, &vv, &mut out, &mut lse, &cq, &ck, b, p, wsv.as_mut())?,
        };
        *self.lse.borrow_mut() = Some(CudaStorage::wrap_cuda_slice(lse, dev.clone()));
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for Prefill<'_> {
    fn name(&self) -> &'static str {
        "rope-attn attention_prefill"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<(CpuStorage, Shape)> {
        not_cpu()
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &CLayout,
        k: &CudaStorage,
        kl: &CLayout,
        v: &CudaStorage,
        vl: &CLayout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = with_dtype!(self.dtype, T => self.run::<T>(q, ql, k, kl, v, vl)).map_err(|e| self.err.keep(e))?;
        Ok((out, Shape::from((self.batch.total_q, self.p.num_q_heads, self.p.head_dim))))
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_prefill(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Option<&Gate<'_>>,
    p: &AttentionParams,
    batch: &AttentionBatch,
    cu_q: &[usize],
    cu_k: &[usize],
) -> Result<(Tensor, Tensor)> {
    let (tq, hq, d) = (batch.total_q, p.num_q_heads, p.head_dim);
    if tq == 0 {
        let out = Tensor::zeros((0, hq, d), q.dtype(), q.device()).map_err(candle_error)?;
        return Ok((out, Tensor::zeros((hq, 0), DType::F32, q.device()).map_err(candle_error)?));
    }
    let gate = gate.map(|g| lockable_gate(g, &[q, k, v])).transpose()?;
    let held = gate.as_ref().map(|(t, _)| t.storage_and_layout());
    let gate = gate_ref(&held, gate.as_ref().map(|g| g.1))?;
    let op = Prefill { p, batch, cu_q, cu_k, gate, dtype: q.dtype(), lse: RefCell::new(None), err: ErrSlot::default() };
    let out = q.apply_op3_no_bwd(k, v, &op).map_err(|e| op.err.or(e))?;
    let lse = op.lse.take().ok_or_else(|| Error::Cuda("attention_prefill: the kernel left no LSE".into()))?;
    Ok((out, new_tensor(lse, &[hq, tq])))
}

/// Which paged kernel a [`Paged`] op runs.
enum PagedKind<'a> {
    Decode(&'a DecodeBatch),
    /// Chunked prefill, with the query offsets on the host.
    Prefill(&'a PagedPrefillBatch, &'a [usize]),
}

impl PagedKind<'_> {
    fn tokens(&self) -> usize {
        match self {
            PagedKind::Decode(b) => b.batch * b.queries,
            PagedKind::Prefill(b, _) => b.total_q,
        }
    }
}

/// The stream's device's SM count (sizes key splits).
fn sm_count(stream: &Arc<cudarc::driver::CudaStream>) -> Result<usize> {
    let sms = stream.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(sms.max(1) as usize)
}

/// Paged attention over (q, k_cache, v_cache); block table and lengths come in as device views.
struct Paged<'a> {
    p: &'a AttentionParams,
    kind: PagedKind<'a>,
    cache: &'a PagedKvCache,
    table: CudaView<'a, i32>,
    lens: CudaView<'a, i32>,
    gate: Option<GateRef<'a>>,
    dtype: DType,
    lse: RefCell<Option<CudaStorage>>,
    err: ErrSlot,
}

impl Paged<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem>(&self, q: &CudaStorage, ql: &CLayout, kc: &CudaStorage, kcl: &CLayout, vc: &CudaStorage, vcl: &CLayout) -> Result<CudaStorage> {
        let (p, n, tokens) = (self.p, self.cache.len(), self.kind.tokens());
        let dev = &q.device;
        let (stream, gpu) = (dev.cuda_stream(), gpu_for(dev));
        let qv = slice::<T>(q)?.slice(ql.start_offset()..);
        let kv = slice::<T>(kc)?.slice(kcl.start_offset()..kcl.start_offset() + n);
        let vv = slice::<T>(vc)?.slice(vcl.start_offset()..vcl.start_offset() + n);
        let mut out = stream.alloc_zeros::<T>(tokens * p.num_q_heads * p.head_dim)?;
        let mut lse = stream.alloc_zeros::<f32>(p.num_q_heads * tokens)?;
        match self.kind {
            PagedKind::Decode(b) => {
                let splits = rc::decode_splits(p, b, sm_count(&stream)?);
                let mut ws = match splits > 1 {
                    true => Some(stream.alloc_zeros::<f32>(rc::decode_workspace_len(p, b, splits))?),
                    false => None,
                };
                let mut wsv = ws.as_mut().map(|w| w.as_view_mut());
                match &self.gate {
                    Some(g) => rc::attention_decode_gated(&gpu, &stream, &qv, &kv, &vv, &self.table, &self.lens, &g.view::<T>()?, &g.layout, &mut out, &mut lse, self.cache, b, p, splits, wsv.as_mut())?,
                    None => rc::attention_decode(&gpu, &stream, &qv, &kv, &vv, &self.table, &self.lens, &mut out, &mut lse, self.cache, b, p, splits, wsv.as_mut())?,
                }
            }
            PagedKind::Prefill(b, cu_q) => {
                // Totals fit i32: PagedPrefillBatch::check said so.
                let cq = stream.clone_htod(&cu_q.iter().map(|&x| x as i32).collect::<Vec<i32>>())?;
                let splits = rc::paged_prefill_splits(p, b, self.cache, sm_count(&stream)?);
                let mut ws = match splits > 1 {
                    true => Some(stream.alloc_zeros::<f32>(rc::paged_prefill_workspace_len(p, b, splits))?),
                    false => None,
                };
                let mut wsv = ws.as_mut().map(|w| w.as_view_mut());
                // Long chunks: gather the context's K (rotated) and V once, then the wide kernel;
                // not when the workspace (every table slot) would outgrow the cache pool itself.
                let gather_len = rc::paged_prefill_gather_len(p, b, self.cache);
                let mut gather = match rc::paged_prefill_prefers_gather(p, b) && gather_len <= 2 * n {
                    true => Some(stream.alloc_zeros::<T>(gather_len)?),
                    false => None,
                };
                let mut gv = gather.as_mut().map(|w| w.as_view_mut());
                match &self.gate {
                    Some(g) => rc::attention_fwd_paged_gated(&gpu, &stream, &qv, &kv, &vv, &self.table, &self.lens, &cq, &g.view::<T>()?, &g.layout, &mut out, &mut lse, self.cache, b, p, splits, wsv.as_mut(), gv.as_mut())?,
                    None => rc::attention_fwd_paged(&gpu, &stream, &qv, &kv, &vv, &self.table, &self.lens, &cq, &mut out, &mut lse, self.cache, b, p, splits, wsv.as_mut(), gv.as_mut())?,
                };
            }
        }
        *self.lse.borrow_mut() = Some(CudaStorage::wrap_cuda_slice(lse, dev.clone()));
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for Paged<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            PagedKind::Decode(_) => "rope-attn attention_decode",
            PagedKind::Prefill(..) => "rope-attn attention_prefill_paged",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<(CpuStorage, Shape)> {
        not_cpu()
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &CLayout,
        kc: &CudaStorage,
        kcl: &CLayout,
        vc: &CudaStorage,
        vcl: &CLayout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = with_dtype!(self.dtype, T => self.run::<T>(q, ql, kc, kcl, vc, vcl)).map_err(|e| self.err.keep(e))?;
        Ok((out, Shape::from((self.kind.tokens(), self.p.num_q_heads, self.p.head_dim))))
    }
}

/// Run a paged op: the block table and lengths as i32 device views (one read guard per storage:
/// the two may be views of one metadata tensor), then the kernel on candle's stream.
#[allow(clippy::too_many_arguments)]
fn run_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: Option<&Gate<'_>>,
    kind: PagedKind<'_>,
    (batch, max_pages): (usize, usize),
    cache: &PagedKvCache,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let (table, lens) = (int32_tensor(block_table)?, int32_tensor(context_lens)?);
    // The gate's lock is taken first and alone (copied where it shares a storage with any
    // other operand: lockable_gate).
    let gate = gate.map(|g| lockable_gate(g, &[q, k_cache, v_cache, &table, &lens])).transpose()?;
    let held = gate.as_ref().map(|(t, _)| t.storage_and_layout());
    let gate = gate_ref(&held, gate.as_ref().map(|g| g.1))?;
    let shared = same_storage(&table, &lens);
    let (tg, tl) = table.storage_and_layout();
    let lens_guard = if shared { None } else { Some(lens.storage_and_layout()) };
    let (ls, ll) = match &lens_guard {
        Some((g, l)) => (cuda_storage(g, "context_lens")?, *l),
        None => (cuda_storage(&tg, "context_lens")?, lens.layout()),
    };
    let tv = i32_view(cuda_storage(&tg, "block_table")?, tl, batch * max_pages, "block_table")?;
    let lv = i32_view(ls, ll, batch, "context_lens")?;
    let tokens = kind.tokens();
    let op = Paged { p, kind, cache, table: tv, lens: lv, gate, dtype: q.dtype(), lse: RefCell::new(None), err: ErrSlot::default() };
    let out = q.apply_op3_no_bwd(k_cache, v_cache, &op).map_err(|e| op.err.or(e))?;
    let lse = op.lse.take().ok_or_else(|| Error::Cuda(format!("{}: the kernel left no LSE", op.name())))?;
    Ok((out, new_tensor(lse, &[p.num_q_heads, tokens])))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: Option<&Gate<'_>>,
    batch: &DecodeBatch,
    cache: &PagedKvCache,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let dims = (batch.batch, batch.max_pages);
    run_paged(q, k_cache, v_cache, block_table, context_lens, gate, PagedKind::Decode(batch), dims, cache, p)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_prefill_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    context_lens: &Tensor,
    gate: Option<&Gate<'_>>,
    batch: &PagedPrefillBatch,
    cache: &PagedKvCache,
    cu_q: &[usize],
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    if batch.total_q == 0 {
        let out = Tensor::zeros((0, p.num_q_heads, p.head_dim), q.dtype(), q.device()).map_err(candle_error)?;
        return Ok((out, Tensor::zeros((p.num_q_heads, 0), DType::F32, q.device()).map_err(candle_error)?));
    }
    let dims = (batch.batch, batch.max_pages);
    run_paged(q, k_cache, v_cache, block_table, context_lens, gate, PagedKind::Prefill(batch, cu_q), dims, cache, p)
}

/// What every append launch needs besides the two caches.
struct Append<'a> {
    kr: Rows,
    vr: Rows,
    cache: &'a PagedKvCache,
    slots: CudaView<'a, i32>,
    v_norm_eps: Option<f64>,
    dtype: DType,
    err: ErrSlot,
}

impl Append<'_> {
    /// The launch, once both caches are held mutably.
    #[allow(clippy::too_many_arguments)]
    fn launch<T: Elem>(
        &self,
        dev: &CudaDevice,
        k: &CudaStorage,
        kl: &CLayout,
        v: &CudaStorage,
        vl: &CLayout,
        k_cache: &mut cudarc::driver::CudaViewMut<'_, T>,
        v_cache: &mut cudarc::driver::CudaViewMut<'_, T>,
    ) -> Result<()> {
        let (stream, gpu) = (dev.cuda_stream(), gpu_for(dev));
        let kv = slice::<T>(k)?.slice(kl.start_offset()..);
        let vv = slice::<T>(v)?.slice(vl.start_offset()..);
        let (rows, ks, vs) = (self.kr.rows, self.kr.stride, self.vr.stride);
        match self.v_norm_eps {
            Some(eps) => rc::paged_append_v_normed(&gpu, &stream, &kv, &vv, k_cache, v_cache, &self.slots, rows, ks, vs, self.cache, eps),
            None => rc::paged_append(&gpu, &stream, &kv, &vv, k_cache, v_cache, &self.slots, rows, ks, vs, self.cache),
        }
    }

    /// Both caches in one storage (views of a `[2, pages, page_size, Hkv, d]` tensor): split it.
    #[allow(clippy::too_many_arguments)]
    fn shared<T: Elem>(&self, c: &mut CudaStorage, k_off: usize, v_off: usize, k: &CudaStorage, kl: &CLayout, v: &CudaStorage, vl: &CLayout) -> Result<()> {
        let dev = c.device.clone();
        let n = self.cache.len();
        let all = c.as_cuda_slice_mut::<T>().map_err(candle_error)?;
        // The public function checked that the two ranges are disjoint.
        if k_off < v_off {
            let (mut lo, mut hi) = all.split_at_mut(v_off);
            let (mut kc, mut vc) = (lo.slice_mut(k_off..k_off + n), hi.slice_mut(0..n));
            self.launch::<T>(&dev, k, kl, v, vl, &mut kc, &mut vc)
        } else {
            let (mut lo, mut hi) = all.split_at_mut(k_off);
            let (mut vc, mut kc) = (lo.slice_mut(v_off..v_off + n), hi.slice_mut(0..n));
            self.launch::<T>(&dev, k, kl, v, vl, &mut kc, &mut vc)
        }
    }

    /// Two storages: the K cache's (held by the outer op), the V cache's (by the inner one).
    #[allow(clippy::too_many_arguments)]
    fn distinct<T: Elem>(&self, kc: &mut CudaStorage, kcl: &CLayout, vc: &mut CudaStorage, vcl: &CLayout, k: &CudaStorage, kl: &CLayout, v: &CudaStorage, vl: &CLayout) -> Result<()> {
        let dev = kc.device.clone();
        let n = self.cache.len();
        let (ko, vo) = (kcl.start_offset(), vcl.start_offset());
        let mut kcv = kc.as_cuda_slice_mut::<T>().map_err(candle_error)?.slice_mut(ko..ko + n);
        let mut vcv = vc.as_cuda_slice_mut::<T>().map_err(candle_error)?.slice_mut(vo..vo + n);
        self.launch::<T>(&dev, k, kl, v, vl, &mut kcv, &mut vcv)
    }
}

/// In-place op on the K cache (srcs: new K, new V). With `v_cache` set (a storage of its own)
/// it takes the V cache's write lock through a nested in-place op; else V lives at `v_off` in
/// the K cache's storage.
struct AppendOp<'a> {
    a: Append<'a>,
    v_cache: Option<&'a Tensor>,
    v_off: usize,
}

/// The nested op on the V cache, holding what the outer op was handed.
struct AppendInner<'a, 'b> {
    outer: &'b AppendOp<'a>,
    kc: RefCell<Option<(&'b mut CudaStorage, &'b CLayout)>>,
    srcs: [(&'b CudaStorage, &'b CLayout); 2],
}

impl InplaceOp1 for AppendInner<'_, '_> {
    fn name(&self) -> &'static str {
        "rope-attn paged_append (v cache)"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &CLayout) -> candle_core::Result<()> {
        not_cpu()
    }

    fn cuda_fwd(&self, vc: &mut CudaStorage, vcl: &CLayout) -> candle_core::Result<()> {
        let a = &self.outer.a;
        let Some((kc, kcl)) = self.kc.borrow_mut().take() else {
            return Err(a.err.keep(Error::Cuda("paged_append: the K cache was taken twice".into())));
        };
        let [(k, kl), (v, vl)] = self.srcs;
        with_dtype!(a.dtype, T => a.distinct::<T>(kc, kcl, vc, vcl, k, kl, v, vl)).map_err(|e| a.err.keep(e))
    }
}

impl InplaceOp3 for AppendOp<'_> {
    fn name(&self) -> &'static str {
        "rope-attn paged_append"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout, _: &CpuStorage, _: &CLayout) -> candle_core::Result<()> {
        not_cpu()
    }

    fn cuda_fwd(&self, kc: &mut CudaStorage, kcl: &CLayout, k: &CudaStorage, kl: &CLayout, v: &CudaStorage, vl: &CLayout) -> candle_core::Result<()> {
        let a = &self.a;
        match self.v_cache {
            None => {
                let k_off = kcl.start_offset();
                with_dtype!(a.dtype, T => a.shared::<T>(kc, k_off, self.v_off, k, kl, v, vl)).map_err(|e| a.err.keep(e))
            }
            Some(v_cache) => {
                let inner = AppendInner { outer: self, kc: RefCell::new(Some((kc, kcl))), srcs: [(k, kl), (v, vl)] };
                v_cache.inplace_op1(&inner)
            }
        }
    }
}

/// Write K/V rows into the caches in one launch. Lock order: the K cache (write), K and V
/// (read), then, for separate caches, the V cache (write): the public function checked that
/// the V cache shares no storage with K, V or the K cache, so no lock is taken twice.
#[allow(clippy::too_many_arguments)]
pub(super) fn paged_append(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kr: Rows,
    vr: Rows,
    slots: &Tensor,
    cache: &PagedKvCache,
    v_norm_eps: Option<f64>,
) -> Result<()> {
    let shared = same_storage(k_cache, v_cache);
    let slots = int32_tensor(slots)?;
    let (sg, sl) = slots.storage_and_layout();
    let sv = i32_view(cuda_storage(&sg, "slots")?, sl, kr.rows, "slots")?;
    let a = Append { kr, vr, cache, slots: sv, v_norm_eps, dtype: k_cache.dtype(), err: ErrSlot::default() };
    let op = AppendOp { a, v_cache: (!shared).then_some(v_cache), v_off: v_cache.layout().start_offset() };
    k_cache.inplace_op3(k, v, &op).map_err(|e| op.a.err.or(e))
}
