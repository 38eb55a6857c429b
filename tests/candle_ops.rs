//! `rope_attn::candle` on CPU tensors against candle's own ops: RoPE against candle-nn's
//! `rope` (half), `rope_i` (interleaved) and `rope_thd`, the QK norm before it against an
//! RMSNorm of candle ops; attention against softmax(QKᵀ·scale +
//! mask)·V written with plain candle ops (matmul, softmax_last_dim, log_sum_exp), for GQA,
//! causal, sliding window with sinks, ALiBi and ReRoPE, prefill and paged decode; the in-place
//! and paged-cache paths, chunked prefill over a paged cache; typed errors. GPU tests compare
//! CUDA tensors with the CPU path (feature `candle-cuda`; they skip loudly without a GPU, fail
//! under ROPE_ATTN_REQUIRE_GPU=1).
//!
//! Tolerances: every input is f32 in [-1, 1). Our CPU path is f64 rounded once to f32
//! (error <= 2^-24 relative). candle computes in f32: a rotated component is x0·c - x1·s with
//! c, s rounded f32 table entries: four roundings of terms <= |x0| + |x1| <= 2, so
//! |candle - exact| <= 4·2^-24·2 ≈ 5e-7 (seen: 1.2e-7); we assert 1e-6. Attention: a score
//! scale·q·k sums d = 64 products of size <= 1; candle's f32 matmul rounds each partial sum.
//! The worst case (all errors one way) is d·2^-24·Σ|q·k|·scale ≈ 3e-5, but the signs of
//! random inputs make them add like a random walk, ~√d·2^-24 ≈ 5e-7 per score; softmax moves
//! outputs (|o| <= 1) and the LSE by about the score error. Seen: <= 2.4e-7 (one f32 ulp of an
//! LSE near 4). We assert 4e-6: 16x room, while a masking or rotation mistake moves results by > 1e-2.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::candle as ra;
use rope_attn::{alibi, Alibi, AttentionParams, Error, Layout, MRope, Mask, RopeConfig, RopeScaling, RopeSchedule, Relative, Rotary};

const ROPE_TOL: f32 = 1e-6;
const ATTN_TOL: f32 = 4e-6;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-1, 1), f32, on `dev`.
fn uniform(r: &mut StdRng, dims: &[usize], dev: &Device) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims, dev).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (flat(a), flat(b));
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| {
        if x == y {
            m // equal infinities
        } else {
            m.max((x - y).abs())
        }
    })
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = max_diff(a, b);
    assert!(e <= tol, "{what}: max |diff| = {e:e} > {tol:e}");
}

fn positions(pos: &[i64]) -> Tensor {
    Tensor::new(pos, &Device::Cpu).unwrap()
}

fn rotary(d: usize, r: usize, layout: Layout, scaling: RopeScaling) -> Rotary {
    let cfg = RopeConfig::with_scaling(10000.0, d, r, Some(4096), scaling).unwrap();
    Rotary::from_schedule(&cfg.schedule(None).unwrap(), layout)
}

/// candle-nn's cos/sin tables `[t, r/2]` at the given positions (angles in f64, rounded once).
fn cos_sin(rot: &Rotary, pos: &[i64]) -> (Tensor, Tensor) {
    let h = rot.inv_freq.len();
    let ang: Vec<f64> = pos.iter().flat_map(|&p| rot.inv_freq.iter().map(move |&f| p as f64 * f)).collect();
    let c: Vec<f32> = ang.iter().map(|a| a.cos() as f32).collect();
    let s: Vec<f32> = ang.iter().map(|a| a.sin() as f32).collect();
    (Tensor::from_vec(c, (pos.len(), h), &Device::Cpu).unwrap(), Tensor::from_vec(s, (pos.len(), h), &Device::Cpu).unwrap())
}

/// candle-nn's rotation of `x` `[t, h, d]`: its rotary part through `rope` / `rope_i` (which
/// take `[b, h, t, r]`), times the attention factor, the rest passed through.
fn candle_rope(x: &Tensor, pos: &[i64], rot: &Rotary) -> Tensor {
    let d = x.dim(2).unwrap();
    let r = rot.rotary_dim;
    let (c, s) = cos_sin(rot, pos);
    let xr = x.narrow(2, 0, r).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap().contiguous().unwrap();
    let y = match rot.layout {
        Layout::Half => candle_nn::rotary_emb::rope(&xr, &c, &s),
        Layout::Interleaved => candle_nn::rotary_emb::rope_i(&xr, &c, &s),
    }
    .unwrap();
    let y = y.squeeze(0).unwrap().transpose(0, 1).unwrap().affine(rot.attention_factor, 0.0).unwrap();
    if r == d {
        y.contiguous().unwrap()
    } else {
        Tensor::cat(&[&y, &x.narrow(2, r, d - r).unwrap()], 2).unwrap()
    }
}

fn random_positions(r: &mut StdRng, n: usize, max: i64) -> Vec<i64> {
    (0..n).map(|_| r.random_range(0..max)).collect()
}

#[test]
fn rope_half_matches_candle_nn_rope() {
    let mut r = rng(1);
    let (t, hq, hk, d) = (37, 4, 2, 64);
    let (q, k) = (uniform(&mut r, &[t, hq, d], &Device::Cpu), uniform(&mut r, &[t, hk, d], &Device::Cpu));
    let pos = random_positions(&mut r, t, 100_000);
    let rot = rotary(d, d, Layout::Half, RopeScaling::Default);
    let (q2, k2) = ra::rope(&q, &k, &positions(&pos), &rot).unwrap();
    assert_eq!((q2.dtype(), q2.dims()), (DType::F32, &[t, hq, d][..]));
    assert_close("q", &q2, &candle_rope(&q, &pos, &rot), ROPE_TOL);
    assert_close("k", &k2, &candle_rope(&k, &pos, &rot), ROPE_TOL);
    // candle-nn's token-major variant takes our layout directly: [1, t, h, d].
    let (c, s) = cos_sin(&rot, &pos);
    let thd = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0).unwrap(), &c, &s).unwrap().squeeze(0).unwrap();
    assert_close("q vs rope_thd", &q2, &thd, ROPE_TOL);
}

#[test]
fn rope_interleaved_matches_candle_nn_rope_i() {
    let mut r = rng(2);
    let (t, hq, hk, d) = (19, 8, 1, 128);
    let (q, k) = (uniform(&mut r, &[t, hq, d], &Device::Cpu), uniform(&mut r, &[t, hk, d], &Device::Cpu));
    let pos = random_positions(&mut r, t, 1 << 20);
    let rot = rotary(d, d, Layout::Interleaved, RopeScaling::Linear { factor: 4.0 });
    let (q2, k2) = ra::rope(&q, &k, &positions(&pos), &rot).unwrap();
    assert_close("q", &q2, &candle_rope(&q, &pos, &rot), ROPE_TOL);
    assert_close("k", &k2, &candle_rope(&k, &pos, &rot), ROPE_TOL);
}

/// Partial rotary (GPT-NeoX rotates a quarter of each head) and YaRN's attention factor:
/// candle-nn rotates the leading r components, the factor scales them, the rest pass through.
#[test]
fn rope_partial_rotary_and_attention_factor_match_candle() {
    let mut r = rng(3);
    let (t, h, d) = (11, 2, 64);
    let (q, k) = (uniform(&mut r, &[t, h, d], &Device::Cpu), uniform(&mut r, &[t, h, d], &Device::Cpu));
    let pos = random_positions(&mut r, t, 50_000);
    for (rdim, layout, scaling) in [
        (16, Layout::Half, RopeScaling::Default),
        (32, Layout::Interleaved, RopeScaling::yarn(8.0, 512)),
        (64, Layout::Half, RopeScaling::yarn(4.0, 1024)),
    ] {
        let rot = rotary(d, rdim, layout, scaling);
        let (q2, k2) = ra::rope(&q, &k, &positions(&pos), &rot).unwrap();
        // af = 0.1 ln(s) + 1 <= 1.21: the bound grows with it, still under ROPE_TOL.
        assert_close("q", &q2, &candle_rope(&q, &pos, &rot), ROPE_TOL * rot.attention_factor as f32);
        assert_close("k", &k2, &candle_rope(&k, &pos, &rot), ROPE_TOL * rot.attention_factor as f32);
    }
}

/// Multimodal RoPE: candle-nn's `rope` with per-token tables whose pair i takes the row of
/// `[3, t]` positions its section names (transformers' construction); both section layouts, on
/// views of a packed QKV tensor (V untouched); positions `[t]` are refused.
#[test]
fn rope_mrope_matches_candle_nn_with_sectioned_tables() {
    let mut r = rng(6);
    let (t, hq, hk, d) = (9, 4, 2, 64);
    let rot = rotary(d, d, Layout::Half, RopeScaling::Default);
    for m in [MRope { sections: [8, 12, 12], interleaved: false }, MRope { sections: [11, 11, 10], interleaved: true }] {
        let rows: Vec<Vec<i64>> = (0..3).map(|c| (0..t as i64).map(|i| if i < 3 { i } else { 3 + c * i + r.random_range(0..40) }).collect()).collect();
        let flat_rows: Vec<i64> = rows.concat();
        let pos = Tensor::from_vec(flat_rows, (3, t), &Device::Cpu).unwrap();
        let qkv = uniform(&mut r, &[t, hq + 2 * hk, d], &Device::Cpu);
        let before = qkv.copy().unwrap();
        let (q, k) = (qkv.narrow(1, 0, hq).unwrap(), qkv.narrow(1, hq, hk).unwrap());
        ra::rope_mrope_inplace(&q, &k, &pos, &rot, &m).unwrap();
        // The tables: cos/sin of pos[component(i)][t] · θ_i, rounded once to f32.
        let ang: Vec<f64> = (0..t).flat_map(|tok| (0..d / 2).map(move |i| (tok, i))).map(|(tok, i)| rows[m.component(i)][tok] as f64 * rot.inv_freq[i]).collect();
        let table = |f: fn(f64) -> f64| Tensor::from_vec(ang.iter().map(|&a| f(a) as f32).collect::<Vec<_>>(), (t, d / 2), &Device::Cpu).unwrap();
        let (c, sn) = (table(f64::cos), table(f64::sin));
        for (x, got, what) in [(before.narrow(1, 0, hq).unwrap(), q, "q"), (before.narrow(1, hq, hk).unwrap(), k, "k")] {
            let xr = x.transpose(0, 1).unwrap().unsqueeze(0).unwrap().contiguous().unwrap();
            let want = candle_nn::rotary_emb::rope(&xr, &c, &sn).unwrap().squeeze(0).unwrap().transpose(0, 1).unwrap();
            assert_close(&format!("{m:?} {what}"), &got, &want, ROPE_TOL);
        }
        assert_eq!(max_diff(&qkv.narrow(1, hq + hk, hk).unwrap(), &before.narrow(1, hq + hk, hk).unwrap()), 0.0, "v moved");
    }
    let m = MRope { sections: [8, 12, 12], interleaved: false };
    let (q, k) = (uniform(&mut r, &[t, hq, d], &Device::Cpu), uniform(&mut r, &[t, hk, d], &Device::Cpu));
    let flat = Tensor::new(&[0i64; 9], &Device::Cpu).unwrap();
    assert!(matches!(ra::rope_mrope_inplace(&q, &k, &flat, &rot, &m), Err(Error::Shape { what: "positions", .. })));
    let rows = Tensor::zeros((3, t), DType::I64, &Device::Cpu).unwrap();
    let bad = MRope { sections: [8, 12, 13], interleaved: false };
    assert!(matches!(ra::rope_mrope_inplace(&q, &k, &rows, &rot, &bad), Err(Error::InvalidValue { .. })));
}

/// In place = out of place, bit for bit (same f64 values, same single rounding), for every
/// dtype; and in place on views of one packed QKV tensor leaves V alone.
#[test]
fn rope_inplace_equals_out_of_place_on_packed_qkv() {
    let mut r = rng(4);
    let (t, hq, hk, d) = (13, 4, 2, 64);
    let pos = random_positions(&mut r, t, 10_000);
    let rot = rotary(d, d, Layout::Half, RopeScaling::Default);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let qkv = uniform(&mut r, &[t, hq + 2 * hk, d], &Device::Cpu).to_dtype(dt).unwrap();
        let before = qkv.copy().unwrap();
        let q = qkv.narrow(1, 0, hq).unwrap();
        let k = qkv.narrow(1, hq, hk).unwrap();
        let (q2, k2) = ra::rope(&q, &k, &positions(&pos), &rot).unwrap();
        assert_eq!(q2.dtype(), dt);
        ra::rope_inplace(&q, &k, &positions(&pos), &rot).unwrap();
        assert_eq!(max_diff(&qkv.narrow(1, 0, hq).unwrap(), &q2), 0.0, "{dt:?} q");
        assert_eq!(max_diff(&qkv.narrow(1, hq, hk).unwrap(), &k2), 0.0, "{dt:?} k");
        assert_eq!(max_diff(&qkv.narrow(1, hq + hk, hk).unwrap(), &before.narrow(1, hq + hk, hk).unwrap()), 0.0, "{dt:?} v moved");
    }
}

/// K/V heads repeated for GQA: `[n, hkv, d]` → `[n, hq, d]` (query head h reads KV head h / g).
fn repeat_kv(x: &Tensor, hq: usize) -> Tensor {
    let (n, hkv, d) = x.dims3().unwrap();
    x.unsqueeze(2).unwrap().expand((n, hkv, hq / hkv, d)).unwrap().reshape((n, hq, d)).unwrap()
}

/// softmax(scale·QKᵀ + bias)·V with plain candle ops. `q` `[nq, hq, d]`, `k`, `v` `[nk, hkv, d]`
/// (already rotated), `bias` `[hq, nq, nk]` (mask as -inf, ALiBi). Returns O `[nq, hq, d]`, LSE `[hq, nq]`.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> (Tensor, Tensor) {
    let hq = q.dim(1).unwrap();
    let qh = q.transpose(0, 1).unwrap().contiguous().unwrap();
    let kh = repeat_kv(k, hq).transpose(0, 1).unwrap().contiguous().unwrap();
    let vh = repeat_kv(v, hq).transpose(0, 1).unwrap().contiguous().unwrap();
    let s = qh.matmul(&kh.t().unwrap()).unwrap().affine(scale, 0.0).unwrap().add(bias).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
    let o = p.matmul(&vh).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    (o, s.log_sum_exp(D::Minus1).unwrap())
}

/// Bias `[hq, nq, nk]`: -inf where the mask hides key j from query i, minus ALiBi's slope·|i-j|.
fn bias(p: &AttentionParams, q_pos: &[i64], k_pos: &[i64]) -> Tensor {
    let hq = p.num_q_heads;
    let mut b = Vec::with_capacity(hq * q_pos.len() * k_pos.len());
    for h in 0..hq {
        // SPEC §4, written out again rather than taken from the crate.
        let slope = p.alibi.map(|a| {
            let g = a.head_offset + h;
            let n = 1usize << (usize::BITS - 1 - a.total_heads.leading_zeros());
            if g < n {
                2f64.powf(-8.0 * (g + 1) as f64 / n as f64)
            } else {
                2f64.powf(-4.0 * (2 * (g - n) + 1) as f64 / n as f64)
            }
        });
        for &i in q_pos {
            for &j in k_pos {
                let hidden = (p.mask.causal && j > i) || p.mask.window.is_some_and(|w| i - j >= w as i64 && j >= p.mask.sinks as i64);
                b.push(if hidden { f32::NEG_INFINITY } else { slope.map_or(0.0, |s| (-s * (i - j).abs() as f64) as f32) });
            }
        }
    }
    Tensor::from_vec(b, (hq, q_pos.len(), k_pos.len()), &Device::Cpu).unwrap()
}

/// One sequence with candle: RoPE from candle-nn, ReRoPE as its fused form (SPEC §3: the near
/// branch is q at i, k at j; the far one q rotated by w against unrotated k), then attention.
fn candle_sequence(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> (Tensor, Tensor) {
    let (nq, nk) = (q.dim(0).unwrap(), k.dim(0).unwrap());
    let off = nk as i64 - nq as i64;
    let q_pos: Vec<i64> = (0..nq as i64).map(|m| off + m).collect();
    let k_pos: Vec<i64> = (0..nk as i64).collect();
    let b = bias(p, &q_pos, &k_pos);
    let scale = p.softmax_scale();
    let Some(rot) = &p.rope else { return candle_attention(q, k, v, &b, scale) };
    let (qr, kr) = (candle_rope(q, &q_pos, rot), candle_rope(k, &k_pos, rot));
    let Relative::ReRope { window } = p.relative else { return candle_attention(&qr, &kr, v, &b, scale) };
    // The scores of both branches, picked per pair.
    let hq = p.num_q_heads;
    let scores = |q: &Tensor, k: &Tensor| {
        let qh = q.transpose(0, 1).unwrap().contiguous().unwrap();
        let kh = repeat_kv(k, hq).transpose(0, 1).unwrap().contiguous().unwrap();
        qh.matmul(&kh.t().unwrap()).unwrap().affine(scale, 0.0).unwrap()
    };
    let q_far = candle_rope(q, &vec![window as i64; nq], rot);
    let near: Vec<u8> = q_pos.iter().flat_map(|&i| k_pos.iter().map(move |&j| (i - j < window as i64) as u8)).collect();
    let near = Tensor::from_vec(near, (1, nq, nk), &Device::Cpu).unwrap().broadcast_as((hq, nq, nk)).unwrap();
    let s = near.where_cond(&scores(&qr, &kr), &scores(&q_far, k)).unwrap().add(&b).unwrap();
    let pr = candle_nn::ops::softmax_last_dim(&s).unwrap();
    let vh = repeat_kv(v, hq).transpose(0, 1).unwrap().contiguous().unwrap();
    (pr.matmul(&vh).unwrap().transpose(0, 1).unwrap().contiguous().unwrap(), s.log_sum_exp(D::Minus1).unwrap())
}

/// A packed batch through `attention_prefill` against candle per sequence.
fn check_prefill(name: &str, p: &AttentionParams, seqs: &[(usize, usize)], seed: u64) {
    let mut r = rng(seed);
    let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
    let (sq, sk): (Vec<usize>, Vec<usize>) = seqs.iter().copied().unzip();
    let (tq, tk) = (sq.iter().sum::<usize>(), sk.iter().sum::<usize>());
    let q = uniform(&mut r, &[tq, hq, d], &Device::Cpu);
    let k = uniform(&mut r, &[tk, hkv, d], &Device::Cpu);
    let v = uniform(&mut r, &[tk, hkv, d], &Device::Cpu);
    let (out, lse) = ra::attention_prefill(&q, &k, &v, p, &sq, &sk).unwrap();
    assert_eq!((out.dims(), lse.dims(), lse.dtype()), (&[tq, hq, d][..], &[hq, tq][..], DType::F32));
    let (mut q0, mut k0) = (0, 0);
    for &(nq, nk) in seqs {
        let (o, l) = candle_sequence(&q.narrow(0, q0, nq).unwrap(), &k.narrow(0, k0, nk).unwrap(), &v.narrow(0, k0, nk).unwrap(), p);
        assert_close(&format!("{name} out, seq at {q0}"), &out.narrow(0, q0, nq).unwrap(), &o, ATTN_TOL);
        assert_close(&format!("{name} lse, seq at {q0}"), &lse.narrow(1, q0, nq).unwrap(), &l, ATTN_TOL);
        (q0, k0) = (q0 + nq, k0 + nk);
    }
}

/// Sequences of one batch: a full prompt, a chunk of a longer one (fewer queries than keys:
/// bottom-right causal alignment) and a single token.
const SEQS: &[(usize, usize)] = &[(9, 9), (5, 17), (1, 1)];

#[test]
fn prefill_gqa_causal_rope_matches_candle() {
    let mut p = AttentionParams::new(8, 2, 64);
    p.rope = Some(rotary(64, 64, Layout::Half, RopeScaling::Default));
    check_prefill("gqa causal rope", &p, SEQS, 10);
    // MQA, no position encoding at all.
    check_prefill("mqa plain", &AttentionParams::new(4, 1, 64), SEQS, 11);
}

/// Head dim 512, Gemma 4's full layers: one KV head, proportional RoPE over the whole head (64
/// of its 256 pairs turning, the rest passed through), against candle-nn's rope over the same
/// frequencies. (d = 512 products per score: the random walk of roundings is √8 times d = 64's,
/// still 6x under the tolerance.)
#[test]
fn prefill_head_dim_512_proportional_rope_matches_candle() {
    let d = 512;
    let mut p = AttentionParams::new(4, 1, d);
    p.rope = Some(rotary(d, d, Layout::Half, RopeScaling::Proportional { factor: 1.0, rotated_pairs: 64 }));
    check_prefill("head_dim 512 proportional", &p, SEQS, 14);
}

#[test]
fn prefill_sliding_window_with_sinks_matches_candle() {
    let mut p = AttentionParams::new(4, 2, 64);
    p.rope = Some(rotary(64, 64, Layout::Interleaved, RopeScaling::Default));
    p.mask = Mask { causal: true, window: Some(4), sinks: 2, chunk: None };
    check_prefill("window 4 + 2 sinks", &p, SEQS, 12);
    p.mask = Mask { causal: true, window: Some(3), sinks: 0, chunk: None };
    check_prefill("window 3", &p, SEQS, 13);
}

#[test]
fn prefill_alibi_matches_candle() {
    // A tensor-parallel shard: local heads 6..12 of a 12-head model (12 is not a power of two,
    // so the shard mixes both halves of SPEC §4's schedule).
    let mut p = AttentionParams::new(6, 2, 64);
    p.alibi = Some(Alibi { total_heads: 12, head_offset: 6 });
    check_prefill("alibi shard", &p, SEQS, 14);
    assert_eq!(alibi::slope(12, 6), 2f64.powf(-8.0 * 7.0 / 8.0)); // the test's formula agrees with ours
    // Bidirectional (an encoder), with RoPE and ALiBi together.
    p.mask = Mask { causal: false, window: None, sinks: 0, chunk: None };
    p.rope = Some(rotary(64, 32, Layout::Half, RopeScaling::Default));
    check_prefill("alibi + partial rope, bidirectional", &p, SEQS, 15);
}

#[test]
fn prefill_rerope_matches_candle() {
    let mut p = AttentionParams::new(4, 4, 64);
    p.rope = Some(rotary(64, 64, Layout::Half, RopeScaling::Default));
    p.relative = Relative::ReRope { window: 3 };
    check_prefill("rerope w=3", &p, SEQS, 16);
}

/// A paged cache filled by `paged_append` from per-sequence K/V; pages handed out shuffled.
struct Paged {
    k_cache: Tensor,
    v_cache: Tensor,
    table: Tensor,
}

fn paged(kv: &[(Tensor, Tensor)], (hkv, d): (usize, usize), page_size: usize, num_pages: usize, max_pages: usize, shared: bool) -> Paged {
    let (k_cache, v_cache) = if shared {
        let both = Tensor::zeros((2, num_pages, page_size, hkv, d), DType::F32, &Device::Cpu).unwrap();
        (both.get(0).unwrap(), both.get(1).unwrap())
    } else {
        let z = || Tensor::zeros((num_pages, page_size, hkv, d), DType::F32, &Device::Cpu).unwrap();
        (z(), z())
    };
    let mut free: Vec<i64> = (0..num_pages as i64).rev().collect();
    free.swap(0, num_pages / 2); // not in order
    let mut table = Vec::new();
    for (k, v) in kv {
        let n = k.dim(0).unwrap();
        let pages: Vec<i64> = (0..max_pages).map(|_| free.pop().unwrap()).collect();
        let slots: Vec<i64> = (0..n).map(|j| pages[j / page_size] * page_size as i64 + (j % page_size) as i64).collect();
        ra::paged_append(k, v, &k_cache, &v_cache, &positions(&slots)).unwrap();
        table.extend(pages);
    }
    let table = Tensor::from_vec(table, (kv.len(), max_pages), &Device::Cpu).unwrap();
    Paged { k_cache, v_cache, table }
}

#[test]
fn decode_matches_candle_and_prefill() {
    let mut r = rng(20);
    let (hq, hkv, d, nq) = (8, 2, 64, 2);
    let ctx = [9usize, 6, 2];
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rotary(d, d, Layout::Half, RopeScaling::Default));
    p.alibi = Some(Alibi { total_heads: 8, head_offset: 0 });
    let kv: Vec<(Tensor, Tensor)> = ctx.iter().map(|&n| (uniform(&mut r, &[n, hkv, d], &Device::Cpu), uniform(&mut r, &[n, hkv, d], &Device::Cpu))).collect();
    let q = uniform(&mut r, &[ctx.len() * nq, hq, d], &Device::Cpu);
    let lens = Tensor::new(&[9i32, 6, 2], &Device::Cpu).unwrap(); // I32 here, I64 table, U32 positions elsewhere
    for shared in [false, true] {
        let c = paged(&kv, (hkv, d), 4, 16, 3, shared);
        let (out, lse) = ra::attention_decode(&q, &c.k_cache, &c.v_cache, &c.table, &lens, 12, &p).unwrap();
        assert_eq!((out.dims(), lse.dims()), (&[ctx.len() * nq, hq, d][..], &[hq, ctx.len() * nq][..]));
        for (b, (k, v)) in kv.iter().enumerate() {
            let qb = q.narrow(0, b * nq, nq).unwrap();
            let (o, l) = candle_sequence(&qb, k, v, &p);
            assert_close(&format!("decode out seq {b} (shared cache {shared})"), &out.narrow(0, b * nq, nq).unwrap(), &o, ATTN_TOL);
            assert_close(&format!("decode lse seq {b}"), &lse.narrow(1, b * nq, nq).unwrap(), &l, ATTN_TOL);
            // The prefill path on the same sequence: the same reference, the same numbers.
            let (po, pl) = ra::attention_prefill(&qb, k, v, &p, &[nq], &[ctx[b]]).unwrap();
            assert_eq!(max_diff(&po, &out.narrow(0, b * nq, nq).unwrap()), 0.0);
            assert_eq!(max_diff(&pl, &lse.narrow(1, b * nq, nq).unwrap()), 0.0);
        }
    }
}

#[test]
fn paged_append_writes_rows_at_slots_and_skips_padding() {
    let mut r = rng(30);
    let (hkv, d, ps, np) = (2, 64, 4, 5);
    // New rows are views of a packed QKV projection (row stride 4 heads).
    let qkv = uniform(&mut r, &[6, 2 + 2 * hkv, d], &Device::Cpu);
    let (k, v) = (qkv.narrow(1, 2, hkv).unwrap(), qkv.narrow(1, 2 + hkv, hkv).unwrap());
    let slots = [7i64, -1, 0, 19, 20, 12]; // -1: padding; 20 = past the pool of 5 x 4: skipped
    for shared in [false, true] {
        let c = paged(&[], (hkv, d), ps, np, 0, shared);
        ra::paged_append(&k, &v, &c.k_cache, &c.v_cache, &positions(&slots)).unwrap();
        let flat_k = c.k_cache.reshape((np * ps, hkv, d)).unwrap();
        let flat_v = c.v_cache.reshape((np * ps, hkv, d)).unwrap();
        let mut written = vec![false; np * ps];
        for (t, &s) in slots.iter().enumerate() {
            if (0..(np * ps) as i64).contains(&s) {
                written[s as usize] = true;
                assert_eq!(max_diff(&flat_k.get(s as usize).unwrap(), &k.get(t).unwrap()), 0.0);
                assert_eq!(max_diff(&flat_v.get(s as usize).unwrap(), &v.get(t).unwrap()), 0.0);
            }
        }
        for (s, w) in written.iter().enumerate() {
            if !w {
                assert_eq!(flat(&flat_k.get(s).unwrap()).iter().chain(&flat(&flat_v.get(s).unwrap())).fold(0.0f32, |m, x| m.max(x.abs())), 0.0, "slot {s} written");
            }
        }
    }
}

/// Gemma 3n's and Gemma 4's V norm in the append: V heads cached as candle's RMS norm of them
/// (f32 ops: x / sqrt(mean(x²) + eps)), K as it is, from views of a packed projection; a bad
/// epsilon refused.
#[test]
fn paged_append_v_normed_caches_the_rms_normalised_v() {
    let mut r = rng(31);
    let (hkv, d, ps, np, eps) = (2, 64, 4, 5, 1e-6);
    let qkv = uniform(&mut r, &[6, 2 + 2 * hkv, d], &Device::Cpu);
    let (k, v) = (qkv.narrow(1, 2, hkv).unwrap(), (qkv.narrow(1, 2 + hkv, hkv).unwrap() * 3.0).unwrap());
    let slots = [7i64, -1, 0, 19, 3, 12];
    let c = paged(&[], (hkv, d), ps, np, 0, false);
    ra::paged_append_v_normed(&k, &v, &c.k_cache, &c.v_cache, &positions(&slots), eps).unwrap();
    let rms = (v.sqr().unwrap().mean_keepdim(2).unwrap() + eps).unwrap().sqrt().unwrap();
    let want = v.broadcast_div(&rms).unwrap();
    let (flat_k, flat_v) = (c.k_cache.reshape((np * ps, hkv, d)).unwrap(), c.v_cache.reshape((np * ps, hkv, d)).unwrap());
    for (t, &s) in slots.iter().enumerate().filter(|(_, &s)| s >= 0) {
        assert_eq!(max_diff(&flat_k.get(s as usize).unwrap(), &k.get(t).unwrap()), 0.0);
        // f64 rounded once against candle's f32 ops (a square, a sum over 64, a sqrt, a
        // division, each a rounding of values near 1): 1e-6.
        assert_close(&format!("v of token {t}"), &flat_v.get(s as usize).unwrap(), &want.get(t).unwrap(), 1e-6);
    }
    for bad in [0.0, f64::NAN, -1.0] {
        assert!(matches!(ra::paged_append_v_normed(&k, &v, &c.k_cache, &c.v_cache, &positions(&slots), bad), Err(Error::Parameter { name: "v_norm eps", .. })));
    }
}

#[test]
fn bf16_and_f16_round_once_from_the_f32_result() {
    let mut r = rng(40);
    let mut p = AttentionParams::new(4, 2, 64);
    p.rope = Some(rotary(64, 64, Layout::Half, RopeScaling::Default));
    let q = uniform(&mut r, &[12, 4, 64], &Device::Cpu);
    let k = uniform(&mut r, &[12, 2, 64], &Device::Cpu);
    let v = uniform(&mut r, &[12, 2, 64], &Device::Cpu);
    for dt in [DType::BF16, DType::F16] {
        let c = |t: &Tensor| t.to_dtype(dt).unwrap();
        let (o, l) = ra::attention_prefill(&c(&q), &c(&k), &c(&v), &p, &[12], &[12]).unwrap();
        // The same inputs widened: the f64 result, rounded once to dt, is what came back.
        let (o32, l32) = ra::attention_prefill(&c(&q).to_dtype(DType::F32).unwrap(), &c(&k).to_dtype(DType::F32).unwrap(), &c(&v).to_dtype(DType::F32).unwrap(), &p, &[12], &[12]).unwrap();
        assert_eq!((o.dtype(), l.dtype()), (dt, DType::F32));
        // Rounded once from the exact result: within dt's unit roundoff of the f32 rounding of
        // it (plus f32's own and f16's subnormal spacing); LSEs are f32 in both, so equal.
        let u = if dt == DType::BF16 { 2f32.powi(-8) } else { 2f32.powi(-11) };
        for (x, y) in flat(&o).iter().zip(flat(&o32)) {
            assert!((x - y).abs() <= (u + 2f32.powi(-24)) * y.abs() + 6e-8, "{dt:?}: {x} vs {y}");
        }
        assert_eq!(max_diff(&l, &l32), 0.0, "{dt:?}");
    }
}

/// Our errors go through candle's `?` too.
#[test]
fn errors_convert_into_candle_errors() {
    fn f(q: &Tensor) -> candle_core::Result<()> {
        let rot = Rotary::from_schedule(&RopeSchedule::plain(10000.0, 64)?, Layout::Half);
        ra::rope(q, q, &Tensor::new(&[0u32], &Device::Cpu)?, &rot)?;
        Ok(())
    }
    let e = f(&Tensor::zeros((1, 2, 3, 64), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("[tokens, heads, head_dim]"), "{e}");
}

/// `assert!(matches!(..))` that shows what came back.
macro_rules! expect {
    ($e:expr, $p:pat) => {
        match $e {
            $p => {}
            other => panic!("expected {}, got {other:?}", stringify!($p)),
        }
    };
}

fn shape<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::Shape { what: w, .. }) if w == what => {}
        other => panic!("expected a shape error about {what}, got {other:?}"),
    }
}

#[test]
fn typed_errors_for_shape_dtype_layout_and_range_mistakes() {
    let dev = Device::Cpu;
    let z = |dims: &[usize], dt: DType| Tensor::zeros(dims, dt, &dev).unwrap();
    let rot = rotary(64, 64, Layout::Half, RopeScaling::Default);
    let pos3 = positions(&[0, 1, 2]);
    let q = z(&[3, 4, 64], DType::F32);
    let k = z(&[3, 2, 64], DType::F32);
    // rope
    shape(ra::rope(&z(&[1, 4, 3, 64], DType::F32), &k, &pos3, &rot), "q"); // [b, h, t, d]
    shape(ra::rope(&z(&[64, 4, 3], DType::F32).permute((2, 1, 0)).unwrap(), &k, &pos3, &rot), "q"); // strided d
    shape(ra::rope(&q, &z(&[4, 2, 64], DType::F32), &pos3, &rot), "k");
    shape(ra::rope(&q, &k, &positions(&[0, 1]), &rot), "positions");
    expect!(ra::rope(&q, &z(&[3, 2, 64], DType::F16), &pos3, &rot), Err(Error::DtypeMismatch { expected: "f32", got: "f16" }));
    expect!(ra::rope(&z(&[3, 4, 64], DType::F64), &z(&[3, 2, 64], DType::F64), &pos3, &rot), Err(Error::DtypeMismatch { .. }));
    expect!(ra::rope(&q, &k, &z(&[3], DType::F32), &rot), Err(Error::DtypeMismatch { expected: "u32, i32 or i64", .. }));
    expect!(ra::rope_inplace(&q, &k, &positions(&[0, -5, 1]), &rot), Err(Error::Position { value: -5, .. }));
    expect!(ra::rope(&q, &k, &pos3, &rotary(128, 128, Layout::Half, RopeScaling::Default)), Err(Error::RotaryDim { rotary_dim: 128, head_dim: 64 }));
    // prefill
    let p = AttentionParams::new(4, 2, 64);
    shape(ra::attention_prefill(&q, &k, &k, &p, &[2], &[3]), "seqlens_q");
    shape(ra::attention_prefill(&q, &k, &k, &p, &[3], &[1, 2]), "seqlens_k");
    shape(ra::attention_prefill(&q, &k, &k, &AttentionParams::new(8, 2, 64), &[3], &[3]), "q");
    expect!(
        ra::attention_prefill(&z(&[3, 4, 32], DType::F32), &z(&[3, 2, 32], DType::F32), &z(&[3, 2, 32], DType::F32), &AttentionParams::new(4, 2, 32), &[3], &[3]),
        Err(Error::UnsupportedHeadDim { head_dim: 32, .. })
    );
    expect!(ra::attention_prefill(&z(&[3, 3, 64], DType::F32), &k, &k, &AttentionParams::new(3, 2, 64), &[3], &[3]), Err(Error::GqaRatio { .. }));
    // decode
    let kc = z(&[4, 4, 2, 64], DType::F32);
    let table = Tensor::new(&[[0u32, 1], [2, 3]], &dev).unwrap();
    let q2 = z(&[2, 4, 64], DType::F32);
    expect!(ra::attention_decode(&q2, &kc, &kc, &table, &Tensor::new(&[3u32, 9], &dev).unwrap(), 8, &p), Err(Error::Position { what: "context_lens", value: 9, .. }));
    expect!(
        ra::attention_decode(&q2, &kc, &kc, &Tensor::new(&[[0u32, 7], [2, 3]], &dev).unwrap(), &Tensor::new(&[8u32, 1], &dev).unwrap(), 8, &p),
        Err(Error::Position { what: "block_table entry", value: 7, .. })
    );
    expect!(ra::attention_decode(&q2, &kc, &kc, &table, &Tensor::new(&[1u32, 1], &dev).unwrap(), 9, &p), Err(Error::Position { what: "max_context", .. }));
    shape(ra::attention_decode(&z(&[3, 4, 64], DType::F32), &kc, &kc, &table, &Tensor::new(&[1u32, 1], &dev).unwrap(), 8, &p), "q");
    shape(ra::attention_decode(&q2, &kc, &kc, &table.t().unwrap(), &Tensor::new(&[1u32, 1], &dev).unwrap(), 8, &p), "block_table");
    shape(ra::attention_decode(&q2, &kc, &z(&[4, 2, 2, 64], DType::F32), &table, &Tensor::new(&[1u32, 1], &dev).unwrap(), 8, &p), "v_cache");
    shape(ra::attention_decode(&q2, &kc.permute((1, 0, 2, 3)).unwrap(), &kc, &table, &Tensor::new(&[1u32, 1], &dev).unwrap(), 8, &p), "k_cache");
    // append: new rows inside the cache, overlapping cache views
    let slots = positions(&[0, 1, 2]);
    let flat_cache = z(&[16, 2, 64], DType::F32);
    let view = flat_cache.narrow(0, 0, 3).unwrap();
    let kc16 = flat_cache.reshape((4, 4, 2, 64)).unwrap();
    shape(ra::paged_append(&view, &k, &kc16, &z(&[4, 4, 2, 64], DType::F32), &slots), "k");
    let both = z(&[9, 4, 2, 64], DType::F32);
    shape(ra::paged_append(&k, &k, &both.narrow(0, 0, 4).unwrap(), &both.narrow(0, 2, 4).unwrap(), &slots), "v_cache");
    expect!(ra::paged_append(&k, &k, &z(&[4, 4, 2, 64], DType::F16), &z(&[4, 4, 2, 64], DType::F16), &slots), Err(Error::DtypeMismatch { .. }));
}

/// CUDA tensors against the CPU path (which the tests above tie to candle). Built only with
/// `candle-cuda`; without a GPU they say so and pass, unless ROPE_ATTN_REQUIRE_GPU=1.
#[test]
fn gpu_candle_ops_match_cpu() {
    #[cfg(not(feature = "candle-cuda"))]
    {
        // Straight to the stderr handle: libtest captures eprintln!, CI logs should show this.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED gpu_candle_ops_match_cpu: built without the `candle-cuda` feature (CUDA tensors untested in this build)");
    }
    #[cfg(feature = "candle-cuda")]
    gpu::run();
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use super::*;

    fn device() -> Option<Device> {
        match rope_attn::cuda::device_status() {
            Ok(_) => Some(Device::new_cuda(0).expect("a device is present but candle could not open it")),
            Err(why) => {
                if std::env::var("ROPE_ATTN_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("gpu_candle_ops_match_cpu: ROPE_ATTN_REQUIRE_GPU=1 but no GPU is usable: {why}");
                }
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED gpu_candle_ops_match_cpu: no GPU ({why}); the candle CUDA path is unproven until this runs on one");
                None
            }
        }
    }

    /// `x` on the GPU in dtype `dt`, and the same rounded values on the CPU.
    fn pair(x: &Tensor, dt: DType, gpu: &Device) -> (Tensor, Tensor) {
        let c = x.to_dtype(dt).unwrap();
        (c.to_device(gpu).unwrap(), c)
    }

    pub fn run() {
        let Some(gpu) = device() else { return };
        let mut r = rng(50);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            // bf16 keeps 8 bits: tolerances scale with the storage dtype (one rounding of the
            // output, plus the kernels' f32 accumulation over rounded inputs).
            let tol = match dt {
                DType::F32 => 2e-5,
                DType::F16 => 4e-3,
                _ => 3e-2,
            };
            let rot = rotary(128, 128, Layout::Half, RopeScaling::yarn(4.0, 1024));
            let (t, hq, hkv, d) = (21, 8, 2, 128);
            let pos: Vec<i64> = (0..t as i64).map(|i| i * 997).collect();
            let (qg, qc) = pair(&uniform(&mut r, &[t, hq, d], &Device::Cpu), dt, &gpu);
            let (kg, kc) = pair(&uniform(&mut r, &[t, hkv, d], &Device::Cpu), dt, &gpu);
            let (vg, vc) = pair(&uniform(&mut r, &[t, hkv, d], &Device::Cpu), dt, &gpu);
            let pg = Tensor::new(pos.as_slice(), &gpu).unwrap().to_dtype(DType::U32).unwrap();
            let (q2g, k2g) = ra::rope(&qg, &kg, &pg, &rot).unwrap();
            let (q2c, k2c) = ra::rope(&qc, &kc, &positions(&pos), &rot).unwrap();
            assert_close(&format!("{dt:?} rope q"), &q2g.to_device(&Device::Cpu).unwrap(), &q2c, tol);
            assert_close(&format!("{dt:?} rope k"), &k2g.to_device(&Device::Cpu).unwrap(), &k2c, tol);
            let (qi, ki) = (qg.copy().unwrap(), kg.copy().unwrap());
            ra::rope_inplace(&qi, &ki, &pg, &rot).unwrap();
            assert_close(&format!("{dt:?} rope_inplace q"), &qi.to_device(&Device::Cpu).unwrap(), &q2c, tol);
            assert_close(&format!("{dt:?} rope_inplace k"), &ki.to_device(&Device::Cpu).unwrap(), &k2c, tol);
            // M-RoPE: the kernel against the CPU path on the same [3, t] positions.
            let m = MRope { sections: [16, 24, 24], interleaved: dt == DType::F16 };
            let rows: Vec<i64> = (0..3 * t as i64).map(|i| (i * 7919) % 100_000).collect();
            let (pm_g, pm_c) = (Tensor::from_vec(rows.clone(), (3, t), &gpu).unwrap(), Tensor::from_vec(rows, (3, t), &Device::Cpu).unwrap());
            let (qm, km, qmc, kmc) = (qg.copy().unwrap(), kg.copy().unwrap(), qc.copy().unwrap(), kc.copy().unwrap());
            ra::rope_mrope_inplace(&qm, &km, &pm_g, &rot, &m).unwrap();
            ra::rope_mrope_inplace(&qmc, &kmc, &pm_c, &rot, &m).unwrap();
            assert_close(&format!("{dt:?} rope_mrope q"), &qm.to_device(&Device::Cpu).unwrap(), &qmc, tol);
            assert_close(&format!("{dt:?} rope_mrope k"), &km.to_device(&Device::Cpu).unwrap(), &kmc, tol);
            // The QK norm (per head, weighted; over all heads, unweighted), then RoPE / alone.
            let w = |n: usize, dev: &Device| Tensor::from_vec((0..n).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect::<Vec<f32>>(), n, dev).unwrap();
            for scope in [rope_attn::NormScope::Head, rope_attn::NormScope::Heads, rope_attn::NormScope::HeadCentred] {
                let (qn, kn, qnc, knc) = (qg.copy().unwrap(), kg.copy().unwrap(), qc.copy().unwrap(), kc.copy().unwrap());
                match scope {
                    // Cohere's LayerNorm: weights per head, then RoPE.
                    rope_attn::NormScope::HeadCentred => {
                        let (qh, kh) = (qg.dim(1).unwrap(), kg.dim(1).unwrap());
                        let (qwg, kwg, qwc, kwc) = (w(qh * d, &gpu), w(kh * d, &gpu), w(qh * d, &Device::Cpu), w(kh * d, &Device::Cpu));
                        let ng = rope_attn::QkNorm { eps: 1e-5, scope, q_weight: Some(&qwg), k_weight: Some(&kwg) };
                        let nc = rope_attn::QkNorm { eps: 1e-5, scope, q_weight: Some(&qwc), k_weight: Some(&kwc) };
                        ra::rope_normed_inplace(&qn, &kn, &pg, &rot, &ng).unwrap();
                        ra::rope_normed_inplace(&qnc, &knc, &positions(&pos), &rot, &nc).unwrap();
                    }
                    rope_attn::NormScope::Head => {
                        let (wg, wc) = (w(d, &gpu), w(d, &Device::Cpu));
                        let ng = rope_attn::QkNorm { eps: 1e-6, scope, q_weight: Some(&wg), k_weight: Some(&wg) };
                        let nc = rope_attn::QkNorm { eps: 1e-6, scope, q_weight: Some(&wc), k_weight: Some(&wc) };
                        ra::rope_normed_inplace(&qn, &kn, &pg, &rot, &ng).unwrap();
                        ra::rope_normed_inplace(&qnc, &knc, &positions(&pos), &rot, &nc).unwrap();
                    }
                    rope_attn::NormScope::Heads => {
                        ra::qk_norm_inplace(&qn, &kn, &rope_attn::QkNorm::unweighted(1e-6, scope)).unwrap();
                        ra::qk_norm_inplace(&qnc, &knc, &rope_attn::QkNorm::unweighted(1e-6, scope)).unwrap();
                    }
                }
                // Normalised values reach ~3: the tolerance scales with them.
                assert_close(&format!("{dt:?} {scope:?} qk_norm q"), &qn.to_device(&Device::Cpu).unwrap(), &qnc, 4.0 * tol);
                assert_close(&format!("{dt:?} {scope:?} qk_norm k"), &kn.to_device(&Device::Cpu).unwrap(), &knc, 4.0 * tol);
            }
            // The gated query (Qwen3-Next, Qwen3.5): RoPE, M-RoPE and the norm alone, GPU
            // against CPU; the gated rows untouched on the GPU.
            {
                use rope_attn::cuda::GatedRotation;
                let (gg, gc) = pair(&uniform(&mut r, &[t, hq, 2 * d], &Device::Cpu), dt, &gpu);
                let (wg, wc) = (w(d, &gpu), w(d, &Device::Cpu));
                let ng = rope_attn::QkNorm { eps: 1e-6, scope: rope_attn::NormScope::Head, q_weight: Some(&wg), k_weight: Some(&wg) };
                let nc = rope_attn::QkNorm { eps: 1e-6, scope: rope_attn::NormScope::Head, q_weight: Some(&wc), k_weight: Some(&wc) };
                let m = MRope { sections: [20, 22, 22], interleaved: true };
                let rows: Vec<i64> = (0..3 * t as i64).map(|i| (i * 7919) % 100_000).collect();
                let (pm_g, pm_c) = (Tensor::from_vec(rows.clone(), (3, t), &gpu).unwrap(), Tensor::from_vec(rows, (3, t), &Device::Cpu).unwrap());
                let pc = positions(&pos);
                for which in 0..3 {
                    let (kgx, kcx) = (kg.copy().unwrap(), kc.copy().unwrap());
                    let (rg, rc) = match which {
                        0 => (GatedRotation::Rope { positions: &pg, rot: &rot }, GatedRotation::Rope { positions: &pc, rot: &rot }),
                        1 => (
                            GatedRotation::Mrope { positions: &pm_g, stride: t, rot: &rot, mrope: &m },
                            GatedRotation::Mrope { positions: &pm_c, stride: t, rot: &rot, mrope: &m },
                        ),
                        _ => (GatedRotation::None, GatedRotation::None),
                    };
                    let qgx = ra::qk_norm_rope_gated(&gg, &kgx, rg, &ng).unwrap();
                    let qcx = ra::qk_norm_rope_gated(&gc, &kcx, rc, &nc).unwrap();
                    assert_close(&format!("{dt:?} gated {which} q"), &qgx.to_device(&Device::Cpu).unwrap(), &qcx, 4.0 * tol);
                    assert_close(&format!("{dt:?} gated {which} k"), &kgx.to_device(&Device::Cpu).unwrap(), &kcx, 4.0 * tol);
                }
                assert_eq!(max_diff(&gg.to_device(&Device::Cpu).unwrap(), &gc), 0.0, "{dt:?}: the gated rows moved");
            }

            let mut p = AttentionParams::new(hq, hkv, d);
            p.rope = Some(rot.clone());
            p.alibi = Some(Alibi { total_heads: 16, head_offset: 8 });
            p.mask = Mask { causal: true, window: Some(7), sinks: 1, chunk: None };
            for rel in [Relative::None, Relative::ReRope { window: 5 }] {
                p.relative = rel;
                let (og, lg) = ra::attention_prefill(&qg, &kg, &vg, &p, &[8, 13], &[8, 13]).unwrap();
                let (oc, lc) = ra::attention_prefill(&qc, &kc, &vc, &p, &[8, 13], &[8, 13]).unwrap();
                assert_close(&format!("{dt:?} {rel:?} prefill out"), &og.to_device(&Device::Cpu).unwrap(), &oc, tol);
                assert_close(&format!("{dt:?} {rel:?} prefill lse"), &lg.to_device(&Device::Cpu).unwrap(), &lc, tol);
            }
            p.relative = Relative::None;

            // Paged: append on both devices, decode on both.
            let both = Tensor::zeros((2, 8, 4, hkv, d), dt, &gpu).unwrap();
            let (kcg, vcg) = (both.get(0).unwrap(), both.get(1).unwrap());
            let (kcc, vcc) = (Tensor::zeros((8, 4, hkv, d), dt, &Device::Cpu).unwrap(), Tensor::zeros((8, 4, hkv, d), dt, &Device::Cpu).unwrap());
            let slots: Vec<i64> = (0..t as i64).map(|j| if j == 3 { -1 } else { (7 - j / 4) * 4 + j % 4 }).collect();
            ra::paged_append(&kg, &vg, &kcg, &vcg, &Tensor::new(slots.as_slice(), &gpu).unwrap()).unwrap();
            ra::paged_append(&kc, &vc, &kcc, &vcc, &positions(&slots)).unwrap();
            assert_eq!(max_diff(&kcg.to_device(&Device::Cpu).unwrap(), &kcc), 0.0, "{dt:?} append k");
            assert_eq!(max_diff(&vcg.to_device(&Device::Cpu).unwrap(), &vcc), 0.0, "{dt:?} append v");
            // The V norm fused into the append (into fresh caches): f32 in the kernel against f64.
            let (kng, vng) = (Tensor::zeros((8, 4, hkv, d), dt, &gpu).unwrap(), Tensor::zeros((8, 4, hkv, d), dt, &gpu).unwrap());
            let (knc, vnc) = (Tensor::zeros((8, 4, hkv, d), dt, &Device::Cpu).unwrap(), Tensor::zeros((8, 4, hkv, d), dt, &Device::Cpu).unwrap());
            ra::paged_append_v_normed(&kg, &vg, &kng, &vng, &Tensor::new(slots.as_slice(), &gpu).unwrap(), 1e-6).unwrap();
            ra::paged_append_v_normed(&kc, &vc, &knc, &vnc, &positions(&slots), 1e-6).unwrap();
            assert_eq!(max_diff(&kng.to_device(&Device::Cpu).unwrap(), &knc), 0.0, "{dt:?} v-normed append k");
            // Normalised values reach ~3: the tolerance scales with them.
            assert_close(&format!("{dt:?} v-normed append v"), &vng.to_device(&Device::Cpu).unwrap(), &vnc, 4.0 * tol);
            let table = Tensor::new(&[[7i64, 6, 5, 4, 3, 2]], &Device::Cpu).unwrap();
            let lens = Tensor::new(&[t as i32], &Device::Cpu).unwrap();
            let qd = qc.narrow(0, 0, 2).unwrap();
            let (odg, ldg) = ra::attention_decode(
                &qd.to_device(&gpu).unwrap(),
                &kcg,
                &vcg,
                &table.to_device(&gpu).unwrap(),
                &lens.to_device(&gpu).unwrap(),
                24,
                &p,
            )
            .unwrap();
            let (odc, ldc) = ra::attention_decode(&qd, &kcc, &vcc, &table, &lens, 24, &p).unwrap();
            assert_close(&format!("{dt:?} decode out"), &odg.to_device(&Device::Cpu).unwrap(), &odc, tol);
            assert_close(&format!("{dt:?} decode lse"), &ldg.to_device(&Device::Cpu).unwrap(), &ldc, tol);
            // Chunked prefill of the last 7 tokens over the same cache (f16 and bf16 only).
            if dt != DType::F32 {
                let qp = qc.narrow(0, t - 7, 7).unwrap();
                let tg = table.to_device(&gpu).unwrap();
                let (opg, lpg) = ra::attention_prefill_paged(&qp.to_device(&gpu).unwrap(), &kcg, &vcg, &tg, &lens.to_device(&gpu).unwrap(), &[7], Some(t), &p).unwrap();
                let (opc, lpc) = ra::attention_prefill_paged(&qp, &kcc, &vcc, &table, &lens, &[7], None, &p).unwrap();
                assert_close(&format!("{dt:?} paged prefill out"), &opg.to_device(&Device::Cpu).unwrap(), &opc, tol);
                assert_close(&format!("{dt:?} paged prefill lse"), &lpg.to_device(&Device::Cpu).unwrap(), &lpc, tol);
            }
        }
    }
}

/// Chunked prefill over a paged cache: each sequence's last tokens attend to its whole context
/// read through the block table, bit-identical to attention_prefill on the contiguous keys (both
/// are the reference, rounded once to bf16). The paged op takes f16 and bf16 only, as the kernel.
#[test]
fn paged_prefill_equals_prefill_on_the_gathered_keys() {
    let mut r = rng(25);
    let (hq, hkv, d) = (8, 2, 64);
    let (ctx, chunk) = ([11usize, 6, 3], [4usize, 6, 1]); // a chunk deep in its context, a fresh prompt, one token
    let mut p = AttentionParams::new(hq, hkv, d);
    p.rope = Some(rotary(d, d, Layout::Half, RopeScaling::Default));
    p.alibi = Some(Alibi { total_heads: 8, head_offset: 0 });
    p.mask = Mask { causal: true, window: Some(5), sinks: 1, chunk: None };
    let kv: Vec<(Tensor, Tensor)> = ctx.iter().map(|&n| (uniform(&mut r, &[n, hkv, d], &Device::Cpu), uniform(&mut r, &[n, hkv, d], &Device::Cpu))).collect();
    let total: usize = chunk.iter().sum();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let q = bf(&uniform(&mut r, &[total, hq, d], &Device::Cpu));
    let c = paged(&kv, (hkv, d), 4, 16, 3, false);
    let (kc, vc) = (bf(&c.k_cache), bf(&c.v_cache));
    let lens = Tensor::new(&[11u32, 6, 3], &Device::Cpu).unwrap();
    let (out, lse) = ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &lens, &chunk, None, &p).unwrap();
    // The contexts' sum as the bound gives the same result; a bound below it is refused.
    let (out20, _) = ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &lens, &chunk, Some(20), &p).unwrap();
    assert_eq!(max_diff(&out20, &out), 0.0);
    expect!(ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &lens, &chunk, Some(19), &p), Err(Error::Position { value: 20, limit: 19, .. }));
    assert_eq!((out.dims(), lse.dims(), out.dtype()), (&[total, hq, d][..], &[hq, total][..], DType::BF16));
    let mut q0 = 0;
    for (b, (k, v)) in kv.iter().enumerate() {
        let qb = q.narrow(0, q0, chunk[b]).unwrap();
        let (po, pl) = ra::attention_prefill(&qb, &bf(k), &bf(v), &p, &[chunk[b]], &[ctx[b]]).unwrap();
        assert_eq!(max_diff(&po, &out.narrow(0, q0, chunk[b]).unwrap()), 0.0, "seq {b}");
        assert_eq!(max_diff(&pl, &lse.narrow(1, q0, chunk[b]).unwrap()), 0.0, "seq {b}");
        q0 += chunk[b];
    }
    // f32 is refused (the kernel runs on tensor cores); lengths must match the table and q.
    let qf = q.to_dtype(DType::F32).unwrap();
    expect!(ra::attention_prefill_paged(&qf, &c.k_cache, &c.v_cache, &c.table, &lens, &chunk, None, &p), Err(Error::DtypeMismatch { got: "f32", .. }));
    shape(ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &lens, &chunk[..2], None, &p), "seqlens_q");
    shape(ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &lens, &[4, 6, 2], None, &p), "seqlens_q");
    // A chunk longer than its context: an error on the CPU (the kernel would clamp).
    let short = Tensor::new(&[11u32, 6, 0], &Device::Cpu).unwrap();
    shape(ra::attention_prefill_paged(&q, &kc, &vc, &c.table, &short, &chunk, None, &p), "context_lens");
}

/// Qwen3's RMSNorm in plain candle ops over the last dim: x / sqrt(mean(x²) + eps) · w.
fn candle_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
}

/// The QK norm on views of one packed QKV tensor against candle ops (the norm above, then
/// candle-nn's rope): Qwen3's per-head norm before RoPE (`rope_normed_inplace`), OLMo 2's norm
/// over all heads before RoPE, Llama 4's unweighted norm alone (`qk_norm_inplace`). V is left
/// alone. Tolerance: the norm's f32 (a mean of 64 squares, a square root, a division, a
/// product: a few 2^-24 relative of outputs up to ~5) then the rope bound: 4e-6.
#[test]
fn qk_norm_matches_candle_ops_on_packed_qkv() {
    use rope_attn::{NormScope, QkNorm};
    let mut r = rng(41);
    let (t, hq, hk, d, eps) = (11, 4, 2, 64, 1e-6);
    let pos = random_positions(&mut r, t, 10_000);
    let rot = rotary(d, d, Layout::Half, RopeScaling::Default);
    let weights = |r: &mut StdRng, n: usize| uniform(r, &[n], &Device::Cpu).affine(0.75, 1.0).unwrap();
    for (case, scope) in [(0, NormScope::Head), (1, NormScope::Heads), (2, NormScope::Head), (3, NormScope::HeadCentred)] {
        // Off centre, so that the LayerNorm's centring shows.
        let qkv = uniform(&mut r, &[t, hq + 2 * hk, d], &Device::Cpu).affine(1.0, 0.5).unwrap();
        let before = qkv.copy().unwrap();
        let (q, k) = (qkv.narrow(1, 0, hq).unwrap(), qkv.narrow(1, hq, hk).unwrap());
        let span = |h: usize| if scope == NormScope::Head { d } else { h * d };
        let (qw, kw) = match case {
            2 => (Tensor::ones(d, DType::F32, &Device::Cpu).unwrap(), Tensor::ones(d, DType::F32, &Device::Cpu).unwrap()),
            _ => (weights(&mut r, span(hq)), weights(&mut r, span(hk))),
        };
        // The yardstick on copies: per head over [t, h, d], or over all heads as [t, h·d].
        let want = |x: &Tensor, w: &Tensor, h: usize| {
            let x = x.contiguous().unwrap();
            let n = match scope {
                NormScope::Head => candle_rms_norm(&x, w, eps),
                NormScope::Heads => candle_rms_norm(&x.reshape((t, h * d)).unwrap(), w, eps).reshape((t, h, d)).unwrap(),
                // Cohere's LayerNorm per head, in candle's tensor ops: centre, scale, its head's weights.
                NormScope::HeadCentred => {
                    let xc = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
                    let r = xc.sqr().unwrap().mean_keepdim(2).unwrap().affine(1.0, eps).unwrap().sqrt().unwrap();
                    xc.broadcast_div(&r).unwrap().broadcast_mul(&w.reshape((1, h, d)).unwrap()).unwrap()
                }
            };
            if case == 2 { n } else { candle_rope(&n, &pos, &rot) }
        };
        let (wq, wk) = (want(&q, &qw, hq), want(&k, &kw, hk));
        match case {
            2 => ra::qk_norm_inplace(&q, &k, &QkNorm::unweighted(eps, scope)).unwrap(),
            _ => ra::rope_normed_inplace(&q, &k, &positions(&pos), &rot, &QkNorm { eps, scope, q_weight: Some(&qw), k_weight: Some(&kw) }).unwrap(),
        }
        assert_close(&format!("{scope:?} {case} q"), &qkv.narrow(1, 0, hq).unwrap(), &wq, 4.0 * ROPE_TOL);
        assert_close(&format!("{scope:?} {case} k"), &qkv.narrow(1, hq, hk).unwrap(), &wk, 4.0 * ROPE_TOL);
        assert_eq!(max_diff(&qkv.narrow(1, hq + hk, hk).unwrap(), &before.narrow(1, hq + hk, hk).unwrap()), 0.0, "v moved");
    }
}

/// Bad norm weights are refused with a typed error, the tensors untouched.
#[test]
fn qk_norm_refuses_bad_weights() {
    use rope_attn::{NormScope, QkNorm};
    let mut r = rng(42);
    let (t, hq, hk, d) = (3, 4, 2, 64);
    let (q, k) = (uniform(&mut r, &[t, hq, d], &Device::Cpu), uniform(&mut r, &[t, hk, d], &Device::Cpu));
    let (q0, k0) = (q.copy().unwrap(), k.copy().unwrap());
    let good = Tensor::ones(d, DType::F32, &Device::Cpu).unwrap();
    let half = good.to_dtype(DType::F16).unwrap();
    let square = Tensor::ones((8, 8), DType::F32, &Device::Cpu).unwrap();
    let short = Tensor::ones(d - 1, DType::F32, &Device::Cpu).unwrap();
    for (w, scope, want) in [
        (&half, NormScope::Head, "dtype"),
        (&square, NormScope::Head, "qk_norm k_weight"),
        (&short, NormScope::Head, "qk_norm k_weight"),
        (&good, NormScope::Heads, "qk_norm q_weight"), // one head's weights for all heads
    ] {
        let n = QkNorm { eps: 1e-6, scope, q_weight: Some(&good), k_weight: Some(w) };
        let e = ra::qk_norm_inplace(&q, &k, &n).unwrap_err();
        match (&e, want) {
            (Error::DtypeMismatch { .. }, "dtype") => {}
            (Error::Shape { what, .. }, _) => assert_eq!(*what, want, "{e}"),
            _ => panic!("{want}: unexpected {e:?}"),
        }
    }
    let e = ra::qk_norm_inplace(&q, &k, &QkNorm::<&Tensor>::unweighted(0.0, NormScope::Head)).unwrap_err();
    assert!(matches!(e, Error::Parameter { name: "qk_norm eps", .. }), "{e:?}");
    assert_eq!((max_diff(&q, &q0), max_diff(&k, &k0)), (0.0, 0.0), "a refused call wrote");
}

/// Qwen3-Next's gated query against candle ops: q_proj's output `[t, hq, 2d]` (query then gate
/// per head); the queries narrowed out of it, the RMSNorm above, candle-nn's rope (a quarter of
/// the head rotated, as Qwen3-Next); K a view of a packed [k | v] projection (rows 2·hk·d
/// apart), normalised and rotated in place; the gates and V untouched. And Qwen3.5's M-RoPE:
/// the same as narrowing the queries out, then `qk_norm_inplace` and `rope_mrope_inplace` (both
/// the f64 reference), within one rounding of each. Tolerance as the QK norm's.
#[test]
fn gated_query_matches_candle_ops() {
    use rope_attn::cuda::GatedRotation;
    use rope_attn::{NormScope, QkNorm};
    let mut r = rng(43);
    let (t, hq, hk, d, eps) = (9, 4, 2, 64, 1e-6);
    let pos = random_positions(&mut r, t, 10_000);
    let rot = rotary(d, d / 4, Layout::Half, RopeScaling::Default);
    let weights = |r: &mut StdRng| uniform(r, &[d], &Device::Cpu).affine(0.75, 1.0).unwrap();
    let (qw, kw) = (weights(&mut r), weights(&mut r));
    let norm = QkNorm { eps, scope: NormScope::Head, q_weight: Some(&qw), k_weight: Some(&kw) };
    let gated = uniform(&mut r, &[t, hq, 2 * d], &Device::Cpu);
    let gated0 = gated.copy().unwrap();
    let kv = uniform(&mut r, &[t, 2 * hk, d], &Device::Cpu);
    let kv0 = kv.copy().unwrap();
    let k = kv.narrow(1, 0, hk).unwrap();
    let queries = gated.narrow(2, 0, d).unwrap().contiguous().unwrap();
    let want_q = candle_rope(&candle_rms_norm(&queries, &qw, eps), &pos, &rot);
    let want_k = candle_rope(&candle_rms_norm(&k.contiguous().unwrap(), &kw, eps), &pos, &rot);
    let q = ra::qk_norm_rope_gated(&gated, &k, GatedRotation::Rope { positions: &positions(&pos), rot: &rot }, &norm).unwrap();
    assert_eq!(q.dims(), &[t, hq, d]);
    assert_close("gated q", &q, &want_q, 4.0 * ROPE_TOL);
    assert_close("gated k", &kv.narrow(1, 0, hk).unwrap(), &want_k, 4.0 * ROPE_TOL);
    assert_eq!(max_diff(&gated, &gated0), 0.0, "the gated rows moved");
    assert_eq!(max_diff(&kv.narrow(1, hk, hk).unwrap(), &kv0.narrow(1, hk, hk).unwrap()), 0.0, "v moved");

    // Qwen3.5: M-RoPE over [3, t] rows, against the split route.
    let m = MRope { sections: [4, 2, 2], interleaved: true };
    let rows: Vec<i64> = (0..3 * t as i64).map(|i| (i * 7919) % 100_000).collect();
    let pm = Tensor::from_vec(rows, (3, t), &Device::Cpu).unwrap();
    let k0 = uniform(&mut r, &[t, hk, d], &Device::Cpu);
    let (k1, k2) = (k0.copy().unwrap(), k0.copy().unwrap());
    let q1 = ra::qk_norm_rope_gated(&gated, &k1, GatedRotation::Mrope { positions: &pm, stride: t, rot: &rot, mrope: &m }, &norm).unwrap();
    let q2 = gated.narrow(2, 0, d).unwrap().contiguous().unwrap();
    ra::qk_norm_inplace(&q2, &k2, &norm).unwrap();
    ra::rope_mrope_inplace(&q2, &k2, &pm, &rot, &m).unwrap();
    assert_close("gated mrope q", &q1, &q2, 2.0 * ROPE_TOL);
    assert_close("gated mrope k", &k1, &k2, 2.0 * ROPE_TOL);
    // The norm alone.
    let (k3, k4) = (k0.copy().unwrap(), k0.copy().unwrap());
    let q3 = ra::qk_norm_rope_gated(&gated, &k3, GatedRotation::None, &norm).unwrap();
    let q4 = gated.narrow(2, 0, d).unwrap().contiguous().unwrap();
    ra::qk_norm_inplace(&q4, &k4, &norm).unwrap();
    assert_eq!((max_diff(&q3, &q4), max_diff(&k3, &k4)), (0.0, 0.0));
    // Typed refusals: gated rows of the wrong width, M-RoPE rows of another stride.
    shape(ra::qk_norm_rope_gated(&queries, &k, GatedRotation::None, &norm), "q_gated");
    let e = ra::qk_norm_rope_gated(&gated, &k, GatedRotation::Mrope { positions: &pm, stride: t + 1, rot: &rot, mrope: &m }, &norm).unwrap_err();
    assert!(matches!(e, Error::Stride { what: "mrope positions", .. }), "{e}");
}
