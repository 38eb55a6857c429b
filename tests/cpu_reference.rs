//! Properties of the f64 CPU reference, each checked against something written independently
//! in this file (SPEC §1, §3-§6): the relative-position property of RoPE, ReRoPE and Leaky
//! ReRoPE against their definitions, BLOOM's ALiBi slopes, a naive softmax attention, the merge
//! of partial results, and the sinusoidal table. Tolerances are derived from the arithmetic
//! involved, not tuned.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::{alibi, reference, Alibi, AttentionParams, Layout, Mask, Relative, RopeSchedule, Rotary};

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    // Sum of uniforms: zero mean, unit-ish variance; the exact distribution does not matter.
    (0..n).map(|_| (0..4).map(|_| rng.random_range(-1.0..1.0)).sum::<f64>() * 0.87).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices of pair `i` for a layout (SPEC §1), written here again on purpose.
fn pair_of(layout: Layout, r: usize, i: usize) -> (usize, usize) {
    match layout {
        Layout::Half => (i, i + r / 2),
        Layout::Interleaved => (2 * i, 2 * i + 1),
    }
}

/// SPEC §1 rotation, written independently of `reference::rotate_head`.
fn naive_rotate(x: &[f64], pos: f64, rot: &Rotary) -> Vec<f64> {
    let mut y = x.to_vec();
    let r = rot.rotary_dim;
    for (i, &f) in rot.inv_freq.iter().enumerate() {
        let (a, b) = pair_of(rot.layout, r, i);
        let angle = pos * f;
        let (c, s) = (angle.cos(), angle.sin());
        y[a] = rot.attention_factor * (x[a] * c - x[b] * s);
        y[b] = rot.attention_factor * (x[a] * s + x[b] * c);
    }
    y
}

fn rotated(x: &[f64], pos: f64, rot: &Rotary) -> Vec<f64> {
    let mut y = x.to_vec();
    reference::rotate_head(&mut y, pos, rot);
    y
}

/// Unit in the last place of |x|.
fn ulp(x: f64) -> f64 {
    let x = x.abs();
    f64::from_bits(x.to_bits() + 1) - x
}

fn rotary(theta: f64, d: usize, r: usize, layout: Layout, af: f64) -> Rotary {
    let s = RopeSchedule::plain(theta, r).unwrap();
    assert_eq!(s.rotary_dim, r);
    Rotary { inv_freq: s.inv_freq, rotary_dim: r, layout, attention_factor: af }.tap_validate(d)
}

trait TapValidate {
    fn tap_validate(self, d: usize) -> Self;
}
impl TapValidate for Rotary {
    fn tap_validate(self, d: usize) -> Self {
        self.validate(d).unwrap();
        self
    }
}

#[test]
fn rotate_head_matches_the_definition() {
    let mut g = rng(1);
    for layout in [Layout::Half, Layout::Interleaved] {
        for (d, r, af) in [(64, 64, 1.0), (96, 24, 1.0), (128, 64, 1.1386), (8, 2, 0.7)] {
            let rot = rotary(10000.0, d, r, layout, af);
            for pos in [0.0, 1.0, 7.5, 4095.0, 65535.0, 16777216.0, 16777219.0] {
                let x = randn(&mut g, d);
                let got = rotated(&x, pos, &rot);
                let want = naive_rotate(&x, pos, &rot);
                for c in 0..d {
                    assert!((got[c] - want[c]).abs() <= 1e-14, "{layout:?} d={d} r={r} pos={pos} c={c}");
                }
                assert_eq!(&got[r..], &x[r..], "pass-through components are neither rotated nor scaled");
            }
        }
    }
}

#[test]
fn scores_depend_on_relative_position_only() {
    // (R(m)q)·(R(n)k) = (R(m-n)q)·(R(0)k) exactly in real arithmetic (R(0) only applies the
    // attention factor). In f64 the angles m*f, n*f and (m-n)*f are each rounded once, by at most
    // half an ulp of the angle, and sin/cos/products add a few 1e-16 relative: so for pair i
    //   |lhs - rhs| <= |q_i| |k_i| af^2 (1.5 ulp(max(|m|,|n|,|m-n|) f_i) + 8 eps)
    // summed over the pairs. The bound is checked and is also shown not to be vacuous: for
    // positions near 2^24 it is ~1e-9 relative, and it is met, while a wrong rotation misses by O(1).
    let mut g = rng(2);
    let mut max_pos_seen = 0i64;
    for layout in [Layout::Half, Layout::Interleaved] {
        for (d, r, af, theta) in [(64, 64, 1.0, 10000.0), (96, 24, 1.0, 10000.0), (128, 128, 1.2, 500000.0), (128, 64, 1.0, 1e6)] {
            let rot = rotary(theta, d, r, layout, af);
            for _ in 0..60 {
                let q = randn(&mut g, d);
                let k = randn(&mut g, d);
                let scale_pos = [16i64, 4096, 1 << 20, 1 << 25][g.random_range(0..4)];
                let m = g.random_range(0..=scale_pos);
                let n = g.random_range(0..=scale_pos);
                max_pos_seen = max_pos_seen.max(m.max(n));
                let lhs = dot(&rotated(&q, m as f64, &rot), &rotated(&k, n as f64, &rot));
                let rhs = dot(&rotated(&q, (m - n) as f64, &rot), &rotated(&k, 0.0, &rot));
                let mut tol = 1e-13;
                for (i, f) in rot.inv_freq.iter().enumerate() {
                    let (a, b) = pair_of(layout, r, i);
                    let biggest = (m.max(n).max((m - n).abs()) as f64) * f;
                    // (r + 8) eps: products, sin/cos, and the r-term summation of each dot product.
                    tol += q[a].hypot(q[b]) * k[a].hypot(k[b]) * af * af * (1.5 * ulp(biggest) + (r as f64 + 8.0) * f64::EPSILON);
                }
                // Pass-through part: plain products, exact up to summation order.
                tol += dot(&q[r..].iter().map(|x| x.abs()).collect::<Vec<_>>(), &k[r..].iter().map(|x| x.abs()).collect::<Vec<_>>()) * 4.0 * f64::EPSILON;
                assert!((lhs - rhs).abs() <= tol, "{layout:?} d={d} r={r} m={m} n={n}: {lhs} vs {rhs} (tol {tol:e})");
                // And a shifted pair of positions gives the same score.
                let shift = g.random_range(0..1000i64);
                let shifted = dot(&rotated(&q, (m + shift) as f64, &rot), &rotated(&k, (n + shift) as f64, &rot));
                assert!((shifted - lhs).abs() <= 2.0 * tol + 1e-12, "shift invariance m={m} n={n} shift={shift}");
            }
        }
    }
    assert!(max_pos_seen > 1 << 24, "positions must reach past 2^24");
}

#[test]
fn reference_scores_obey_the_relative_property_beyond_2_pow_24() {
    // The same property through the public scores API: one query and one key shifted together
    // by 2^24 + 3 give the same score as at small positions.
    let mut g = rng(3);
    let d = 64;
    let mut p = AttentionParams::new(1, 1, d);
    p.rope = Some(rotary(10000.0, d, d, Layout::Half, 1.0));
    let q = randn(&mut g, d);
    let k = randn(&mut g, 2 * d);
    let base = reference::scores(&q, &k, &[9], &[2, 9], &p).unwrap();
    let off = (1i64 << 24) + 3;
    let far = reference::scores(&q, &k, &[9 + off], &[2 + off, 9 + off], &p).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let bound = scale * q.iter().map(|x| x * x).sum::<f64>().sqrt() * k.iter().map(|x| x * x).sum::<f64>().sqrt() * 3.0 * ulp(off as f64 + 9.0);
    for (a, b) in base.iter().zip(&far) {
        assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound:e})");
    }
}

/// Scores for every (query, key) pair through `reference::scores`, `[Hq, Nq, Nk]`.
fn scores_for(p: &AttentionParams, q: &[f64], k: &[f64], qp: &[i64], kp: &[i64]) -> Vec<f64> {
    reference::scores(q, k, qp, kp, p).unwrap()
}

#[test]
fn rerope_equals_rope_inside_the_window() {
    let mut g = rng(4);
    let (hq, hkv, d, w) = (4, 2, 64, 6usize);
    let n = 20;
    let pos: Vec<i64> = (0..n as i64).collect();
    let q = randn(&mut g, n * hq * d);
    let k = randn(&mut g, n * hkv * d);
    for layout in [Layout::Half, Layout::Interleaved] {
        for af in [1.0, 1.1386] {
            let rot = rotary(10000.0, d, d, layout, af);
            let mut plain = AttentionParams::new(hq, hkv, d);
            plain.rope = Some(rot.clone());
            let mut re = plain.clone();
            re.relative = Relative::ReRope { window: w };
            let (s_plain, s_re) = (scores_for(&plain, &q, &k, &pos, &pos), scores_for(&re, &q, &k, &pos, &pos));
            let scale = plain.softmax_scale();
            let (mut inside, mut outside) = (0, 0);
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                for i in 0..n {
                    for j in 0..n {
                        let at = (h * n + i) * n + j;
                        let rel = i as i64 - j as i64;
                        if rel < 0 {
                            assert_eq!(s_re[at], f64::NEG_INFINITY, "causal");
                            continue;
                        }
                        if rel < w as i64 {
                            // Inside the window ReRoPE *is* RoPE: bit-identical.
                            assert_eq!(s_re[at], s_plain[at], "h={h} i={i} j={j}");
                            inside += 1;
                        } else {
                            // Outside: (R(w) q)·(af k) by definition, computed here independently.
                            let qv = &q[(i * hq + h) * d..][..d];
                            let kv = &k[(j * hkv + kvh) * d..][..d];
                            let want = scale * dot(&naive_rotate(qv, w as f64, &rot), &naive_rotate(kv, 0.0, &rot));
                            assert!((s_re[at] - want).abs() <= 1e-12, "far h={h} i={i} j={j}: {} vs {want}", s_re[at]);
                            // and past w it is not plain RoPE (at rel == w the two coincide).
                            if rel > w as i64 {
                                assert!((s_re[at] - s_plain[at]).abs() > 1e-9, "h={h} i={i} j={j}");
                            }
                            outside += 1;
                        }
                    }
                }
            }
            assert!(inside > 100 && outside > 100);
        }
    }
}

#[test]
fn rerope_attention_with_window_beyond_every_distance_is_rope_attention() {
    let mut g = rng(5);
    let (hq, hkv, d, n) = (4, 1, 32, 12);
    let pos: Vec<i64> = (100..100 + n as i64).collect();
    let (q, k, v) = (randn(&mut g, n * hq * d), randn(&mut g, n * hkv * d), randn(&mut g, n * hkv * d));
    let mut plain = AttentionParams::new(hq, hkv, d);
    plain.rope = Some(rotary(10000.0, d, d, Layout::Half, 1.0));
    let mut re = plain.clone();
    re.relative = Relative::ReRope { window: n };
    let a = reference::attention(&q, &k, &v, &pos, &pos, &plain).unwrap();
    let b = reference::attention(&q, &k, &v, &pos, &pos, &re).unwrap();
    assert_eq!(a, b);
}

#[test]
fn leaky_rerope_tends_to_rerope_as_k_grows() {
    // Leaky's distance past the window is w + (rel - w)/k. The score is a smooth function of the
    // angle with |d score / d angle_i| <= scale af^2 |q_i| |k_i| for pair i, so
    //   |leaky_k - rerope| <= scale af^2 sum_i |q_i||k_i| f_i (rel - w) / k  (+ rounding, 1e-13).
    // With k = 1e9 and rel < 64 that is < 1e-7 of the score scale; the bound is checked for a
    // range of k, and the error must actually shrink ~1/k (Leaky is not trivially ReRoPE).
    let mut g = rng(6);
    let (hq, hkv, d, w, n) = (2, 1, 64, 5usize, 40usize);
    let pos: Vec<i64> = (0..n as i64).collect();
    let q = randn(&mut g, n * hq * d);
    let k = randn(&mut g, n * hkv * d);
    let af = 1.05;
    let rot = rotary(10000.0, d, d, Layout::Half, af);
    let mut re = AttentionParams::new(hq, hkv, d);
    re.rope = Some(rot.clone());
    re.relative = Relative::ReRope { window: w };
    let s_re = scores_for(&re, &q, &k, &pos, &pos);
    let scale = re.softmax_scale();
    let mut prev_err = f64::INFINITY;
    for kk in [1e1, 1e3, 1e6, 1e9, 1e12] {
        let mut lk = re.clone();
        lk.relative = Relative::Leaky { window: w, k: kk };
        let s_lk = scores_for(&lk, &q, &k, &pos, &pos);
        let mut worst = 0.0f64;
        for h in 0..hq {
            for i in 0..n {
                for j in 0..=i {
                    let at = (h * n + i) * n + j;
                    let rel = (i - j) as f64;
                    if rel < w as f64 {
                        assert_eq!(s_lk[at], s_re[at], "inside the window Leaky is RoPE");
                        continue;
                    }
                    let qv = &q[(i * hq + h) * d..][..d];
                    let kv = &k[j * hkv * d..][..d];
                    let mut bound = 1e-13;
                    for (p, f) in rot.inv_freq.iter().enumerate() {
                        let (a, b) = pair_of(Layout::Half, d, p);
                        bound += scale * af * af * qv[a].hypot(qv[b]) * kv[a].hypot(kv[b]) * f * (rel - w as f64) / kk;
                    }
                    let err = (s_lk[at] - s_re[at]).abs();
                    assert!(err <= bound, "k={kk} h={h} i={i} j={j}: |leaky - rerope| {err:e} > {bound:e}");
                    worst = worst.max(err);
                }
            }
        }
        if kk <= 1e6 {
            // 100x larger k: the error must fall by well over 30x (exactly 100x once linear).
            assert!(worst > 0.0 && worst < prev_err / 30.0, "k={kk}: error {worst:e} must fall ~1/k (previous {prev_err:e})");
        }
        prev_err = worst;
    }
    assert!(prev_err < 1e-9, "k = 1e12: {prev_err:e}");
}

#[test]
fn spec_fused_forms_equal_the_definitions() {
    // SPEC §3's fused form (no per-pair trig): for rel >= w, Leaky uses q at w + (i - w)/k and
    // k at j/k; ReRoPE uses q at w and k unrotated. The reference implements the definition
    // (q at rel', k unrotated); both must agree, since the GPU kernels use the fused form.
    let mut g = rng(7);
    let (d, w, kk) = (64, 8usize, 4.0);
    let rot = rotary(10000.0, d, d, Layout::Interleaved, 1.0);
    let mut p = AttentionParams::new(1, 1, d);
    p.rope = Some(rot.clone());
    for relative in [Relative::ReRope { window: w }, Relative::Leaky { window: w, k: kk }] {
        p.relative = relative;
        for _ in 0..50 {
            let q = randn(&mut g, d);
            let k = randn(&mut g, d);
            let j = g.random_range(0..5000i64);
            let i = j + g.random_range(w as i64..3000);
            let s = reference::scores(&q, &k, &[i], &[j], &p).unwrap()[0];
            let (qp, kp) = match relative {
                Relative::Leaky { window, k } => (window as f64 + (i as f64 - window as f64) / k, j as f64 / k),
                _ => (w as f64, 0.0),
            };
            let fused = p.softmax_scale() * dot(&naive_rotate(&q, qp, &rot), &naive_rotate(&k, kp, &rot));
            // Positions and angles up to ~8000: each rounded by <= ulp/2 ~ 1e-12 rad, on a score
            // of magnitude scale*|q||k| ~ 8.
            assert!((s - fused).abs() <= 1e-10, "{relative:?} i={i} j={j}: {s} vs {fused}");
        }
    }
}

/// BLOOM's `build_alibi_tensor` slopes, computed the BLOOM way in f64:
/// base = 2**(-(2**-(log2(n) - 3))), slopes = base**[1..n]; for the remaining heads
/// extra_base = 2**(-(2**-(log2(2n) - 3))), powers 1, 3, 5, ...
fn bloom_slopes(num_heads: usize) -> Vec<f64> {
    let closest = 1usize << (num_heads as f64).log2().floor() as u32;
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let pow = |b: f64, e: usize| (0..e).fold(1.0, |acc, _| acc * b);
    let mut slopes: Vec<f64> = (1..=closest).map(|p| pow(base, p)).collect();
    if closest != num_heads {
        let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
        let remaining = closest.min(num_heads - closest);
        slopes.extend((1..=2 * remaining).step_by(2).map(|p| pow(extra_base, p)));
    }
    slopes
}

#[test]
fn alibi_slopes_match_bloom_for_every_head_count() {
    for n in 1..=256usize {
        let ours = alibi::slopes(n);
        let bloom = bloom_slopes(n);
        assert_eq!(ours.len(), n);
        assert_eq!(bloom.len(), n);
        for (h, (a, b)) in ours.iter().zip(&bloom).enumerate() {
            // BLOOM raises a rounded base (pow: < 1 ulp) to the p-th power by p multiplications,
            // each rounded (<= eps/2): relative error <= p * 1.5 eps; ours rounds 2^x once (the
            // exponent -8(h+1)/n is exact, n being a power of two). The power p is h + 1 for the
            // first heads and 2t + 1 <= h for the extra ones, so p <= h + 1.
            let p = (h + 1) as f64;
            let tol = (1.5 * p + 2.0) * f64::EPSILON;
            assert!(((a - b) / b).abs() <= tol, "n={n} head {h}: {a} vs BLOOM {b}");
            assert!(*a > 0.0 && *a < 1.0);
            assert_eq!(*a, alibi::slope(n, h));
        }
        let p2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
        // The first p2 slopes are the geometric schedule 2^(-8/p2)..2^-8 (exact at powers of two),
        // the rest are every other slope of the 2*p2 schedule.
        assert_eq!(ours[p2 - 1], 2f64.powi(-8), "n={n}");
        let double = alibi::slopes(2 * p2);
        for t in 0..n - p2 {
            assert_eq!(ours[p2 + t], double[2 * t], "n={n} extra head {t}");
        }
    }
    assert_eq!(alibi::slopes(8), vec![0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
}

/// Naive attention written from SPEC §4-§5 with the rotation above: `(out [Nq,Hq,d], lse [Hq,Nq])`.
#[allow(clippy::too_many_arguments)]
fn naive_attention(p: &AttentionParams, q: &[f64], k: &[f64], v: &[f64], qp: &[i64], kp: &[i64]) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (p.num_q_heads, p.num_kv_heads, p.head_dim);
    let scale = p.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut out = vec![0.0; qp.len() * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * qp.len()];
    for h in 0..hq {
        let kvh = h * hkv / hq;
        let slope = p.alibi.map(|a| bloom_slopes(a.total_heads)[a.head_offset + h]);
        for (a, &i) in qp.iter().enumerate() {
            let mut qv = q[(a * hq + h) * d..][..d].to_vec();
            if let Some(rot) = &p.rope {
                qv = naive_rotate(&qv, i as f64, rot);
            }
            let mut s: Vec<(usize, f64)> = Vec::new();
            for (b, &j) in kp.iter().enumerate() {
                let causal_ok = !p.mask.causal || j <= i;
                let window_ok = p.mask.window.is_none_or(|w| i - j < w as i64 || j < p.mask.sinks as i64);
                if !(causal_ok && window_ok) {
                    continue;
                }
                let mut kv = k[(b * hkv + kvh) * d..][..d].to_vec();
                if let Some(rot) = &p.rope {
                    kv = naive_rotate(&kv, j as f64, rot);
                }
                let bias = slope.map_or(0.0, |m| -m * (i - j).abs() as f64);
                s.push((b, scale * dot(&qv, &kv) + bias));
            }
            if s.is_empty() {
                continue; // fully masked: O = 0, lse = -inf
            }
            let m = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
            lse[h * qp.len() + a] = m + z.ln();
            for &(b, sc) in &s {
                let w = (sc - m).exp() / z;
                for c in 0..d {
                    out[(a * hq + h) * d + c] += w * v[(b * hkv + kvh) * d + c];
                }
            }
        }
    }
    (out, lse)
}

fn assert_close(label: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() { g == w } else { (g - w).abs() <= tol };
        assert!(ok, "{label}[{i}]: {g} vs {w}");
    }
}

struct Problem {
    label: &'static str,
    p: AttentionParams,
    qp: Vec<i64>,
    kp: Vec<i64>,
}

fn problems() -> Vec<Problem> {
    let d = 32;
    let rope = Some(rotary(10000.0, d, d, Layout::Half, 1.0));
    let mut out = Vec::new();
    // GQA 4:1, causal prefill with RoPE.
    let mut p = AttentionParams::new(8, 2, d);
    p.rope = rope.clone();
    out.push(Problem { label: "GQA 4:1 causal prefill", p, qp: (0..10).collect(), kp: (0..10).collect() });
    // Sliding window with sinks, interleaved RoPE with an attention factor.
    let mut p = AttentionParams::new(4, 1, d);
    p.rope = Some(rotary(500000.0, d, 16, Layout::Interleaved, 1.2));
    p.mask = Mask { causal: true, window: Some(3), sinks: 2, chunk: None };
    out.push(Problem { label: "window 3 + 2 sinks, partial interleaved rope", p, qp: (0..12).collect(), kp: (0..12).collect() });
    // Decode: a few queries at the end of a long cache, with a window.
    let mut p = AttentionParams::new(4, 1, d);
    p.rope = rope.clone();
    p.mask = Mask { causal: true, window: Some(5), sinks: 1, chunk: None };
    out.push(Problem { label: "decode offset 37 over 40 keys", p, qp: vec![37, 38, 39], kp: (0..40).collect() });
    // ALiBi on a tensor-parallel shard: heads 4..8 of 12 (a non power of two).
    let mut p = AttentionParams::new(4, 2, d);
    p.alibi = Some(Alibi { total_heads: 12, head_offset: 6 });
    p.scale = Some(0.3);
    out.push(Problem { label: "ALiBi heads 6..10 of 12, custom scale", p, qp: (0..9).collect(), kp: (0..9).collect() });
    // Fully masked rows: queries before every key (causal), and far outside a window without sinks.
    let mut p = AttentionParams::new(4, 4, d);
    p.rope = rope.clone();
    out.push(Problem { label: "queries before all keys", p, qp: vec![0, 1, 5, 6], kp: vec![5, 6, 7] });
    let mut p = AttentionParams::new(2, 1, d);
    p.mask = Mask { causal: true, window: Some(2), sinks: 0, chunk: None };
    p.rope = rope;
    out.push(Problem { label: "window far behind", p, qp: vec![100, 3], kp: vec![0, 1, 2, 3] });
    out
}

#[test]
fn reference_attention_matches_naive_softmax() {
    let mut g = rng(8);
    let mut masked_rows = 0;
    for pr in problems() {
        let (hq, hkv, d) = (pr.p.num_q_heads, pr.p.num_kv_heads, pr.p.head_dim);
        let q = randn(&mut g, pr.qp.len() * hq * d);
        let k = randn(&mut g, pr.kp.len() * hkv * d);
        let v = randn(&mut g, pr.kp.len() * hkv * d);
        let got = reference::attention(&q, &k, &v, &pr.qp, &pr.kp, &pr.p).unwrap();
        let (out, lse) = naive_attention(&pr.p, &q, &k, &v, &pr.qp, &pr.kp);
        assert_close(pr.label, &got.out, &out, 1e-12);
        assert_close(pr.label, &got.lse, &lse, 1e-12);
        for h in 0..hq {
            for a in 0..pr.qp.len() {
                if lse[h * pr.qp.len() + a] == f64::NEG_INFINITY {
                    masked_rows += 1;
                    assert_eq!(got.lse[h * pr.qp.len() + a], f64::NEG_INFINITY);
                    assert!(got.out[(a * hq + h) * d..][..d].iter().all(|x| *x == 0.0), "{}: masked row output", pr.label);
                }
            }
        }
        // Materialized scores agree with the naive ones too (lse of a row = logsumexp of scores).
        let s = reference::scores(&q, &k, &pr.qp, &pr.kp, &pr.p).unwrap();
        for h in 0..hq {
            for a in 0..pr.qp.len() {
                let row = &s[(h * pr.qp.len() + a) * pr.kp.len()..][..pr.kp.len()];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l = if m == f64::NEG_INFINITY { m } else { m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() };
                let want = lse[h * pr.qp.len() + a];
                assert!(l == want || (l - want).abs() <= 1e-12, "{}: scores row lse {l} vs {want}", pr.label);
            }
        }
    }
    assert!(masked_rows >= 4 * 2 + 2, "fully masked rows exercised: {masked_rows}");
}

#[test]
fn merge_of_disjoint_key_sets_is_attention_over_all_keys() {
    let mut g = rng(9);
    for pr in problems() {
        let (hq, hkv, d) = (pr.p.num_q_heads, pr.p.num_kv_heads, pr.p.head_dim);
        let nk = pr.kp.len();
        let q = randn(&mut g, pr.qp.len() * hq * d);
        let k = randn(&mut g, nk * hkv * d);
        let v = randn(&mut g, nk * hkv * d);
        let full = reference::attention(&q, &k, &v, &pr.qp, &pr.kp, &pr.p).unwrap();
        // Interleaved split (every other key) and a split that leaves one side empty for some rows.
        let splits: [fn(usize) -> bool; 2] = [|b| b % 2 == 0, |b| b < 2];
        for split in splits {
            let pick = |take: bool| {
                let idx: Vec<usize> = (0..nk).filter(|b| split(*b) == take).collect();
                let kp: Vec<i64> = idx.iter().map(|&b| pr.kp[b]).collect();
                let gather = |x: &[f64]| idx.iter().flat_map(|&b| x[b * hkv * d..][..hkv * d].to_vec()).collect::<Vec<_>>();
                (kp, gather(&k), gather(&v))
            };
            let (kp1, k1, v1) = pick(true);
            let (kp2, k2, v2) = pick(false);
            let a = reference::attention(&q, &k1, &v1, &pr.qp, &kp1, &pr.p).unwrap();
            let b = reference::attention(&q, &k2, &v2, &pr.qp, &kp2, &pr.p).unwrap();
            let (o, l) = reference::merge(&a.out, &a.lse, &b.out, &b.lse, hq, d).unwrap();
            assert_close(pr.label, &o, &full.out, 1e-12);
            assert_close(pr.label, &l, &full.lse, 1e-12);
            // Learned sinks (README, multi-GPU recipes): given to exactly one side, counted once.
            let mut ps = pr.p.clone();
            ps.sink_logits = Some((0..hq).map(|h| h as f64 * 0.7 - 1.0).collect());
            let full_s = reference::attention(&q, &k, &v, &pr.qp, &pr.kp, &ps).unwrap();
            let a_s = reference::attention(&q, &k1, &v1, &pr.qp, &kp1, &ps).unwrap();
            let (o, l) = reference::merge(&a_s.out, &a_s.lse, &b.out, &b.lse, hq, d).unwrap();
            assert_close(pr.label, &o, &full_s.out, 1e-12);
            assert_close(pr.label, &l, &full_s.lse, 1e-12);
            assert!(full_s.lse.iter().zip(&full.lse).all(|(s, n)| s > n), "{}: a sink adds to every denominator", pr.label);
        }
    }
    // Both sides empty: O = 0, lse = -inf.
    let (o, l) = reference::merge(&[1.0, 2.0], &[f64::NEG_INFINITY], &[3.0, 4.0], &[f64::NEG_INFINITY], 1, 2).unwrap();
    assert_eq!((o, l), (vec![0.0, 0.0], vec![f64::NEG_INFINITY]));
}

#[test]
fn sinusoidal_table_values() {
    let (n, d) = (50, 16);
    let pe = reference::sinusoidal(n, d);
    assert_eq!(pe.len(), n * d);
    for m in 0..n {
        for i in 0..d / 2 {
            // Written differently from the reference: m * 10000^(-2i/d) via exp/ln.
            let angle = m as f64 * (-((2 * i) as f64) / d as f64 * 10000f64.ln()).exp();
            let (s, c) = (pe[m * d + 2 * i], pe[m * d + 2 * i + 1]);
            // The exponent (<= 9.3 in magnitude) and exp/pow are each good to a few ulps, so the
            // angle (<= 49 rad) agrees to ~49 * 1e-15 = 5e-14: allow 1e-12.
            assert!((s - angle.sin()).abs() <= 1e-12, "PE[{m},{}]", 2 * i);
            assert!((c - angle.cos()).abs() <= 1e-12, "PE[{m},{}]", 2 * i + 1);
            assert!((s * s + c * c - 1.0).abs() <= 1e-15);
        }
    }
    assert!(pe[..d].iter().step_by(2).all(|x| *x == 0.0) && pe[..d].iter().skip(1).step_by(2).all(|x| *x == 1.0));
    assert_eq!(pe[d], 1f64.sin());
    assert_eq!(pe[d + 1], 1f64.cos());
    assert!(reference::sinusoidal(0, 8).is_empty());
}
