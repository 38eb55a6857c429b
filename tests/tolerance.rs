//! The checked-mode tolerances mean something: a CPU emulation of the kernels' 16-bit pipeline
//! (rotate in high precision, round Q' and K' to bf16/f16, accumulate in f32, round P to the
//! dtype) passes them, and the bugs a kernel could have (a position off by one, the wrong pair
//! layout, a dropped attention factor, a mask off by one) fail them.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rope_attn::cuda::{max_abs, CheckReport, Dtype, Tolerance};
use rope_attn::{reference, Alibi, AttentionParams, Layout, RopeConfig, RopeScaling, Rotary};

fn yarn(d: usize) -> Rotary {
    let s = RopeScaling::yarn(8.0, 4096);
    let cfg = RopeConfig::with_scaling(10000.0, d, d, Some(32768), s).unwrap();
    Rotary::from_schedule(&cfg.schedule(None).unwrap(), Layout::Half)
}

#[derive(Clone, Copy, PartialEq)]
enum Bug {
    None,
    PositionOffByOne,
    WrongLayout,
    NoAttentionFactor,
    CausalOffByOne,
}

/// The kernel pipeline in emulation: scores then softmax, with the kernels' roundings.
fn emulate<T: Dtype>(p: &AttentionParams, q: &[f64], k: &[f64], v: &[f64], n: usize, bug: Bug) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (d, h) = (p.head_dim, p.num_q_heads);
    let mut rot = p.rope.clone().unwrap();
    match bug {
        Bug::WrongLayout => rot.layout = Layout::Interleaved,
        Bug::NoAttentionFactor => rot.attention_factor = 1.0,
        _ => {}
    }
    let round = |x: &mut [f64]| x.iter_mut().for_each(|v| *v = T::from_f64(*v).to_f64());
    let (mut qr, mut kr) = (q.to_vec(), k.to_vec());
    for t in 0..n {
        for hh in 0..h {
            let s = (t * h + hh) * d;
            let qpos = if bug == Bug::PositionOffByOne { t + 1 } else { t };
            reference::rotate_head(&mut qr[s..s + d], qpos as f64, &rot);
            reference::rotate_head(&mut kr[s..s + d], t as f64, &rot);
        }
    }
    round(&mut qr);
    round(&mut kr);
    let slope = |hh: usize| p.alibi.map_or(0.0, |a| rope_attn::alibi::slope(a.total_heads, a.head_offset + hh)) as f32;
    let mut scores = vec![f64::NEG_INFINITY; h * n * n];
    let (mut out, mut lse) = (vec![0.0; n * h * d], vec![f64::NEG_INFINITY; h * n]);
    for hh in 0..h {
        for i in 0..n {
            let last = if bug == Bug::CausalOffByOne { (i + 1).min(n - 1) } else { i };
            let mut row = vec![f32::NEG_INFINITY; n];
            for (j, rj) in row.iter_mut().enumerate().take(last + 1) {
                let dot: f32 = (0..d).map(|c| qr[(i * h + hh) * d + c] as f32 * kr[(j * h + hh) * d + c] as f32).sum();
                *rj = p.softmax_scale() as f32 * dot - slope(hh) * (i as f32 - j as f32).abs();
                scores[(hh * n + i) * n + j] = *rj as f64;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let pr: Vec<f32> = row.iter().map(|s| (s - m).exp()).collect();
            let l: f32 = pr.iter().sum();
            lse[hh * n + i] = (m + l.ln()) as f64;
            for c in 0..d {
                let acc: f32 = (0..n).map(|j| T::from_f64(pr[j] as f64).to_f64() as f32 * v[(j * h + hh) * d + c] as f32).sum();
                out[(i * h + hh) * d + c] = (acc / l) as f64;
            }
        }
    }
    (scores, out, lse)
}

fn check<T: Dtype>(bug: Bug, seed: u64) -> (bool, bool) {
    let (n, h, d) = (24usize, 2usize, 64usize);
    let mut p = AttentionParams::new(h, h, d);
    p.rope = Some(yarn(d));
    p.alibi = Some(Alibi { total_heads: 8, head_offset: 3 });
    let mut r = StdRng::seed_from_u64(seed);
    let mut data = |len: usize| -> Vec<f64> { (0..len).map(|_| T::from_f64(r.random_range(-1.0..1.0)).to_f64()).collect() };
    let (q, k, v) = (data(n * h * d), data(n * h * d), data(n * h * d));
    let pos: Vec<i64> = (0..n as i64).collect();
    let want_s = reference::scores(&q, &k, &pos, &pos, &p).unwrap();
    let want = reference::attention(&q, &k, &v, &pos, &pos, &p).unwrap();
    let (s, o, l) = emulate::<T>(&p, &q, &k, &v, n, bug);
    let ts = Tolerance::scores::<T>(&p, max_abs(&q), max_abs(&k));
    let (to, tl) = Tolerance::attention::<T>(&p, max_abs(&q), max_abs(&k), max_abs(&v));
    let scores_ok = CheckReport::compare("scores", &s, &want_s, ts).passed();
    let attn_ok = CheckReport::compare("out", &o, &want.out, to).worst(CheckReport::compare("lse", &l, &want.lse, tl)).passed();
    (scores_ok, attn_ok)
}

#[test]
fn faithful_emulation_passes() {
    for seed in 0..5 {
        assert_eq!(check::<bf16>(Bug::None, seed), (true, true), "bf16 seed {seed}");
        assert_eq!(check::<f16>(Bug::None, seed), (true, true), "f16 seed {seed}");
        assert_eq!(check::<f32>(Bug::None, seed), (true, true), "f32 seed {seed}");
    }
}

#[test]
fn kernel_bugs_fail() {
    for bug in [Bug::PositionOffByOne, Bug::WrongLayout, Bug::NoAttentionFactor, Bug::CausalOffByOne] {
        for seed in 0..3 {
            let (s, a) = check::<bf16>(bug, seed);
            assert!(!a, "attention tolerance let a bug through (seed {seed})");
            if bug != Bug::CausalOffByOne {
                assert!(!s, "score tolerance let a bug through (seed {seed})");
            }
        }
    }
}
