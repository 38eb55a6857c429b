//! The tensor-core fragment bookkeeping of kernels/scores.cu and kernels/attention_fwd.cu,
//! replayed on the CPU against the PTX ISA's definitions of `ldmatrix.x4` (plain and `.trans`)
//! and `mma.sync.m16n8k16.row.col`: the shared-memory addresses each lane hands to ldmatrix,
//! the pairing of registers into mma operands, and the reuse of the S accumulators as the A
//! operand of P·V. A wrong index here would compute a wrong product without any error on the
//! GPU; this catches it without one. The address formulas are copied from the kernels (keep
//! them in sync: the comments name the lines).

/// Shared memory as the kernels lay it out: rows of `ld` elements.
struct Smem {
    data: Vec<f64>,
    ld: usize,
}

impl Smem {
    fn at(&self, elem: usize) -> f64 {
        self.data[elem]
    }
}

/// ldmatrix.x4: lane l supplies the address of row (l % 8) of matrix (l / 8); each lane
/// receives, per matrix i, the two elements (row l/4, cols 2(l%4), 2(l%4)+1) — or with .trans
/// the elements (rows 2(l%4), 2(l%4)+1, col l/4).
fn ldmatrix_x4(smem: &Smem, addr: impl Fn(usize) -> usize, trans: bool) -> [[[f64; 2]; 4]; 32] {
    let mut out = [[[0.0; 2]; 4]; 32];
    for (l, regs) in out.iter_mut().enumerate() {
        for (i, reg) in regs.iter_mut().enumerate() {
            // The row address of row r of matrix i came from lane 8i + r.
            let row_start = |r: usize| addr(8 * i + r);
            *reg = if trans {
                [smem.at(row_start(2 * (l % 4)) + l / 4), smem.at(row_start(2 * (l % 4) + 1) + l / 4)]
            } else {
                let base = row_start(l / 4);
                [smem.at(base + 2 * (l % 4)), smem.at(base + 2 * (l % 4) + 1)]
            };
        }
    }
    out
}

/// mma.m16n8k16.row.col: D(16x8) += A(16x16) B(16x8) with the PTX fragment layouts.
fn mma(d: &mut [[f64; 4]; 32], a: &[[[f64; 2]; 4]; 32], b: &[[[f64; 2]; 2]; 32]) {
    let mut am = [[0.0; 16]; 16];
    let mut bm = [[0.0; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for e in 0..2 {
            am[g][2 * t + e] = a[l][0][e];
            am[g + 8][2 * t + e] = a[l][1][e];
            am[g][2 * t + 8 + e] = a[l][2][e];
            am[g + 8][2 * t + 8 + e] = a[l][3][e];
            bm[2 * t + e][g] = b[l][0][e];
            bm[2 * t + 8 + e][g] = b[l][1][e];
        }
    }
    for (l, dl) in d.iter_mut().enumerate() {
        let (g, t) = (l / 4, l % 4);
        for (c, x) in dl.iter_mut().enumerate() {
            let (row, col) = (g + 8 * (c / 2), 2 * t + c % 2);
            *x += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f64>();
        }
    }
}

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
}

/// One warp's S = Q Kᵀ (16 rows x BN keys) and O = P V (16 x D), as attention_fwd_mma does it.
fn warp_attention_block(d: usize, bn: usize, warp: usize) {
    let ld = d + 8;
    let bm = 64;
    let mut seed = (d * 1000 + bn + warp) as u64;
    let mut fill = |rows: usize| Smem { data: (0..rows * ld).map(|_| lcg(&mut seed)).collect(), ld };
    let (qs, ks, vs) = (fill(bm), fill(bn), fill(bn));
    let nt = bn / 8;
    // S accumulators: s[nt][lane][4]
    let mut s = vec![[[0.0f64; 4]; 32]; nt];
    for kk in (0..d).step_by(16) {
        // attention_fwd.cu: arow = (warp*16 + (lane%8) + ((lane/8)%2)*8) * LD + kk + (lane/16)*8
        let a = ldmatrix_x4(&qs, |lane| (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * qs.ld + kk + (lane / 16) * 8, false);
        for np in 0..nt / 2 {
            // brow = (np*16 + (lane%8) + (lane/16)*8) * LD + kk + ((lane/8)%2)*8
            let bk = ldmatrix_x4(&ks, |lane| (np * 16 + (lane % 8) + (lane / 16) * 8) * ks.ld + kk + ((lane / 8) % 2) * 8, false);
            let b0: [[[f64; 2]; 2]; 32] = std::array::from_fn(|l| [bk[l][0], bk[l][1]]);
            let b1: [[[f64; 2]; 2]; 32] = std::array::from_fn(|l| [bk[l][2], bk[l][3]]);
            mma(&mut s[2 * np], &a, &b0);
            mma(&mut s[2 * np + 1], &a, &b1);
        }
    }
    // Check S against the direct product.
    for (n, tile) in s.iter().enumerate() {
        for (l, acc) in tile.iter().enumerate() {
            for (c, &got) in acc.iter().enumerate() {
                let row = warp * 16 + l / 4 + 8 * (c / 2);
                let key = n * 8 + 2 * (l % 4) + c % 2;
                let want: f64 = (0..d).map(|x| qs.at(row * ld + x) * ks.at(key * ld + x)).sum();
                assert!((got - want).abs() < 1e-12, "S d={d} bn={bn} warp={warp} row={row} key={key}");
            }
        }
    }
    // P = S (any values do: the mapping is what is tested); O = P V.
    let dt = d / 8;
    let mut o = vec![[[0.0f64; 4]; 32]; dt];
    for kk in 0..bn / 16 {
        // a[0..4] = (s[2kk][0,1], s[2kk][2,3], s[2kk+1][0,1], s[2kk+1][2,3])
        let a: [[[f64; 2]; 4]; 32] = std::array::from_fn(|l| {
            [[s[2 * kk][l][0], s[2 * kk][l][1]], [s[2 * kk][l][2], s[2 * kk][l][3]], [s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]], [
                s[2 * kk + 1][l][2],
                s[2 * kk + 1][l][3],
            ]]
        });
        for np in 0..d / 16 {
            // Vs + (kk*16 + (lane%8) + ((lane/8)%2)*8) * LD + np*16 + (lane/16)*8, .trans
            let bv = ldmatrix_x4(&vs, |lane| (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * vs.ld + np * 16 + (lane / 16) * 8, true);
            let b0: [[[f64; 2]; 2]; 32] = std::array::from_fn(|l| [bv[l][0], bv[l][1]]);
            let b1: [[[f64; 2]; 2]; 32] = std::array::from_fn(|l| [bv[l][2], bv[l][3]]);
            mma(&mut o[2 * np], &a, &b0);
            mma(&mut o[2 * np + 1], &a, &b1);
        }
    }
    for (n, tile) in o.iter().enumerate() {
        for (l, acc) in tile.iter().enumerate() {
            for (c, &got) in acc.iter().enumerate() {
                let row = l / 4 + 8 * (c / 2);
                let col = n * 8 + 2 * (l % 4) + c % 2;
                // P[row][key] is S of this warp's row.
                let want: f64 = (0..bn)
                    .map(|key| {
                        let p: f64 = (0..d).map(|x| qs.at((warp * 16 + row) * ld + x) * ks.at(key * ld + x)).sum();
                        p * vs.at(key * ld + col)
                    })
                    .sum();
                assert!((got - want).abs() < 1e-9, "O d={d} bn={bn} warp={warp} row={row} col={col}");
            }
        }
    }
}

#[test]
fn attention_fragments_compute_qk_and_pv() {
    // The instantiated tile shapes: (head_dim, keys per tile), each warp of the block.
    for (d, bn, warps) in [(64, 64, 4), (80, 64, 4), (96, 64, 4), (128, 64, 4), (256, 32, 2)] {
        for warp in 0..warps {
            warp_attention_block(d, bn, warp);
        }
    }
}

#[test]
fn the_emulated_ldmatrix_is_not_trivially_right() {
    // Swapping the K address halves (the kind of slip this test exists for) must break S.
    let d = 64;
    let ks = Smem { data: (0..64 * (d + 8)).map(|i| i as f64).collect(), ld: d + 8 };
    let good = ldmatrix_x4(&ks, |lane| ((lane % 8) + (lane / 16) * 8) * ks.ld + ((lane / 8) % 2) * 8, false);
    let bad = ldmatrix_x4(&ks, |lane| ((lane % 8) + ((lane / 8) % 2) * 8) * ks.ld + (lane / 16) * 8, false);
    assert_ne!(good, bad);
}

/// The m16n8k16 fragment and ldmatrix layouts used above — and by the SIMT emulator's mma.sync
/// and ldmatrix (kernels/emu/simt.cpp), which runs the real kernels in tests/emu_*.rs — checked against an
/// independent statement of them: CUTLASS's cute traits for `SM80_16x8x16_F16F16F16F16_TN`
/// (mma_traits_sm80.hpp), which map (thread, value) to a column-major index of each operand:
/// A `((4,8),(2,2,2)):((32,1),(16,8,128))` over M16×K16, B `((4,8),(2,2)):((16,1),(8,64))`
/// over N8×K16, C `((4,8),(2,2)):((32,1),(16,8))` over M16×N8. Thread = t0 + 4·t1.
#[test]
fn fragment_layouts_agree_with_cutlass_cute_traits() {
    // A cute layout evaluated at (thread, value): value coordinates are column-major in vshape.
    fn cute(thread: usize, value: usize, tstride: [usize; 2], vshape: &[usize], vstride: &[usize]) -> usize {
        let mut idx = (thread % 4) * tstride[0] + (thread / 4) * tstride[1];
        let mut v = value;
        for (n, s) in vshape.iter().zip(vstride) {
            idx += (v % n) * s;
            v /= n;
        }
        idx
    }
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for v in 0..8 {
            // Ours: register v/2 (a[0..4]), half v%2 — reg 0 (g, 2t), 1 (g+8, 2t), 2 (g, 2t+8), 3 (g+8, 2t+8).
            let idx = cute(lane, v, [32, 1], &[2, 2, 2], &[16, 8, 128]);
            let reg = v / 2;
            assert_eq!((idx % 16, idx / 16), (g + 8 * (reg % 2), 2 * t + 8 * (reg / 2) + v % 2), "A lane {lane} value {v}");
        }
        for v in 0..4 {
            // Ours: b0 = rows k = 2t, 2t+1 and b1 = rows 2t+8, 2t+9 of column n = g.
            let idx = cute(lane, v, [16, 1], &[2, 2], &[8, 64]);
            assert_eq!((idx / 8, idx % 8), (2 * t + 8 * (v / 2) + v % 2, g), "B lane {lane} value {v}");
            // Ours: c[v] at row g + 8(v/2), column 2t + v%2.
            let idx = cute(lane, v, [32, 1], &[2, 2], &[16, 8]);
            assert_eq!((idx % 16, idx / 16), (g + 8 * (v / 2), 2 * t + v % 2), "C lane {lane} value {v}");
        }
        // ldmatrix.x4: cute's SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T map (thread, value) to a bit
        // of the 32 source rows of 128 bits (row s = the address lane s supplied).
        for r in 0..4 {
            for e in 0..2 {
                // Ours: register r, half e = row l/4 of matrix r (from lane 8r + l/4), element 2(l%4) + e.
                let bit = 32 * lane + 16 * e + 1024 * r; // DstLayout (32,(32,4)):(32,(1,1024))
                assert_eq!((bit / 128, bit % 128 / 16), (8 * r + g, 2 * t + e), "ldmatrix lane {lane} reg {r}");
                // .trans, ours: rows 2(l%4) + e of matrix r, element l/4.
                let bit = 256 * t + 16 * g + 128 * e + 1024 * r; // ((4,8),(16,2,4)):((256,16),(1,128,1024))
                assert_eq!((bit / 128, bit % 128 / 16), (8 * r + 2 * t + e, g), "ldmatrix.trans lane {lane} reg {r}");
            }
        }
    }
}
