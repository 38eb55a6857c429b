// ALiBi slopes computed in-kernel from (total heads, global head index), so a tensor-parallel
// shard only passes its head offset (SPEC §4).
#pragma once
#include "common.cuh"

namespace ra {

// BLOOM's schedule: n = largest power of two <= H; 2^(-8(h+1)/n) for h < n, then every other
// slope of the 2n schedule. 8(h+1)/n is exact in f32 (n is a power of two), so the only rounding
// is exp2f's own (<= 2 ulp).
__device__ __forceinline__ float alibi_slope(int total_heads, int h) {
    const int n = 1 << (31 - __clz(total_heads));
    const float nf = static_cast<float>(n);
    return h < n ? exp2f(-8.f * static_cast<float>(h + 1) / nf)
                 : exp2f(-4.f * static_cast<float>(2 * (h - n) + 1) / nf);
}

// Bias added to the scaled score of query position i and key position j.
__device__ __forceinline__ float alibi_bias(float slope, int i, int j) {
    const int d = i - j;
    return -slope * static_cast<float>(d < 0 ? -d : d);
}

}  // namespace ra
