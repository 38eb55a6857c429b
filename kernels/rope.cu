// The standalone rotation kernel: rotates Q and K (in place, or out of place into a workspace)
// in one launch. Tensors are [tokens, heads, head_dim] with a row stride between tokens, so the
// Q and K parts of a packed QKV projection are rotated where they lie. The same kernel gathers
// a paged cache's keys (rotated) and values into contiguous rows, for the paged prefill's
// gathered path (src/cuda/paged_prefill.rs).
//
// One block per token: the block computes the token's cos/sin once per pair (shared by all
// heads), then each thread rotates P consecutive pairs of one head with vector loads. The
// kernel is memory-bound; pass-through components are not touched when rotating in place.
// It also applies the QK norm (Qwen3, Gemma 3, OLMo 2, Llama 4) before the rotation, so a
// normalised and rotated Q and K cost one read and one write: each head's sum of squares
// first (a warp per head, read before anything is written), then the rotation loop scales
// each component as it loads it. With rotary_dim 0 it only normalises (the unrotated cache's
// path: the attention kernels rotate).
#include "rope.cuh"
#include "paged.cuh"
#include "params.cuh"

namespace ra {


// A token's positions: time, height, width (all three the same except under M-RoPE).
struct TokenPos {
    int t, h, w;
};

__device__ __forceinline__ TokenPos token_position(const RopeParams& p, int t) {
    if (p.positions != nullptr) {
        if (p.mrope == 0) return TokenPos{p.positions[t], p.positions[t], p.positions[t]};
        return TokenPos{p.positions[t], p.positions[p.mrope_stride + t], p.positions[2 * p.mrope_stride + t]};
    }
    int lo = 0, hi = p.batch;  // largest b with cu_seqlens[b] <= t
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (p.cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    const int pos = t - p.cu_seqlens[lo] + (p.seq_starts ? p.seq_starts[lo * p.starts_stride] : 0);
    return TokenPos{pos, pos, pos};
}

// The position pair i is rotated to (src/config/mrope.rs, MRope::component): chunked sections
// in pair order, or Qwen3-VL's interleaving (height on i % 3 == 1 below 3h, width on
// i % 3 == 2 below 3w, time elsewhere). Once per pair per token, in the table loop.
__device__ __forceinline__ int pair_position(const RopeParams& p, TokenPos pos, int i) {
    if (p.mrope == 1) {
        const int t_end = p.rope.rotary_dim / 2 - p.mrope_h - p.mrope_w;
        return i < t_end ? pos.t : (i < t_end + p.mrope_h ? pos.h : pos.w);
    }
    if (p.mrope == 2) {
        const int r = i % 3;
        return (r == 1 && i < 3 * p.mrope_h) ? pos.h : ((r == 2 && i < 3 * p.mrope_w) ? pos.w : pos.t);
    }
    return pos.t;
}

// Elements [from, D) of each of `heads` heads of a row, moved unchanged (the pass-through
// components of partial rotary, or a whole V row): 16-byte accesses when the rows start on
// 16-byte boundaries (`vec`; D is then a multiple of the chunk) and `from` falls on a chunk,
// else one element at a time.
template <typename T>
__device__ __forceinline__ void copy_heads(const T* src, T* dst, int heads, int D, int from, bool vec) {
    constexpr int PER = 16 / sizeof(T);
    if (vec && from % PER == 0) {
        const int ch = (D - from) / PER;
        for (int w = threadIdx.x; w < heads * ch; w += blockDim.x) {
            const int e = (w / ch) * D + from + (w % ch) * PER;
            RA_VECTOR_ACCESS(src + e, 16);
            RA_VECTOR_ACCESS(dst + e, 16);
            *reinterpret_cast<Vec<T, PER>*>(dst + e) = *reinterpret_cast<const Vec<T, PER>*>(src + e);
        }
    } else {
        const int rest = D - from;
        for (int w = threadIdx.x; w < heads * rest; w += blockDim.x) {
            const int e = (w / rest) * D + from + w % rest;
            dst[e] = src[e];
        }
    }
}

// Head h of a token's row: Q's heads first, then K's (the order the kernel's loops take them).
// Only the normed paths call these; Q's input heads are q_in_hstride apart (a gated query).
template <typename T>
__device__ __forceinline__ const T* head_in(const RopeParams& p, long long row, int h) {
    const bool is_q = h < p.q_heads;
    return static_cast<const T*>(is_q ? p.q_in : p.k_in) + row * (is_q ? p.q_in_stride : p.k_in_stride) +
           (is_q ? h * p.q_in_hstride : (h - p.q_heads) * p.head_dim);
}
template <typename T>
__device__ __forceinline__ T* head_out(const RopeParams& p, long long row, int h) {
    const bool is_q = h < p.q_heads;
    return static_cast<T*>(is_q ? p.q_out : p.k_out) + row * (is_q ? p.q_out_stride : p.k_out_stride) + (is_q ? h : h - p.q_heads) * p.head_dim;
}

#define RA_MAX_NORM_HEADS 256  // q_heads + k_heads of a QK-norm launch (src/cuda/rope.rs checks)
#define RA_NORM_MEANS (RA_MAX_NORM_HEADS + 2)  // where norm 3 keeps each head's mean in sums

// QK norm, first step: each head's sum of squares of its input row, to sums[h], one warp per
// head (lanes over the components, 16-byte loads where VEC, then a shuffle tree); for norm 2,
// after a barrier, warp 0 adds Q's heads and K's heads up into sums[heads] and sums[heads + 1].
// Norm 3 (Cohere's LayerNorm) takes two passes over the head: its mean to
// sums[RA_NORM_MEANS + h], then the squares of the deviations from it (not E[x²] - mean²,
// which cancels in f32 when the mean is large against the spread).
// It reads the inputs before any thread writes (in place, the outputs are the inputs): the
// caller's barrier after it orders the two.
template <typename T, bool VEC>
__device__ float head_sum(const T* x, int D, float mean, bool square) {
    constexpr int PER = 16 / sizeof(T);
    const int lane = threadIdx.x % 32;
    float s = 0.f;
    if (VEC) {
        for (int c = lane * PER; c < D; c += 32 * PER) {
            float v[PER];
            load_f32<T, PER>(x + c, v);
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const float d = v[j] - mean;
                s = square ? fmaf(d, d, s) : s + v[j];
            }
        }
    } else {
        for (int c = lane; c < D; c += 32) {
            const float d = to_f32(x[c]) - mean;
            s = square ? fmaf(d, d, s) : s + d;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

template <typename T, bool VEC>
__device__ void norm_sums(const RopeParams& p, long long row, float* sums) {
    const int D = p.head_dim, heads = p.q_heads + p.k_heads, lane = threadIdx.x % 32;
    for (int h = threadIdx.x / 32; h < heads; h += blockDim.x / 32) {
        const T* x = head_in<T>(p, row, h);
        float mean = 0.f;
        if (p.norm == 3) {
            mean = head_sum<T, VEC>(x, D, 0.f, false) / static_cast<float>(D);
            if (lane == 0) sums[RA_NORM_MEANS + h] = mean;
        }
        const float s = head_sum<T, VEC>(x, D, mean, true);
        if (lane == 0) sums[h] = s;
    }
}

// The second step of norm 2 (block-uniform; after the barrier that follows norm_sums).
__device__ __forceinline__ void norm_totals(const RopeParams& p, float* sums) {
    const int heads = p.q_heads + p.k_heads;
    if (threadIdx.x < 32) {
        float q = 0.f, k = 0.f;
        for (int h = threadIdx.x; h < heads; h += 32) (h < p.q_heads ? q : k) += sums[h];
#pragma unroll
        for (int o = 16; o > 0; o /= 2) {
            q += __shfl_xor_sync(0xffffffffu, q, o);
            k += __shfl_xor_sync(0xffffffffu, k, o);
        }
        if (threadIdx.x == 0) {
            sums[heads] = q;
            sums[heads + 1] = k;
        }
    }
    __syncthreads();
}

// 1 / RMS of head h's norm (its own, or its tensor's for norm 2).
__device__ __forceinline__ float norm_scale(const RopeParams& p, const float* sums, int h) {
    const bool is_q = h < p.q_heads;
    const int n = p.norm == 2 ? (is_q ? p.q_heads : p.k_heads) * p.head_dim : p.head_dim;
    const float s = p.norm == 2 ? sums[p.q_heads + p.k_heads + !is_q] : sums[h];
    return rsqrtf(s / static_cast<float>(n) + p.norm_eps);
}

// Head h's norm weights (component c at w[c]), or null for all ones: one vector for every
// head (norm 1), or one per head (norms 2 and 3).
__device__ __forceinline__ const float* norm_weight(const RopeParams& p, int h) {
    const bool is_q = h < p.q_heads;
    const float* w = is_q ? p.q_norm_w : p.k_norm_w;
    return w == nullptr ? w : w + (p.norm >= 2 ? (is_q ? h : h - p.q_heads) * p.head_dim : 0);
}

// What head h's components are centred on: its mean under norm 3, else 0.
__device__ __forceinline__ float norm_mean(const RopeParams& p, const float* sums, int h) {
    return p.norm == 3 ? sums[RA_NORM_MEANS + h] : 0.f;
}

// x[j] (component c0 + j) less m, times r and its weight (x - 0 is x: the RMS norms' m).
template <int N>
__device__ __forceinline__ void norm_apply(float (&x)[N], float r, const float* w, int c0, float m) {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = (x[j] - m) * (w == nullptr ? r : r * w[c0 + j]);
}

// Under the QK norm, components [from, D) of every head (rotary_dim onwards) are scaled too,
// in place or into the outputs: 16-byte accesses where vec and `from` falls on a chunk.
template <typename T>
__device__ void norm_rest(const RopeParams& p, long long src_row, long long dst_row, const float* sums, bool vec) {
    constexpr int PER = 16 / sizeof(T);
    const int D = p.head_dim, from = p.rope.rotary_dim, heads = p.q_heads + p.k_heads;
    const int width = vec && from % PER == 0 ? PER : 1;
    const int ch = (D - from) / width;
    for (int w = threadIdx.x; w < heads * ch; w += blockDim.x) {
        const int h = w / ch, c = from + (w % ch) * width;
        const T* src = head_in<T>(p, src_row, h) + c;
        T* dst = head_out<T>(p, dst_row, h) + c;
        const float r = norm_scale(p, sums, h), m = norm_mean(p, sums, h);
        const float* wt = norm_weight(p, h);
        if (width == PER) {
            float x[PER];
            load_f32<T, PER>(src, x);
            norm_apply(x, r, wt, c, m);
            store_f32<T, PER>(dst, x);
        } else {
            float x[1] = {to_f32(*src)};
            norm_apply(x, r, wt, c, m);
            *dst = from_f32<T>(x[0]);
        }
    }
}

// One token: Q row src_row of q_in and K row src_row of k_in, rotated to `pos` (after the QK
// norm when NORM: its own kernels, so the plain rotation keeps its registers), to row dst_row
// of q_out and k_out. VEC: the launcher picked the 16-byte variant, so every row starts on a
// 16-byte boundary.
template <typename T, bool INTERLEAVED, int P, bool NORM>
__device__ void rope_token(const RopeParams& p, long long src_row, long long dst_row, TokenPos pos) {
    constexpr bool VEC = (INTERLEAVED ? 2 * P : P) * sizeof(T) == 16;
    RA_STATIC_SMEM(float2, cs, [RA_MAX_ROT_PAIRS]);
    // Per head: its sum of squares, then (norm 2) the tensors' totals, then (norm 3) its mean.
    RA_STATIC_SMEM(float, sums, [2 * RA_MAX_NORM_HEADS + 2]);
    if (NORM) norm_sums<T, VEC>(p, src_row, sums);
    const int half = p.rope.rotary_dim / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 f = p.use_leak_freq ? pair_freq_leak(p.rope, i) : pair_freq(p.rope, i);
        cs[i] = pair_cs(pair_position(p, pos, i), f, p.rope.attention_factor);
    }
    __syncthreads();
    if (NORM && p.norm == 2) norm_totals(p, sums);

    const int D = p.head_dim;
    const int groups = half / P;
    const int heads = p.q_heads + p.k_heads;
    for (int w = threadIdx.x; w < heads * groups; w += blockDim.x) {
        const int h = w / groups, i0 = (w % groups) * P;
        // (Spelled out rather than head_in / head_out: ptxas gave the 16-bit v8 body 8 more
        // registers for those.)
        const bool is_q = h < p.q_heads;
        const int hh = is_q ? h : h - p.q_heads;
        // Q's input heads sit q_in_hstride apart under the norm (a gated query), else D.
        const T* src = static_cast<const T*>(is_q ? p.q_in : p.k_in) + src_row * (is_q ? p.q_in_stride : p.k_in_stride) +
                       hh * (NORM && is_q ? p.q_in_hstride : D);
        T* dst = static_cast<T*>(is_q ? p.q_out : p.k_out) + dst_row * (is_q ? p.q_out_stride : p.k_out_stride) + hh * D;
        // The norm's factor, applied to each component before it is rotated.
        const float r = NORM ? norm_scale(p, sums, h) : 1.f;
        const float m = NORM ? norm_mean(p, sums, h) : 0.f;
        const float* wt = NORM ? norm_weight(p, h) : nullptr;
        float x0[P], x1[P];
        if (INTERLEAVED) {
            float x[2 * P];
            load_f32<T, 2 * P>(src + 2 * i0, x);
            if (NORM) norm_apply(x, r, wt, 2 * i0, m);
#pragma unroll
            for (int j = 0; j < P; ++j) {
                rotate_pair(x[2 * j], x[2 * j + 1], cs[i0 + j].x, cs[i0 + j].y);
            }
            store_f32<T, 2 * P>(dst + 2 * i0, x);
        } else {
            load_f32<T, P>(src + i0, x0);
            load_f32<T, P>(src + i0 + half, x1);
            if (NORM) {
                norm_apply(x0, r, wt, i0, m);
                norm_apply(x1, r, wt, i0 + half, m);
            }
#pragma unroll
            for (int j = 0; j < P; ++j) rotate_pair(x0[j], x1[j], cs[i0 + j].x, cs[i0 + j].y);
            store_f32<T, P>(dst + i0, x0);
            store_f32<T, P>(dst + i0 + half, x1);
        }
    }

    // The pass-through components (rotary_dim..head_dim): scaled under the norm (in place
    // too); out of place, carried along.
    if (p.rope.rotary_dim < D) {
        const bool vec = VEC || p.block_table != nullptr;
        if (NORM) {
            norm_rest<T>(p, src_row, dst_row, sums, vec);
            return;
        }
        if (p.q_heads > 0 && p.q_out != p.q_in) {
            copy_heads(static_cast<const T*>(p.q_in) + src_row * p.q_in_stride, static_cast<T*>(p.q_out) + dst_row * p.q_out_stride,
                       p.q_heads, D, p.rope.rotary_dim, vec);
        }
        if (p.k_heads > 0 && p.k_out != p.k_in) {
            copy_heads(static_cast<const T*>(p.k_in) + src_row * p.k_in_stride, static_cast<T*>(p.k_out) + dst_row * p.k_out_stride,
                       p.k_heads, D, p.rope.rotary_dim, vec);
        }
    }
}

// Block t rotates token t. Gather (block_table set): block (x, b) takes keys x, x + gridDim.x,
// ... of sequence b, K rotated out of the paged cache and V copied beside it, to the sequence's
// rows of the packed workspace (RopeParams, gathered_span).
template <typename T, bool INTERLEAVED, int P, bool NORM>
__device__ void rope_body(const RopeParams& p) {
    if (NORM || p.block_table == nullptr) {  // (no gather normalises: the cache is)
        const int t = blockIdx.x;
        // A norm-only launch (rotary_dim 0) has no positions to read.
        rope_token<T, INTERLEAVED, P, NORM>(p, t, t, p.rope.rotary_dim == 0 ? TokenPos{0, 0, 0} : token_position(p, t));
        return;
    }
    const int b = blockIdx.y;
    const GatherSpan g = gathered_span(p.context_lens, b, p.max_pages * p.page_size, p.gather_rows);  // as the prefill finds it
    for (int j = blockIdx.x; j < g.len; j += gridDim.x) {
        const long long slot = paged_slot(p.block_table, b, j, p.page_size, p.max_pages, p.num_pages);
        const long long row = (long long)g.start + j;
        rope_token<T, INTERLEAVED, P, false>(p, slot, row, TokenPos{j, j, j});
        copy_heads(static_cast<const T*>(p.v_in) + slot * p.k_in_stride, static_cast<T*>(p.v_out) + row * p.k_out_stride,
                   p.k_heads, p.head_dim, 0, true);
        __syncthreads();  // every thread is done with this key's angles before the next key's
    }
}

}  // namespace ra

// rope_<layout>_v<P>_<dtype>: P pairs per thread. P = 1: any even alignment; 2: every row start
// 4-element aligned; the widest (P = 16 bytes / element for rotate_half, half that for
// interleaved pairs: 16-byte loads and stores either way) when every row start is 16-byte
// aligned and the rotary half a multiple of P (the launcher picks, src/cuda/rope.rs).
// rope_norm_*: the same with the QK norm first. Those take eight resident blocks (a
// 64-register budget): left to its own heuristic, ptxas held the interleaved f32 body at 40
// registers and spilled. The plain ones stay at ptxas's choice (30-40 registers).
#define RA_ROPE_PAIR(NAME, T, INTERLEAVED, P)                                                           \
    RA_KERNEL(128, rope_##NAME, ra::RopeParams) { ra::rope_body<T, INTERLEAVED, P, false>(p); }          \
    RA_KERNEL_MIN_BLOCKS(128, 8, rope_norm_##NAME, ra::RopeParams) { ra::rope_body<T, INTERLEAVED, P, true>(p); }
#define RA_ROPE(T, NAME)                   \
    RA_ROPE_PAIR(half_v1_##NAME, T, false, 1)  \
    RA_ROPE_PAIR(half_v2_##NAME, T, false, 2)  \
    RA_ROPE_PAIR(inter_v1_##NAME, T, true, 1)  \
    RA_ROPE_PAIR(inter_v2_##NAME, T, true, 2)
RA_FOR_EACH_DTYPE(RA_ROPE)
#define RA_ROPE_WIDE(T, NAME)                  \
    RA_ROPE_PAIR(half_v8_##NAME, T, false, 8)  \
    RA_ROPE_PAIR(inter_v4_##NAME, T, true, 4)
RA_ROPE_WIDE(__half, f16)
RA_ROPE_WIDE(__nv_bfloat16, bf16)
RA_ROPE_PAIR(half_v4_f32, float, false, 4)
