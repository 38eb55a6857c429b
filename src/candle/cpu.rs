//! CPU tensors: the f64 reference on the same inputs, rounded once to the tensor's dtype.
//! Operands arrive validated (shapes, dtypes, kernel checks) by the public functions.

use super::output_gate::Gate;
use super::{candle_error, from_f64, to_f64, ErrSlot, Rows};
use crate::attention::{AttentionParams, Rotary};
use crate::config::MRope;
use crate::cuda::decode::paged_reference;
use crate::cuda::{Dtype, PagedKvCache};
use crate::error::{Error, Result};
use crate::qk_norm::{NormScope, QkNorm};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout as CLayout, Tensor};

/// Out-of-place rotation of Q and K into dense tensors of their dtype.
pub(super) fn rope(q: &Tensor, k: &Tensor, pos: &[i64], rot: &Rotary) -> Result<(Tensor, Tensor)> {
    let one = |x: &Tensor| -> Result<Tensor> {
        let (n, h, d) = x.dims3().map_err(candle_error)?;
        let mut v = to_f64(x)?;
        reference::rotate(&mut v, n, h, d, h * d, pos, rot)?;
        from_f64(v, x.dims(), x.dtype(), x.device())
    };
    Ok((one(q)?, one(k)?))
}

/// Rotates the rows of one tensor where they lie: token t to `pos[t]`, or with M-RoPE each
/// pair to its row of `pos` (`[3, tokens]`); after the QK norm when `norm` is set (its
/// `q_weight` the tensor's own), and with `rot` None the norm alone.
struct RotateRows<'a> {
    rows: Rows,
    pos: &'a [i64],
    rot: Option<&'a Rotary>,
    mrope: Option<&'a MRope>,
    norm: Option<&'a QkNorm<&'a [f32]>>,
    err: ErrSlot,
}

impl RotateRows<'_> {
    fn run<T: Dtype>(&self, x: &mut [T]) -> Result<()> {
        let (rows, d) = (&self.rows, self.rows.head_dim);
        let mut buf = vec![0.0; rows.heads * d];
        for t in 0..rows.rows {
            let s = rows.at(t, 0);
            let token = &mut x[s..s + rows.heads * d];
            for (b, v) in buf.iter_mut().zip(token.iter()) {
                *b = v.to_f64();
            }
            if let Some(n) = self.norm {
                reference::qk_norm_row(&mut buf, d, n.eps, n.scope, n.q_weight)?;
            }
            for head in buf.chunks_mut(d.max(1)) {
                match (self.rot, self.mrope) {
                    (None, _) => {}
                    (Some(rot), None) => reference::rotate_head(head, self.pos[t] as f64, rot),
                    (Some(rot), Some(m)) => reference::rotate_head_mrope(head, [0, 1, 2].map(|c| self.pos[c * rows.rows + t] as f64), rot, m),
                }
            }
            for (v, b) in token.iter_mut().zip(&buf) {
                *v = T::from_f64(*b);
            }
        }
        Ok(())
    }
}

impl InplaceOp1 for RotateRows<'_> {
    fn name(&self) -> &'static str {
        "rope-attn rope_inplace"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &CLayout) -> candle_core::Result<()> {
        debug_assert_eq!(l.start_offset(), self.rows.offset);
        let done = match s {
            CpuStorage::F32(x) => self.run(x),
            CpuStorage::F16(x) => self.run(x),
            CpuStorage::BF16(x) => self.run(x),
            other => Err(Error::DtypeMismatch { expected: "f32, f16 or bf16", got: other.dtype().as_str() }),
        };
        done.map_err(|e| self.err.keep(e))
    }
}

/// Rotate the rows of `x` in place (positions validated by the caller).
pub(super) fn rotate_inplace(x: &Tensor, rows: Rows, pos: &[i64], rot: &Rotary, mrope: Option<&MRope>) -> Result<()> {
    let op = RotateRows { rows, pos, rot: Some(rot), mrope, norm: None, err: ErrSlot::default() };
    x.inplace_op1(&op).map_err(|e| op.err.or(e))
}

/// The QK norm on the rows of `x` in place (weights: `norm.q_weight`), then the rotation if any
/// (M-RoPE with `mrope`, `pos` then `[3, tokens]`).
pub(super) fn normed_inplace(x: &Tensor, rows: Rows, pos: &[i64], rot: Option<&Rotary>, mrope: Option<&MRope>, norm: &QkNorm<&[f32]>) -> Result<()> {
    let op = RotateRows { rows, pos, rot, mrope, norm: Some(norm), err: ErrSlot::default() };
    x.inplace_op1(&op).map_err(|e| op.err.or(e))
}

/// Prefill over a packed batch: the reference per sequence, queries bottom-right aligned.
pub(super) fn attention_prefill(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Option<&Gate<'_>>,
    p: &AttentionParams,
    cu_q: &[usize],
    cu_k: &[usize],
) -> Result<(Tensor, Tensor)> {
    let (qh, kh, vh) = (to_f64(q)?, to_f64(k)?, to_f64(v)?);
    let (d, hq) = (p.head_dim, p.num_q_heads);
    let tq = cu_q[cu_q.len() - 1];
    let r = reference::attention_varlen(&qh, &kh, &vh, cu_q, cu_k, p)?;
    let (mut out, lse): (Vec<f64>, Vec<f32>) = (r.out, r.lse.iter().map(|&x| x as f32).collect());
    apply_gate(&mut out, gate, p)?;
    let lse = Tensor::from_vec(lse, (hq, tq), q.device()).map_err(candle_error)?;
    Ok((from_f64(out, &[tq, hq, d], q.dtype(), q.device())?, lse))
}

/// Paged attention (decode, and prefill over a paged cache): per sequence b, the queries
/// `cu_q[b]..cu_q[b + 1]` of `q` sit at the last positions of its `lens[b]` cached tokens; keys
/// are gathered through the block table, then the reference. Unlike the kernels (which clamp),
/// out-of-range table entries and lengths are errors here; `max_context` bounds the lengths.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    gate: Option<&Gate<'_>>,
    table: &[i64],
    lens: &[i64],
    cu_q: &[usize],
    max_pages: usize,
    max_context: usize,
    cache: &PagedKvCache,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let (d, hq) = (p.head_dim, p.num_q_heads);
    let tokens = cu_q[cu_q.len() - 1];
    for (b, &ctx) in lens.iter().enumerate() {
        let nq = cu_q[b + 1] - cu_q[b];
        if ctx < nq as i64 {
            return Err(Error::Shape {
                what: "context_lens",
                expected: format!(">= {nq} (the new tokens are in the cache)"),
                got: ctx.to_string(),
            });
        }
        if ctx > max_context as i64 || i32::try_from(ctx).is_err() {
            return Err(Error::Position { what: "context_lens", value: ctx, limit: max_context.min(i32::MAX as usize) as i64 });
        }
    }
    for (b, &ctx) in lens.iter().enumerate() {
        for page in &table[b * max_pages..b * max_pages + (ctx as usize).div_ceil(cache.page_size)] {
            if !(0..cache.num_pages as i64).contains(page) {
                return Err(Error::Position { what: "block_table entry", value: *page, limit: cache.num_pages as i64 - 1 });
            }
        }
    }
    // Validated: the kernels' clamps inside paged_reference change nothing. Table entries past
    // a sequence's context are never read (their i32 value does not matter).
    let table: Vec<i32> = table.iter().map(|&e| e.clamp(i32::MIN as i64, i32::MAX as i64) as i32).collect();
    let lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let runs: Vec<(usize, usize)> = cu_q.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
    let (kc, vc) = (to_f64(k_cache)?, to_f64(v_cache)?);
    let (mut out, lse) = paged_reference(&to_f64(q)?, &kc, &vc, &table, &lens, &runs, max_pages, cache, p)?;
    apply_gate(&mut out, gate, p)?;
    let lse = Tensor::from_vec(lse.iter().map(|&x| x as f32).collect::<Vec<f32>>(), (hq, tokens), q.device()).map_err(candle_error)?;
    Ok((from_f64(out, &[tokens, hq, d], q.dtype(), q.device())?, lse))
}

/// The output gate on the f64 result, before its one rounding to the dtype.
fn apply_gate(out: &mut [f64], gate: Option<&Gate<'_>>, p: &AttentionParams) -> Result<()> {
    match gate {
        Some(g) => reference::output_gate(out, &to_f64(g.tensor)?, &g.packed, p.num_q_heads, p.head_dim),
        None => Ok(()),
    }
}

/// Copies rows of one source into one cache at their slots.
struct CopyRows<'a> {
    src: Rows,
    slots: &'a [i64],
    num_slots: usize,
    err: ErrSlot,
}

fn copy_rows<T: Copy>(dst: &mut [T], base: usize, src: &[T], rows: &Rows, slots: &[i64], num_slots: usize) {
    let row = rows.heads * rows.head_dim;
    for (t, &slot) in slots.iter().enumerate() {
        if slot < 0 || slot as usize >= num_slots {
            continue;
        }
        let (o, s) = (base + slot as usize * row, rows.at(t, 0));
        dst[o..o + row].copy_from_slice(&src[s..s + row]);
    }
}

impl InplaceOp2 for CopyRows<'_> {
    fn name(&self) -> &'static str {
        "rope-attn paged_append"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &CLayout, src: &CpuStorage, _sl: &CLayout) -> candle_core::Result<()> {
        let (b, r, sl, n) = (dl.start_offset(), &self.src, self.slots, self.num_slots);
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy_rows(d, b, s, r, sl, n),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => copy_rows(d, b, s, r, sl, n),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => copy_rows(d, b, s, r, sl, n),
            (d, s) => return Err(self.err.keep(Error::DtypeMismatch { expected: d.dtype().as_str(), got: s.dtype().as_str() })),
        }
        Ok(())
    }
}

/// Write K and V rows into their caches (one in-place op per cache).
#[allow(clippy::too_many_arguments)]
pub(super) fn paged_append(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kr: Rows,
    vr: Rows,
    slots: &[i64],
    cache: &PagedKvCache,
    v_norm_eps: Option<f64>,
) -> Result<()> {
    let num_slots = cache.num_pages * cache.page_size;
    // The V norm: each head normalised in f64, rounded once, then copied like any V.
    let (normed, vr) = match v_norm_eps {
        Some(eps) => {
            let mut x = to_f64(v)?;
            reference::qk_norm_row(&mut x, cache.head_dim, eps, NormScope::Head, None)?;
            let t = from_f64(x, &[vr.rows, vr.heads, vr.head_dim], v.dtype(), v.device())?;
            (Some(t), Rows { offset: 0, stride: vr.heads * vr.head_dim, ..vr })
        }
        None => (None, vr),
    };
    let v = normed.as_ref().unwrap_or(v);
    for (dst, src, rows) in [(k_cache, k, kr), (v_cache, v, vr)] {
        let op = CopyRows { src: rows, slots, num_slots, err: ErrSlot::default() };
        dst.inplace_op2(src, &op).map_err(|e| op.err.or(e))?;
    }
    Ok(())
}
