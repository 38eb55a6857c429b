//! The prefill kernel skips whole key tiles (kernels/mask.cuh `tile_visible`, the causal `n_end`
//! of kernels/attention_fwd.cu), drops per-element masking on tiles it deems fully visible
//! (`tile_fully_visible`) and reduces it to one compare per score where only the causal edge
//! masks (`tile_window_free`); the decode kernels start their splits at the window's or chunk's
//! start and jump over hidden keys (kernels/decode.cuh). A wrong bound there silently drops or
//! admits keys, so the logic is replayed here (line for line) against the per-element definition
//! (SPEC §5) over many random problems: every visible (query, key) pair must lie in a visited
//! tile, and every pair of a "full" tile must be visible.

use rope_attn::Mask;

#[derive(Clone, Copy, Debug)]
struct MaskArgs {
    causal: bool,
    window: i64, // 0 = none
    sinks: i64,
    chunk: i64, // 0 = none
}

fn chunk_of(m: MaskArgs, pos: i64) -> i64 {
    if pos >= 0 {
        pos / m.chunk
    } else {
        -((m.chunk - 1 - pos) / m.chunk)
    }
}

fn visible_unchunked(m: MaskArgs, i: i64, j: i64) -> bool {
    if m.causal && j > i {
        return false;
    }
    !(m.window > 0 && i - j >= m.window && j >= m.sinks)
}

fn tile_visible_unchunked(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if i1 <= i0 || j1 <= j0 {
        return false;
    }
    if m.causal && j0 > i1 - 1 {
        return false;
    }
    !(m.window > 0 && (i0 - (j1 - 1)) >= m.window && j0 >= m.sinks)
}

fn tile_fully_visible_unchunked(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if m.causal && j1 - 1 > i0 {
        return false;
    }
    !(m.window > 0 && (i1 - 1) - j0 >= m.window && j1 > m.sinks)
}

fn one_chunk(m: MaskArgs, lo: i64, hi: i64) -> bool {
    m.chunk <= 0 || lo > hi || chunk_of(m, lo) == chunk_of(m, hi)
}

fn visible(m: MaskArgs, i: i64, j: i64) -> bool {
    visible_unchunked(m, i, j) && (m.chunk <= 0 || j < m.sinks || chunk_of(m, i) == chunk_of(m, j))
}

fn tile_visible(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if !tile_visible_unchunked(m, i0, i1, j0, j1) {
        return false;
    }
    m.chunk <= 0 || j0 < m.sinks || !(chunk_of(m, j1 - 1) < chunk_of(m, i0) || chunk_of(m, j0) > chunk_of(m, i1 - 1))
}

fn tile_fully_visible(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    if !tile_fully_visible_unchunked(m, i0, i1, j0, j1) {
        return false;
    }
    j1 - 1 < m.sinks || one_chunk(m, i0.min(j0), i1.max(j1) - 1)
}

fn tile_window_free(m: MaskArgs, i0: i64, i1: i64, j0: i64, j1: i64) -> bool {
    let window_free = m.window <= 0 || (i1 - 1) - j0 < m.window || j1 - 1 < m.sinks;
    let chunk_free = j1 - 1 < m.sinks
        || if m.causal { one_chunk(m, j0, i1 - 1) } else { one_chunk(m, i0.min(j0), i1.max(j1) - 1) };
    window_free && chunk_free
}

/// mask.cuh `row_keys` / `row_sees` (i32 bounds as the kernel has them).
fn row_keys(m: MaskArgs, i: i64) -> (i64, i64) {
    let (min, max) = (i32::MIN as i64, i32::MAX as i64);
    let mut k = (min, if m.causal { i } else { max });
    if m.window > 0 && i >= min + m.window {
        k.0 = i - m.window + 1;
    }
    if m.chunk > 0 {
        let cs = chunk_of(m, i) * m.chunk;
        k.0 = k.0.max(cs);
        k.1 = k.1.min(if cs <= max - m.chunk { cs + m.chunk - 1 } else { max });
    }
    k
}

fn row_sees(m: MaskArgs, i: i64, k: (i64, i64), j: i64) -> bool {
    (j >= k.0 && j <= k.1) || (j < m.sinks && (!m.causal || j <= i))
}

/// A random mask: each of the window, the sinks and the chunks on or off.
fn random_mask(next: &mut impl FnMut(u64) -> u64) -> MaskArgs {
    MaskArgs {
        causal: next(3) != 0,
        window: [0, 1, 5, 64, 100][next(5) as usize],
        sinks: [0, 1, 4, 70][next(4) as usize],
        chunk: [0, 0, 1, 7, 32, 100, 256][next(7) as usize],
    }
}

fn lcg(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut s = seed;
    move |k: u64| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) % k
    }
}

/// The kernel's tile walk for one query block: the tiles it visits and which it treats as full.
fn walk(m: MaskArgs, i0: i64, vq: i64, kp: i64, seqlen_k: i64, bn: i64) -> Vec<(i64, bool, bool)> {
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
        let edge = tile_window_free(m, i0, i0 + vq, kp + j0, kp + j0 + bn);
        out.push((n, full, edge));
    }
    out
}

#[test]
fn tile_skipping_never_drops_or_admits_a_key() {
    let mut next = lcg(7);
    let mut checked = 0;
    for _ in 0..3000 {
        let m = random_mask(&mut next);
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
                    match tiles.iter().find(|(n, ..)| *n == tile) {
                        None => assert!(!vis, "visible pair skipped: {m:?} i={i} key={j} kp={kp}"),
                        Some((_, full, edge)) => {
                            assert!(!full || vis, "full tile admits a hidden pair: {m:?} i={i} key={j}");
                            // SM_EDGE: row i sees exactly the tile's keys up to its causal edge.
                            assert!(!edge || vis == (!m.causal || kp + j <= i), "edge form misjudges: {m:?} i={i} key={j} kp={kp}");
                        }
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
    let cases = [
        (true, None, 0, None),
        (true, Some(7), 2, None),
        (false, Some(3), 0, None),
        (false, None, 0, None),
        (true, None, 0, Some(8)),
        (true, Some(5), 3, Some(8)),
        (false, None, 1, Some(6)),
        (false, Some(4), 0, Some(1)),
    ];
    for (causal, window, sinks, chunk) in cases {
        let lib = Mask { causal, window, sinks, chunk };
        let rep = MaskArgs { causal, window: window.unwrap_or(0) as i64, sinks: sinks as i64, chunk: chunk.unwrap_or(0) as i64 };
        for i in -20..40 {
            for j in -20..40 {
                assert_eq!(lib.visible(i, j), visible(rep, i, j), "{lib:?} i={i} j={j}");
            }
        }
    }
}

/// kernels/decode.cuh `decode_span` and `next_visible_tile` with src/cuda/decode.rs's split
/// plan: the tiles `[j0, j1)` each split's warps visit.
fn decode_walk(m: MaskArgs, ctx: i64, queries: i64, splits: i64, warps: i64, bt: i64) -> Vec<(i64, i64)> {
    // Host: split_span and split_plan (SPLIT_ALIGN 32).
    let mut span = ctx;
    if m.window > 0 {
        span = span.min(m.window + queries - 1);
    }
    if m.chunk > 0 {
        span = span.min(m.chunk + queries - 1);
    }
    let kps = ((span.max(1) + splits - 1) / splits + 31) / 32 * 32;
    let splits = ((span.max(1) + kps - 1) / kps).max(1);
    let mut tiles = Vec::new();
    for split in 0..splits {
        let first = (ctx - queries).max(0);
        let mut lo = if m.window > 0 { (first - m.window + 1).max(0) } else { 0 };
        if m.chunk > 0 {
            lo = lo.max(first / m.chunk * m.chunk);
        }
        let k_begin = if split == 0 && m.sinks > 0 { 0 } else { lo + split * kps };
        let k_end = ctx.min(lo + (split + 1) * kps);
        for w in 0..warps {
            let mut n = w;
            loop {
                // next_visible_tile (the chunks left to lo)
                let unchunked = MaskArgs { chunk: 0, ..m };
                loop {
                    let j0 = k_begin + n * bt;
                    if j0 >= k_end {
                        break;
                    }
                    if j0 >= m.sinks && j0 + bt <= lo {
                        let need = (lo - k_begin - bt) / bt + 1;
                        if need > n {
                            n += ((need - n + warps - 1) / warps - 1) * warps;
                        }
                        n += warps;
                        continue;
                    }
                    if tile_visible_unchunked(unchunked, ctx - queries, ctx, j0, (j0 + bt).min(k_end)) {
                        break;
                    }
                    n += warps;
                }
                let j0 = k_begin + n * bt;
                if j0 >= k_end {
                    break;
                }
                tiles.push((j0, (j0 + bt).min(k_end)));
                n += warps;
            }
        }
    }
    tiles
}

#[test]
fn decode_splits_cover_every_visible_key_once() {
    let mut next = lcg(11);
    for _ in 0..4000 {
        let m = random_mask(&mut next);
        let queries = 1 + next(16) as i64;
        let ctx = queries + next(700) as i64;
        let (splits, warps, bt) = (1 + next(6) as i64, [1, 2, 4][next(3) as usize], [16, 32][next(2) as usize]);
        let tiles = decode_walk(m, ctx, queries, splits, warps, bt);
        let mut seen = vec![0; ctx as usize];
        for &(j0, j1) in &tiles {
            for j in j0..j1 {
                seen[j as usize] += 1;
            }
        }
        for j in 0..ctx {
            let vis = (ctx - queries..ctx).any(|i| visible(m, i, j));
            assert!(seen[j as usize] <= 1, "key {j} visited twice: {m:?} ctx={ctx} queries={queries} splits={splits}");
            assert!(!vis || seen[j as usize] == 1, "visible key {j} skipped: {m:?} ctx={ctx} queries={queries} splits={splits} warps={warps} bt={bt}");
        }
    }
}

#[test]
fn row_bounds_are_the_mask() {
    let mut next = lcg(5);
    for _ in 0..3000 {
        let m = random_mask(&mut next);
        let i = next(700) as i64 - 200;
        let k = row_keys(m, i);
        for j in -50..600 {
            assert_eq!(row_sees(m, i, k, j), visible(m, i, j), "{m:?} i={i} j={j}");
        }
    }
}

/// kernels/attention_decode_mma.cu's whole-tile test: tile_fully_visible_unchunked and
/// decode.cuh `decode_chunk_free` (the first and last query's chunk starts).
#[test]
fn decode_whole_tiles_hide_nothing() {
    let mut next = lcg(3);
    let mut whole = 0;
    for _ in 0..4000 {
        let m = random_mask(&mut next);
        let queries = 1 + next(16) as i64;
        let ctx = queries + next(700) as i64;
        let (first, last) = (ctx - queries, ctx - 1);
        let cl = if m.chunk > 0 { [chunk_of(m, first) * m.chunk, chunk_of(m, last) * m.chunk] } else { [0, 0] };
        for (j0, _) in decode_walk(m, ctx, queries, 1 + next(4) as i64, 4, 16).into_iter().filter(|(j0, j1)| j1 - j0 == 16) {
            let free = m.chunk <= 0 || j0 + 15 < m.sinks || (cl[0] == cl[1] && j0 >= cl[0]);
            if tile_fully_visible_unchunked(m, first, ctx, j0, j0 + 16) && free {
                whole += 1;
                for i in first..ctx {
                    for j in j0..j0 + 16 {
                        assert!(visible(m, i, j), "whole tile at {j0} hides {j} from {i}: {m:?} ctx={ctx} queries={queries}");
                    }
                }
            }
        }
    }
    assert!(whole > 1000);
}
