//! The prefill kernel skips whole key tiles (kernels/mask.cuh `tile_visible`, the causal `n_end`
//! of kernels/attention_fwd.cu) and drops per-element masking on tiles it deems fully visible
//! (`tile_fully_visible`). A wrong bound there silently drops or admits keys, so the logic is
//! replayed here (line for line) against the per-element definition (SPEC §5) over many
//! random problems: every visible (query, key) pair must lie in a visited tile, and every pair of
//! a "full" tile must be visible.

use rope_attn::Mask;

#[derive(Clone, Copy)]
struct MaskArgs {
    causal: bool,
    window: i64, // 0 = none
    sinks: i64,
}

fn visible(m: MaskArgs, i: i64, j: i64) -> bool {
    if m.causal && j > i {
        return false;
    }
    !(m.window > 0 && i - j >= m.window && j >= m.sinks)
}

fn tile_visible(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if i1 <= i0 || j1 <= j0 {
        return false;
    }
    if m.causal && j0 > i1 - 1 {
        return false;
    }
    !(m.window > 0 && (i0 - (j1 - 1)) >= m.window && j0 >= m.sinks)
}

fn tile_fully_visible(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if m.causal && j1 - 1 > i0 {
        return false;
    }
    !(m.window > 0 && (i1 - 1) - j0 >= m.window && j1 > m.sinks)
}

/// The kernel's tile walk for one query block: the tiles it visits and which it treats as full.
fn walk(m: MaskArgs, i0: i64, vq: i64, kp: i64, seqlen_k: i64, bn: i64) -> Vec<(i64, bool)> {
    let n_tiles = (seqlen_k + bn - 1) / bn;
    let last_key = i0 + vq - 1 - kp;
    let n_end = if m.causal { if last_key < 0 { 0 } else { n_tiles.min(last_key / bn + 1) } } else { n_tiles };
    let mut out = Vec::new();
    for n in 0..n_end {
        let (j0, vk) = (n * bn, bn.min(seqlen_k - n * bn));
        if !tile_visible(m, i0, i0 + vq, kp + j0, kp + (j0 + bn).min(seqlen_k)) {
            continue;
        }
        let full = vk == bn && tile_fully_visible(m, i0, i0 + vq, kp + j0, kp + j0 + bn);
        out.push((n, full));
    }
    out
}

#[test]
fn tile_skipping_never_drops_or_admits_a_key() {
    let mut s: u64 = 7;
    let mut next = |k: u64| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) % k
    };
    let mut checked = 0;
    for _ in 0..3000 {
        let m = MaskArgs { causal: next(3) != 0, window: [0, 1, 5, 64, 100][next(5) as usize], sinks: [0, 1, 4, 70][next(4) as usize] as i64 };
        let bn = [32, 64][next(2) as usize] as i64;
        let seqlen_k = 1 + next(400) as i64;
        let seqlen_q = 1 + next(300) as i64;
        // Default positions (bottom-right aligned) or explicit starts (ring / chunked attention).
        let (q_pos0, kp) = if next(2) == 0 { (seqlen_k - seqlen_q, 0) } else { (next(500) as i64 - 100, next(300) as i64) };
        let bm = 64;
        let mut m0 = 0;
        while m0 < seqlen_q {
            let vq = bm.min(seqlen_q - m0);
            let i0 = q_pos0 + m0;
            let tiles = walk(m, i0, vq, kp, seqlen_k, bn);
            for r in 0..vq {
                let i = i0 + r;
                for j in 0..seqlen_k {
                    let tile = j / bn;
                    let vis = visible(m, i, kp + j);
                    match tiles.iter().find(|(n, _)| *n == tile) {
                        None => assert!(!vis, "visible pair skipped: {:?} i={i} key={j} kp={kp}", (m.causal, m.window, m.sinks)),
                        Some((_, true)) => assert!(vis, "full tile admits a hidden pair: i={i} key={j}"),
                        Some((_, false)) => {}
                    }
                    checked += 1;
                }
            }
            m0 += bm;
        }
    }
    assert!(checked > 1_000_000);
}

#[test]
fn replica_matches_the_library_mask() {
    // The per-element rule above is the library's Mask::visible (the CPU reference's).
    for (causal, window, sinks) in [(true, None, 0), (true, Some(7), 2), (false, Some(3), 0), (false, None, 0)] {
        let lib = Mask { causal, window, sinks };
        let rep = MaskArgs { causal, window: window.unwrap_or(0) as i64, sinks: sinks as i64 };
        for i in -5..40 {
            for j in 0..40 {
                assert_eq!(lib.visible(i, j), visible(rep, i, j), "{causal} {window:?} {sinks} i={i} j={j}");
            }
        }
    }
}
