//! A prefill at explicit sequence starts (`seq_starts`) through the emulated kernels, compared
//! with the reference at the same positions (checked mode takes default positions only).
#![cfg(feature = "emulator")]

use super::{as_dtype, cu_seqlens, guard, rng, uniform};
use rope_attn::cuda::{attention_fwd_workspace_len, max_abs, AttentionBatch, CheckReport, Dtype, Tolerance};
use rope_attn::emulator::{Emulator, FwdInputs, GuardedBuf};
use rope_attn::{reference, AttentionParams};

/// Two sequences at explicit starting positions (ring attention's key blocks, a chunk of a
/// longer prompt): the first's queries start at -5 (below zero: chunk -1 holds them, and the
/// query temperature's factor is 1 there), the second crosses the chunk starts 1008 and 1024
/// inside the 64-key tiles (and a temperature floor of 16 at every 16th position).
pub fn prefill_at_explicit_positions<T: Dtype>(emu: &Emulator, p: &AttentionParams, seed: u64, use_ws: bool) {
    let (d, hq, hkv) = (p.head_dim, p.num_q_heads, p.num_kv_heads);
    let (seq_q, seq_k) = ([30usize, 70], [40usize, 130]);
    let starts = [-5i32, 0, 1000, 960];
    let (tq, tk) = (100, 170);
    let last_q = starts[2] as i64 + seq_q[1] as i64 - 1;
    let mut r = rng(seed);
    let (q, qf) = as_dtype::<T>(&uniform(&mut r, tq * hq * d));
    let (k, kf) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let (v, vf) = as_dtype::<T>(&uniform(&mut r, tk * hkv * d));
    let (qg, kg, vg) = (guard(&q), guard(&k), guard(&v));
    let (cq, ck, st) = (guard(&cu_seqlens(&seq_q)), guard(&cu_seqlens(&seq_k)), guard(&starts));
    let batch = AttentionBatch::contiguous(p, 2, 70, tq, tk);
    let mut out = GuardedBuf::filled(tq * hq * d, T::default());
    let mut lse = GuardedBuf::filled(hq * tq, 0f32);
    let mut ws = GuardedBuf::filled(attention_fwd_workspace_len(p, tk), T::default());
    let x = FwdInputs { q: &qg, k: &kg, v: &vg, cu_seqlens_q: &cq, cu_seqlens_k: &ck, seq_starts: Some(&st) };
    emu.attention_fwd(&x, &mut out, &mut lse, &batch, p, use_ws.then_some(&mut ws[..])).unwrap();
    let (tol_o, tol_l) = Tolerance::attention::<T>(p, max_abs(&qf) * p.query_scale_bound(last_q), max_abs(&kf), max_abs(&vf));
    let (mut q0, mut k0) = (0usize, 0usize);
    for b in 0..2 {
        let (nq, nk) = (seq_q[b], seq_k[b]);
        let q_pos: Vec<i64> = (0..nq as i64).map(|m| starts[2 * b] as i64 + m).collect();
        let k_pos: Vec<i64> = (0..nk as i64).map(|j| starts[2 * b + 1] as i64 + j).collect();
        let (kr, qr) = (k0 * hkv * d..(k0 + nk) * hkv * d, q0 * hq * d..(q0 + nq) * hq * d);
        let want = reference::attention(&qf[qr.clone()], &kf[kr.clone()], &vf[kr], &q_pos, &k_pos, p).unwrap();
        let got_o: Vec<f64> = out[qr].iter().map(|x| x.to_f64()).collect();
        let got_l: Vec<f64> = (0..hq).flat_map(|h| (0..nq).map(move |m| (h, m))).map(|(h, m)| lse[h * tq + q0 + m] as f64).collect();
        let rep = CheckReport::compare("out", &got_o, &want.out, tol_o).worst(CheckReport::compare("lse", &got_l, &want.lse, tol_l));
        assert!(rep.passed(), "{} {:?} workspace {use_ws} sequence {b}: {rep:?}", T::NAME, p.mask);
        q0 += nq;
        k0 += nk;
    }
}
