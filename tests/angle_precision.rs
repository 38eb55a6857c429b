//! The GPU's exact-angle reduction (`angle_turns` in kernels/rope.cuh) replayed in f32 on the
//! CPU, operation for operation, against an exact reduction: the algorithm itself is proven here,
//! on every machine, whether or not a GPU is present. (nvcc may contract a multiply-add into an
//! FMA, which only removes roundings.)

fn frac_turns(x: f32) -> f32 {
    x - x.round_ties_even()
}

/// kernels/rope.cuh `angle_turns`, line for line.
fn angle_turns(m_signed: i32, hi: f32, lo: f32) -> f32 {
    let sign = if m_signed < 0 { -1.0f32 } else { 1.0 };
    let m = m_signed.unsigned_abs();
    let mh = (m & 0xFFFF_F000) as f32;
    let ml = (m & 0x0000_0FFF) as f32;
    let (p1, p2, p3) = (mh * hi, ml * hi, mh * lo);
    let (e1, e2, e3) = (mh.mul_add(hi, -p1), ml.mul_add(hi, -p2), mh.mul_add(lo, -p3));
    let p4 = ml * lo;
    let mut t = frac_turns(p1) + frac_turns(p2);
    t = frac_turns(t) + frac_turns(p3);
    t = frac_turns(t) + frac_turns(e1);
    t = frac_turns(t) + ((e2 + e3) + p4);
    sign * frac_turns(t)
}

/// src/cuda/params.rs `split_turns`, re-derived.
fn split(inv_freq: f64) -> (f32, f32, f64) {
    let turns = inv_freq / std::f64::consts::TAU;
    let hi = turns as f32;
    (hi, (turns - hi as f64) as f32, turns)
}

/// frac(m * x) in turns for an f64 x, with the product's rounding error recovered exactly (fma).
fn exact_turns(m: i64, x: f64) -> f64 {
    let mf = m as f64;
    let p = mf * x;
    let e = mf.mul_add(x, -p);
    let f = (p - p.round()) + e;
    f - f.round()
}

fn wrap(d: f64) -> f64 {
    d - d.round()
}

#[test]
fn angle_reduction_is_exact_to_a_few_f32_ulps() {
    let freqs: Vec<f64> = (0..64).map(|i| 10000f64.powf(-(2 * i) as f64 / 128.0)).chain([500000f64.powf(-126.0 / 128.0) / 8.0, 1.0]).collect();
    let mut positions: Vec<i32> = vec![0, 1, 2, 4095, 4096, 4097, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, 100_000_000, i32::MAX, -1, -(1 << 24)];
    let mut s: u64 = 12345;
    for _ in 0..2000 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        positions.push((s >> 33) as i32);
    }
    let (mut worst_split, mut worst_true) = (0f64, 0f64);
    for &f in &freqs {
        let (hi, lo, turns) = split(f);
        let represented = hi as f64 + lo as f64;
        for &m in &positions {
            let got = angle_turns(m, hi, lo) as f64;
            // Against the value the kernel is given (hi + lo): the reduction's own error.
            worst_split = worst_split.max(wrap(got - exact_turns(m as i64, represented)).abs());
            // Against the true frequency: adds the 2^-48 representation error of hi + lo.
            if (m as i64).abs() <= 1 << 25 {
                worst_true = worst_true.max(wrap(got - exact_turns(m as i64, turns)).abs());
            }
        }
    }
    // Four roundings of sums below one turn (half an ulp of 1.0 each, 6e-8): < 2.5e-7 turns,
    // i.e. < 1.6e-6 rad, at every position an i32 holds.
    println!("worst reduction error {worst_split:e} turns; vs the true angle (|m| <= 2^25) {worst_true:e}");
    assert!(worst_split < 2.5e-7, "reduction error {worst_split:e} turns");
    assert!(worst_true < 2.5e-7, "error vs the true angle up to 2^25: {worst_true:e} turns");
}

#[test]
fn naive_f32_angles_would_fail_this_test() {
    // The reason the reduction exists: m * f in plain f32 at m = 2^24 is off by whole radians.
    let f = 1.0f64;
    let m = (1 << 24) + 1;
    let naive = ((m as f32) * (f / std::f64::consts::TAU) as f32) as f64;
    let err = wrap(naive - exact_turns(m as i64, f / std::f64::consts::TAU)).abs();
    assert!(err > 1e-3, "naive error {err}");
    let (hi, lo, _) = split(f);
    assert!(wrap(angle_turns(m, hi, lo) as f64 - exact_turns(m as i64, f / std::f64::consts::TAU)).abs() < 2.5e-7);
}

/// (cos, sin) of t turns in f32, correctly rounded (the device's sincospif is within an ulp or
/// two of that), and the complex product the kernels compose rotations with.
fn cs(t: f32) -> (f32, f32) {
    let a = t as f64 * std::f64::consts::TAU;
    (a.cos() as f32, a.sin() as f32)
}
fn mul((ac, as_): (f32, f32), (bc, bs): (f32, f32)) -> (f32, f32) {
    (ac * bc - as_ * bs, as_ * bc + ac * bs)
}

/// Replays a composed rotation, `composed(hi, lo, j0, u)` for key j0 + u (u < keys) at every
/// head_dim-128 frequency of base `theta` and every start, against the true rotation: under 4e-6
/// absolute per component (SPEC's precision requirement allows 1e-5 for unit-scale inputs), and
/// within 3x of what a direct evaluation of the same angles errs.
fn assert_composition_exact(theta: f64, starts: &[i32], keys: i32, composed: impl Fn(f32, f32, i32, i32) -> (f32, f32), what: &str) {
    let freqs: Vec<f64> = (0..64).map(|i| theta.powf(-(2 * i) as f64 / 128.0)).chain([1.0, 0.3]).collect();
    let (mut worst_composed, mut worst_direct) = (0f64, 0f64);
    for &f in &freqs {
        let (hi, lo, turns) = split(f);
        for &j0 in starts {
            for u in 0..keys {
                let j = (j0 + u) as i64;
                let truth = exact_turns(j, turns) * std::f64::consts::TAU;
                let err = |(c, s): (f32, f32)| (c as f64 - truth.cos()).abs().max((s as f64 - truth.sin()).abs());
                worst_composed = worst_composed.max(err(composed(hi, lo, j0, u)));
                worst_direct = worst_direct.max(err(cs(angle_turns(j as i32, hi, lo))));
            }
        }
    }
    println!("{what}: worst composed error {worst_composed:e}, direct {worst_direct:e}");
    assert!(worst_composed < 4e-6, "{what}: composed rotation error {worst_composed:e}");
    assert!(worst_composed < 3.0 * worst_direct.max(1e-7), "{what}: composed {worst_composed:e} vs direct {worst_direct:e}");
}

/// The f32 decode kernel and the prefill rotate key (or row) j0 + 8a + b by the product of two
/// rotations, (cos, sin) of j0 + 8a and of b, each from an exact reduction (kernels/tile.cuh).
#[test]
fn composed_key_rotations_are_as_exact_as_direct_ones() {
    let starts = [0, 32, 4064, (1 << 24) - 32, 1 << 24, 100_000_000, i32::MAX - 64];
    assert_composition_exact(10000.0, &starts, 32, |hi, lo, j0, u| mul(cs(angle_turns(j0 + 8 * (u / 8), hi, lo)), cs(angle_turns(u % 8, hi, lo))), "two factors");
}

/// The fused prefill's K tiles (kernels/tile.cuh, fill_rotation_bases_stepped): key j0 + 8s + b
/// of a 64-key tile takes (cos, sin) of j0 (the one exact base per tile), times those of 8s,
/// times those of b, each factor from an exact reduction.
#[test]
fn stepped_tile_rotations_are_as_exact_as_direct_ones() {
    let tiles = [0, 64, 4032, (1 << 24) - 64, 1 << 24, 123_456_768, i32::MAX - 127];
    assert_composition_exact(
        10000.0,
        &tiles,
        64,
        |hi, lo, j0, u| mul(mul(cs(angle_turns(j0, hi, lo)), cs(angle_turns(8 * (u / 8), hi, lo))), cs(angle_turns(u % 8, hi, lo))),
        "stepped tile",
    );
}

/// The tensor-core decode (kernels/attention_decode_mma.cu) composes one factor more for the
/// second 8 keys of its 16-key tiles: key j0 + 8 + b takes (cos, sin) of j0 times those of 8
/// (the tile's second base), times those of b, each factor from an exact reduction.
#[test]
fn three_factor_key_rotations_are_as_exact_as_direct_ones() {
    let tiles = [0, 16, 4080, (1 << 24) - 16, 1 << 24, 123_456_784, i32::MAX - 31];
    assert_composition_exact(
        500000.0,
        &tiles,
        16,
        |hi, lo, j0, u| {
            let base0 = cs(angle_turns(j0, hi, lo));
            let base = if u < 8 { base0 } else { mul(base0, cs(angle_turns(8, hi, lo))) };
            mul(base, cs(angle_turns(u % 8, hi, lo)))
        },
        "three factors",
    );
}

/// The tensor-core decode with base steps (kernels/attention_decode_mma.cu, `base_steps`): warp
/// w of 4 takes the tiles from j0 + 16w on, 64 keys apart, and key 64m + 8h + b of its group of
/// 8 tiles takes (cos, sin) of the group's anchor j0 + 16w, times those of the step 64m + 8h
/// (a per-block table), times those of b: three exact factors, as without steps.
#[test]
fn stepped_decode_bases_are_as_exact_as_direct_ones() {
    let groups = [0, 512, 4096 - 512, (1 << 24) - 512, 1 << 24, 123_456_768, i32::MAX - 1023];
    assert_composition_exact(
        500000.0,
        &groups,
        512,
        |hi, lo, j0, u| {
            let (w, m, h, b) = ((u % 64) / 16, u / 64, (u % 16) / 8, u % 8);
            let anchor = cs(angle_turns(j0 + 16 * w, hi, lo));
            mul(mul(anchor, cs(angle_turns(64 * m + 8 * h, hi, lo))), cs(angle_turns(b, hi, lo)))
        },
        "decode base steps",
    );
}
