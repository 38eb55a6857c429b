// Rotation helpers shared by every kernel: exact angles at any position, both pair layouts,
// partial rotary and the attention factor (SPEC §1, "Precision").
#pragma once
#include "common.cuh"

// Frequencies RopeArgs holds: rotary_dim <= 256 (head_dim <= 256), or up to 512 where every
// pair past the first RA_MAX_PAIRS has frequency 0 (Gemma 4's 512-wide layers: proportional
// RoPE turns 64 pairs, the rest pass through). The host refuses any other rotation, so the
// kernels' parameters stay under 4 KB (a table for 256 pairs would double RopeArgs).
#define RA_MAX_PAIRS 128
#define RA_MAX_ROT_PAIRS 256

namespace ra {

// How Q and K are rotated. Mirrored by `RopeArgs` in src/cuda/params.rs (same field order).
struct RopeArgs {
    // Frequencies in *turns* per position (inv_freq / 2π), each split into an f32 pair
    // hi + lo so that together they carry ~48 bits: see angle_turns.
    float2 freq[RA_MAX_PAIRS];
    // The same divided by Leaky ReRoPE's k (zeros otherwise).
    float2 freq_leak[RA_MAX_PAIRS];
    int rotary_dim;          // 0 = no RoPE
    int interleaved;         // 0 = half (rotate_half), 1 = interleaved pairs
    float attention_factor;  // multiplies rotated components
    int relative;            // 0 = plain RoPE, 1 = ReRoPE, 2 = Leaky ReRoPE
    int window;              // ReRoPE window w
    // The query temperature (query_temperature): floor_scale (0 = none), attn_scale and the
    // position offset (1: Llama 4's, 0: Ministral 3's). Attention and score kernels only; the
    // rope kernel's are always 0.
    int temp_floor;
    float temp_scale;
    int temp_offset;
};

// Pair i's frequencies (turns per position, hi + lo): the table's, 0 past it (see RA_MAX_PAIRS).
__device__ __forceinline__ float2 pair_freq(const RopeArgs& a, int i) { return i < RA_MAX_PAIRS ? a.freq[i] : make_float2(0.f, 0.f); }
__device__ __forceinline__ float2 pair_freq_leak(const RopeArgs& a, int i) {
    return i < RA_MAX_PAIRS ? a.freq_leak[i] : make_float2(0.f, 0.f);
}

enum Relative { REL_NONE = 0, REL_RE = 1, REL_LEAKY = 2 };

// x - round(x): exact in floating point, result in [-0.5, 0.5].
__device__ __forceinline__ float frac_turns(float x) { return x - rintf(x); }

// The fractional part of m * f (in turns) for an integer position m of any size an int holds.
// An f32 product m*f loses the fraction once m*f > 2^23 (at m = 2^24 nothing is left), so:
// m = mh + ml with mh a multiple of 4096 and ml < 4096 (both exact in f32), f = hi + lo. Each
// partial product's rounding error is recovered exactly by fmaf, and every term that can exceed
// one turn (the products and mh*hi's error, up to ~16) is reduced mod 1 exactly (frac_turns)
// before it is added; the running sum is reduced after each addition so it stays below one
// turn. What remains is four roundings of numbers below 1: < 2.5e-7 turns
// (tests/angle_precision.rs replays this function on the CPU and checks that bound).
__device__ __forceinline__ float angle_turns(int m_signed, float2 f) {
    const float sign = m_signed < 0 ? -1.f : 1.f;
    const unsigned m = m_signed < 0 ? 0u - static_cast<unsigned>(m_signed) : static_cast<unsigned>(m_signed);
    const float mh = static_cast<float>(m & 0xFFFFF000u);
    const float ml = static_cast<float>(m & 0x00000FFFu);
    const float p1 = mh * f.x, e1 = fmaf(mh, f.x, -p1);
    const float p2 = ml * f.x, e2 = fmaf(ml, f.x, -p2);
    const float p3 = mh * f.y, e3 = fmaf(mh, f.y, -p3);
    const float p4 = ml * f.y;
    float t = frac_turns(p1) + frac_turns(p2);
    t = frac_turns(t) + frac_turns(p3);
    t = frac_turns(t) + frac_turns(e1);
    t = frac_turns(t) + ((e2 + e3) + p4);
    return sign * frac_turns(t);
}

// cos and sin of 2π t: sincospif reduces its argument exactly, so |t| <= 0.5 costs no accuracy.
__device__ __forceinline__ void sincos_turns(float t, float& c, float& s) { sincospif(2.f * t, &s, &c); }

// Indices of rotation pair i in a head (SPEC §1).
__device__ __forceinline__ void pair_index(int interleaved, int rotary_dim, int i, int& a, int& b) {
    if (interleaved) {
        a = 2 * i;
        b = 2 * i + 1;
    } else {
        a = i;
        b = i + rotary_dim / 2;
    }
}

// The query temperature on the query at position pos: 1 + attn_scale · ln(1 + floor((pos +
// offset) / floor_scale)), 1 before position 0 and when off. Llama 4's attn_temperature_tuning
// has offset 1, Ministral 3's llama_4_scaling_beta offset 0. The floor in unsigned integers
// (exact, and pos + offset, offset 0 or 1, cannot overflow), then one log1pf (1 ulp).
__device__ __forceinline__ float query_temperature(int floor_scale, float attn_scale, int offset, int pos) {
    if (floor_scale <= 0 || pos < 0) return 1.f;
    const unsigned steps = (static_cast<unsigned>(pos) + static_cast<unsigned>(offset)) / static_cast<unsigned>(floor_scale);
    return fmaf(attn_scale, log1pf(static_cast<float>(steps)), 1.f);
}
__device__ __forceinline__ float query_temperature(const RopeArgs& a, int pos) {
    return query_temperature(a.temp_floor, a.temp_scale, a.temp_offset, pos);
}

// Whether a tile of queries at positions [pos0, pos0 + rows) has one with a factor other than 1
// (block-uniform: a tile below floor_scale - offset, as every tile of a prompt under 8k is in
// Llama 4, skips the pass).
__device__ __forceinline__ bool tile_has_temperature(const RopeArgs& a, int pos0, int rows) {
    return a.temp_floor > 0 && rows > 0 && static_cast<long long>(pos0) + rows - 1 + a.temp_offset >= a.temp_floor;
}

// Rotate (x0, x1) by (c, s); the attention factor is folded into c and s by the callers.
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float c, float s) {
    const float y0 = x0 * c - x1 * s;
    const float y1 = x0 * s + x1 * c;
    x0 = y0;
    x1 = y1;
}

// a · b, complex: the rotation by the sum of two angles (rotations by composition).
__device__ __forceinline__ float2 cmul(float2 a, float2 b) { return make_float2(a.x * b.x - a.y * b.y, a.y * b.x + a.x * b.y); }

// (cos, sin) * scale of pair i at turns t.
__device__ __forceinline__ float2 cs_scaled(float t, float scale) {
    float c, s;
    sincos_turns(t, c, s);
    return make_float2(c * scale, s * scale);
}

// (cos, sin)·scale at position pos of a pair of frequency f (turns): the exact reduction and
// sincospif, or for a pair of frequency 0 (proportional RoPE's pass-through pairs: 192 of
// Gemma 4's 256 at head_dim 512) (scale, 0) at once, the same bits the reduction gives
// (angle 0: cos 1, sin 0). The warps of a tile's pairs mostly take one side.
__device__ __forceinline__ float2 pair_cs(int pos, float2 f, float scale) {
    if (f.x == 0.f && f.y == 0.f) return make_float2(scale, 0.f);
    return cs_scaled(angle_turns(pos, f), scale);
}

}  // namespace ra
