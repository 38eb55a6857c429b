// Causal, sliding-window and sink masks (SPEC §5), per element and per tile.
#pragma once
#include "common.cuh"

namespace ra {

struct MaskArgs {
    int causal;  // hide j > i
    int window;  // 0 = none; else hide i - j >= window ...
    int sinks;   // ... unless j < sinks
};

__device__ __forceinline__ bool visible(const MaskArgs& m, int i, int j) {
    if (m.causal && j > i) return false;
    if (m.window > 0 && i - j >= m.window && j >= m.sinks) return false;
    return true;
}

// Whether any key in [j0, j1) is visible to any query in [i0, i1): whole-tile skipping.
// Monotone in i and j, so testing the tile's extreme corners is exact.
__device__ __forceinline__ bool tile_visible(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (i1 <= i0 || j1 <= j0) return false;
    if (m.causal && j0 > i1 - 1) return false;  // every key after every query
    if (m.window > 0 && (i0 - (j1 - 1)) >= m.window && j0 >= m.sinks) return false;  // all too far, none a sink
    return true;
}

// Whether every key in the tile is visible to every query (no per-element masking needed).
__device__ __forceinline__ bool tile_fully_visible(const MaskArgs& m, int i0, int i1, int j0, int j1) {
    if (m.causal && j1 - 1 > i0) return false;
    if (m.window > 0 && (i1 - 1) - j0 >= m.window && !(j1 - 1 < m.sinks)) return false;
    return true;
}

// Whether the window hides no key in [j0, j1) from any query before i1 that the causal mask
// (if any) lets see it: the farthest such pair is within the window, or every key is a sink.
__device__ __forceinline__ bool tile_window_free(const MaskArgs& m, int i1, int j0, int j1) {
    return m.window <= 0 || (i1 - 1) - j0 < m.window || j1 - 1 < m.sinks;
}

}  // namespace ra
