// Loading a tile of head vectors into shared memory, rotated on the way (the fused part of
// every fused kernel). Each thread takes whole rotation pairs, so a tile can also be rotated
// in place in shared memory (src == dst) after an async copy.
#pragma once
#include "rope.cuh"

namespace ra {

// Which rotation a tile receives (SPEC §3's two-rotation trick for ReRoPE).
enum RotMode {
    ROT_NONE = 0,     // copy as is
    ROT_POS = 1,      // rotate to the row's own position, times attention_factor
    ROT_Q_RE = 2,     // ReRoPE far query: rotate to w, times attention_factor^2 (key stays raw)
    ROT_Q_LEAKY = 3,  // Leaky far query: rotate to w + (i - w)/k
    ROT_K_LEAKY = 4,  // Leaky far key: rotate to j/k
};

__device__ __forceinline__ float2 mode_cs(const RopeArgs& a, int mode, int pos, int pair) {
    const float af = a.attention_factor;
    switch (mode) {
        case ROT_POS: return pair_cs(pos, pair_freq(a, pair), af);
        case ROT_Q_RE: return pair_cs(a.window, pair_freq(a, pair), af * af);
        case ROT_Q_LEAKY:
            return cs_scaled(angle_turns(a.window, pair_freq(a, pair)) + angle_turns(pos - a.window, pair_freq_leak(a, pair)), af);
        default: return pair_cs(pos, pair_freq_leak(a, pair), af);  // ROT_K_LEAKY
    }
}

__device__ __forceinline__ float2 composed_cs(const float2* off, const float2* base, int row, int pr, int half);

// rows x D tile: src row r at src + r * src_stride (global or shared), dst row r at
// dst + r * dst_ld (shared). Rows >= valid_rows are zero-filled. Row r sits at position pos0 + r.
// With tables (ROT_POS only: `off` and `base` filled by fill_rotation_offsets / _bases for
// pos0) each angle is composed from them instead of evaluated (one complex product instead of
// an exact reduction and a sincos). Every thread of the block must call it (it does not
// synchronize by itself). A query tile (`query`) also takes Llama 4's temperature
// (query_temperature) before its one rounding to DstT.
template <typename SrcT, typename DstT>
__device__ __forceinline__ void load_rotated_tile(DstT* dst, int dst_ld, const SrcT* src, long long src_stride,
                                                  int rows, int valid_rows, int D, const RopeArgs& a, int mode,
                                                  int pos0, const float2* off = nullptr, const float2* base = nullptr,
                                                  bool query = false) {
    const int r = (mode == ROT_NONE) ? 0 : a.rotary_dim;
    const int half = r / 2;
    const bool in_place = static_cast<const void*>(src) == static_cast<const void*>(dst);
    // Rotation pairs.
    for (int e = threadIdx.x; e < rows * half; e += blockDim.x) {
        const int row = e / half, p = e % half;
        int ia, ib;
        pair_index(a.interleaved, r, p, ia, ib);
        float x0 = 0.f, x1 = 0.f;
        if (row < valid_rows) {
            x0 = to_f32(src[row * src_stride + ia]);
            x1 = to_f32(src[row * src_stride + ib]);
            const float2 cs = off ? composed_cs(off, base, row, p, half) : mode_cs(a, mode, pos0 + row, p);
            rotate_pair(x0, x1, cs.x, cs.y);
            if (query) {
                const float t = query_temperature(a, pos0 + row);
                x0 *= t, x1 *= t;
            }
        }
        dst[row * dst_ld + ia] = from_f32<DstT>(x0);
        dst[row * dst_ld + ib] = from_f32<DstT>(x1);
    }
    // Pass-through components (all of them without RoPE).
    const int rest = D - r;
    if (rest > 0 && !in_place) {
        for (int e = threadIdx.x; e < rows * rest; e += blockDim.x) {
            const int row = e / rest, c = r + e % rest;
            const float t = query ? query_temperature(a, pos0 + row) : 1.f;
            dst[row * dst_ld + c] = row < valid_rows ? from_f32<DstT>(to_f32(src[row * src_stride + c]) * t) : from_f32<DstT>(0.f);
        }
    }
}

// Llama 4's temperature (rope.cuh, query_temperature) on a staged query tile, in place: rows
// [0, valid) at positions pos0 + row, every component (rotated or passed through), rounded once
// more to T, as transformers rounds `query_states * attn_scales` to the model's dtype. Between
// barriers: its threads take other elements than the loaders' did. Callers skip it for a tile
// with no factor other than 1 (tile_has_temperature). For a tile staged by async copy (and
// rotated in place); load_rotated_tile scales a tile it loads itself. Not inlined: it runs once
// per block, and out of line it leaves the key loop's register allocation alone (inlined, it
// had cost the head_dim-96 prefill, at ptxas's 168-register cap on sm_80, a spill). Scalars
// only: a reference to the kernel's parameters would copy them to the stack for the call.
template <typename T>
__device__ __noinline__ void scale_query_tile(T* tile, int ld, int valid, int D, int floor_scale, float attn_scale, int offset, int pos0) {
    for (int e = threadIdx.x; e < valid * D; e += blockDim.x) {
        const int row = e / D;
        T& x = tile[row * ld + e % D];
        x = from_f32<T>(to_f32(x) * query_temperature(floor_scale, attn_scale, offset, pos0 + row));
    }
}

// ---- composed rotations: RoPE(p0 + 8a + b) = RoPE(p0 + 8a) ∘ RoPE(b) --------------------------
// For tiles rotated once per visit (decode's K tiles, the fused prefill's K tiles): a table of
// the offsets b < 8, made once per block, and a base per 8 rows of each tile turn every
// element's exact angle reduction and sincos into one complex product (~8x less trigonometry).
// Both factors come from exact angles (angle_turns), so the result is as accurate as a direct
// evaluation to a few f32 ulps (tests/angle_precision.rs replays it).
constexpr int ROT_SUB = 8;

// t[s][pair] = (cos, sin) of position pos0 + stride·s, s < n, times `scale`: the three tables
// below, each angle from an exact reduction.
__device__ __forceinline__ void fill_rotation_table(float2* t, const RopeArgs& a, int pos0, int stride, int n, float scale) {
    const int half = a.rotary_dim / 2;
    for (int e = threadIdx.x; e < n * half; e += blockDim.x) t[e] = pair_cs(pos0 + stride * (e / half), pair_freq(a, e % half), scale);
}

// off[b][pair] = (cos, sin) of offset b < ROT_SUB: once per block.
__device__ __forceinline__ void fill_rotation_offsets(float2* off, const RopeArgs& a) { fill_rotation_table(off, a, 0, 1, ROT_SUB, 1.f); }

// base[s][pair] = (cos, sin) of position pos0 + 8s, times the attention factor: once per tile
// of `rows` (a multiple of ROT_SUB).
__device__ __forceinline__ void fill_rotation_bases(float2* base, const RopeArgs& a, int pos0, int rows) {
    fill_rotation_table(base, a, pos0, ROT_SUB, rows / ROT_SUB, a.attention_factor);
}

// step[s][pair] = (cos, sin) of 8s, s < n: once per block, for fill_rotation_bases_stepped.
__device__ __forceinline__ void fill_rotation_steps(float2* step, const RopeArgs& a, int n) { fill_rotation_table(step, a, 0, ROT_SUB, n, 1.f); }

// fill_rotation_bases for a K tile visited once per query tile, with a tenth of its exact
// angles: base[s] = base[0] ∘ step[s], each pair's exact angle at pos0 evaluated by the threads
// that share its bases (the block's threads split evenly over the pairs; at most 64 pairs
// with 128 threads: two or more a pair) instead of one exact angle per base. Three exact
// factors per key then (as decode's second 8 keys have): tests/angle_precision.rs replays it.
__device__ __forceinline__ void fill_rotation_bases_stepped(float2* base, const RopeArgs& a, int pos0, int rows, const float2* step) {
    const int half = a.rotary_dim / 2, n = rows / ROT_SUB, share = blockDim.x / half;
    if (share <= 1) {  // no more threads than pairs: each thread its pairs' every base
        for (int p = threadIdx.x; p < half; p += blockDim.x) {
            const float2 b0 = pair_cs(pos0, pair_freq(a, p), a.attention_factor);
            for (int s = 0; s < n; ++s) base[s * half + p] = cmul(b0, step[s * half + p]);
        }
    } else if (threadIdx.x < share * half) {  // `share` threads a pair, every share-th base each
        const int p = threadIdx.x % half;
        const float2 b0 = pair_cs(pos0, pair_freq(a, p), a.attention_factor);
        for (int s = threadIdx.x / half; s < n; s += share) base[s * half + p] = cmul(b0, step[s * half + p]);
    }
}

// (cos, sin) of row `row` (position pos0 + row of the bases' tile) and rotation pair `pr`:
// base ∘ offset, one complex product (tables of `pitch` pairs a row).
__device__ __forceinline__ float2 composed_cs(const float2* off, const float2* base, int row, int pr, int pitch) {
    return cmul(base[(row / ROT_SUB) * pitch + pr], off[(row % ROT_SUB) * pitch + pr]);
}

// Rotate rows [0, valid) of a shared-memory tile in place to positions pos0 + row (the bases'
// pos0), by threads tid of n (a block, or a warp's lanes); tables of `pitch` pairs a row. Rows
// past `valid` are left as they are (zeros, from the loaders), and so are the pass-through
// components.
// Where the pairs fill whole 16-byte accesses (rotate_half: the rotary half a multiple of 8
// elements; interleaved: of 4 pairs; rows and tables 16-byte aligned) a thread takes a run of
// them per item, from vector loads of the tile and of both tables, and steps from item to item
// without dividing: a tenth of the instructions per pair of the one-pair loop below, whose
// runtime division by the rotary half alone costs about twenty.
template <typename T>
__device__ __forceinline__ void rotate_rows_composed(T* tile, int ld, int valid, const RopeArgs& a, const float2* off,
                                                     const float2* base, int pitch, int tid, int n) {
    const int half = a.rotary_dim / 2;
    constexpr int PER = 16 / sizeof(T);  // elements a 16-byte access carries
    const int run = a.interleaved ? PER / 2 : PER;  // pairs per item
    if (half % run == 0 && pitch % 2 == 0 && (ld * sizeof(T)) % 16 == 0) {
        const int per_row = half / run, items = valid * per_row;
        const int drow = n / per_row, dgrp = n % per_row;
        int row = tid / per_row, grp = tid % per_row;
        for (int e = tid; e < items; e += n) {
            const int p0 = grp * run;
            const float4* b4 = reinterpret_cast<const float4*>(base + (row / ROT_SUB) * pitch + p0);
            const float4* o4 = reinterpret_cast<const float4*>(off + (row % ROT_SUB) * pitch + p0);
            float2 cs[PER];
#pragma unroll
            for (int j = 0; j < PER / 2; ++j) {
                if (2 * j >= run) break;
                RA_VECTOR_ACCESS(b4 + j, 16);
                RA_VECTOR_ACCESS(o4 + j, 16);
                const float4 b = b4[j], o = o4[j];
                cs[2 * j] = cmul(make_float2(b.x, b.y), make_float2(o.x, o.y));
                cs[2 * j + 1] = cmul(make_float2(b.z, b.w), make_float2(o.z, o.w));
            }
            T* x = tile + row * ld;
            if (a.interleaved) {
                float v[PER];
                load_f32<T, PER>(x + 2 * p0, v);
#pragma unroll
                for (int j = 0; j < PER / 2; ++j) rotate_pair(v[2 * j], v[2 * j + 1], cs[j].x, cs[j].y);
                store_f32<T, PER>(x + 2 * p0, v);
            } else {
                float v0[PER], v1[PER];
                load_f32<T, PER>(x + p0, v0);
                load_f32<T, PER>(x + p0 + half, v1);
#pragma unroll
                for (int j = 0; j < PER; ++j) rotate_pair(v0[j], v1[j], cs[j].x, cs[j].y);
                store_f32<T, PER>(x + p0, v0);
                store_f32<T, PER>(x + p0 + half, v1);
            }
            row += drow, grp += dgrp;
            if (grp >= per_row) grp -= per_row, ++row;
        }
        return;
    }
    for (int e = tid; e < valid * half; e += n) {
        const int row = e / half, pr = e % half;
        int ia, ib;
        pair_index(a.interleaved, a.rotary_dim, pr, ia, ib);
        const float2 cs = composed_cs(off, base, row, pr, pitch);
        float x0 = to_f32(tile[row * ld + ia]), x1 = to_f32(tile[row * ld + ib]);
        rotate_pair(x0, x1, cs.x, cs.y);
        tile[row * ld + ia] = from_f32<T>(x0);
        tile[row * ld + ib] = from_f32<T>(x1);
    }
}

// The block's threads, tables of `half` pairs a row (fill_rotation_offsets / _bases).
template <typename T>
__device__ __forceinline__ void rotate_tile_composed(T* tile, int ld, int valid, const RopeArgs& a, const float2* off,
                                                     const float2* base) {
    rotate_rows_composed(tile, ld, valid, a, off, base, a.rotary_dim / 2, threadIdx.x, blockDim.x);
}

}  // namespace ra
