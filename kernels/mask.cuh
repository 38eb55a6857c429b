// Causal, sliding-window, chunked and sink masks (SPEC §5), per element and per tile.
#pragma once
#include <climits>

#include "common.cuh"

namespace ra {

struct MaskArgs {
    int causal;  // hide j > i
    int window;  // 0 = none; else hide i - j >= window ...
    int sinks;   // ... and other chunks' keys, unless j < sinks
    int chunk;   // 0 = none; else hide j whose chunk floor(j / chunk) is not i's (Llama 4)
};

// The causal, window and sink masks alone. The decode kernels walk their tiles with these (the
// chunks need no tile test there: decode.cuh, next_visible_tile) and take the chunks per row
// (row_keys); each keeps the form it had before chunks came, for the head_dim-256 decode
// kernel, which ptxas fits into 255 registers only in that form (a dead chunk test that folds
// away still changed its allocation into spills).
__device__ __forceinline__ bool visible_unchunked(const MaskArgs& m, int i, int j) {
    if (m.causal && j > i) return false;
    if (m.window > 0 && i - j >= m.window && j >= m.sinks) return false;
    return true;
}

// Whether any key in [j0, j1) is visible to any query in [i0, i1) (chunks aside): whole-tile
// skipping. Monotone in i and j, so testing the tile's extreme corners is exact.
__device__ __forceinline__ bool tile_visible_unchunked(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (i1 <= i0 || j1 <= j0) return false;
    if (m.causal && j0 > i1 - 1) return false;  // every key after every query
    if (m.window > 0 && (i0 - (j1 - 1)) >= m.window && j0 >= m.sinks) return false;  // all too far, none a sink
    return true;
}

// Whether every key in the tile is visible to every query (chunks aside).
__device__ __forceinline__ bool tile_fully_visible_unchunked(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (m.causal && j1 - 1 > i0) return false;
    if (m.window > 0 && (i1 - 1) - j0 >= m.window && !(j1 - 1 < m.sinks)) return false;
    return true;
}

// floor(pos / chunk): positions may be negative (explicit starts), where C++ division truncates.
__device__ __forceinline__ int chunk_of(const MaskArgs& m, int pos) {
    return pos >= 0 ? pos / m.chunk : -((m.chunk - 1 - pos) / m.chunk);
}

// The first position of i's chunk (0 without chunks).
__device__ __forceinline__ int chunk_start(const MaskArgs& m, int i) { return m.chunk > 0 ? chunk_of(m, i) * m.chunk : 0; }

// Whether the chunks hide nothing among positions lo..hi (all in one chunk; lo > hi: no pair).
__device__ __forceinline__ bool one_chunk(const MaskArgs& m, int lo, int hi) {
    return m.chunk <= 0 || lo > hi || chunk_of(m, lo) == chunk_of(m, hi);
}

// Whether query i sees key j: every mask.
__device__ __forceinline__ bool visible(const MaskArgs& m, int i, int j) {
    return visible_unchunked(m, i, j) && (m.chunk <= 0 || j < m.sinks || chunk_of(m, i) == chunk_of(m, j));
}

// tile_visible_unchunked with the chunks: false also when every key is in a chunk before the
// first query's or after the last query's, none a sink. Each mask's test is exact alone;
// together (a causal window in a chunk) a tile can pass with no visible pair, which costs a
// tile of work, never a key.
__device__ __forceinline__ bool tile_visible(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (!tile_visible_unchunked(m, i0, i1, j0, j1)) return false;
    return m.chunk <= 0 || j0 < m.sinks || !(chunk_of(m, j1 - 1) < chunk_of(m, i0) || chunk_of(m, j0) > chunk_of(m, i1 - 1));
}

// tile_fully_visible_unchunked with the chunks: every key a sink, or every query and key in one
// chunk (causal: every key is at or before i0).
__device__ __forceinline__ bool tile_fully_visible(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (!tile_fully_visible_unchunked(m, i0, i1, j0, j1)) return false;
    return j1 - 1 < m.sinks || one_chunk(m, imin(i0, j0), imax(i1, j1) - 1);
}

// Whether the window and the chunks hide no key in [j0, j1) from any query in [i0, i1) that
// the causal mask (if any) lets see it: the farthest such pair is within the window and every
// such pair in one chunk (causal: the pairs lie in [j0, i1)), or every key is a sink.
__device__ __forceinline__ bool tile_window_free(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    const bool window_free = m.window <= 0 || (i1 - 1) - j0 < m.window || j1 - 1 < m.sinks;
    const bool chunk_free = j1 - 1 < m.sinks ||
                            (m.causal ? one_chunk(m, j0, i1 - 1) : one_chunk(m, imin(i0, j0), imax(i1, j1) - 1));
    return window_free && chunk_free;
}

// The keys past the sinks that query i sees, [lo, hi]: the later of the window's and chunk's
// start, the earlier of the causal mask's and the chunk's end. One query's whole mask, for
// kernels that hold it per row (a division per row instead of one per key).
struct RowKeys {
    int lo, hi;
};
__device__ __forceinline__ RowKeys row_keys(const MaskArgs& m, int i) {
    RowKeys k{INT_MIN, m.causal ? i : INT_MAX};
    if (m.window > 0 && i >= INT_MIN + m.window) k.lo = i - m.window + 1;
    if (m.chunk > 0) {
        const int cs = chunk_start(m, i);
        k.lo = imax(k.lo, cs);
        k.hi = imin(k.hi, cs <= INT_MAX - m.chunk ? cs + m.chunk - 1 : INT_MAX);
    }
    return k;
}
// visible(m, i, j) given k = row_keys(m, i): inside [lo, hi], or a sink the causal mask shows.
__device__ __forceinline__ bool row_sees(const MaskArgs& m, int i, RowKeys k, int j) {
    return (j >= k.lo && j <= k.hi) || (j < m.sinks && (!m.causal || j <= i));
}

}  // namespace ra
