// The standalone rotation kernel: rotates Q and K (in place, or out of place into a workspace)
// in one launch. Tensors are [tokens, heads, head_dim] with a row stride between tokens, so the
// Q and K parts of a packed QKV projection are rotated where they lie. The same kernel gathers
// a paged cache's keys (rotated) and values into contiguous rows, for the paged prefill's
// gathered path (src/cuda/paged_prefill.rs).
//
// One block per token: the block computes the token's cos/sin once per pair (shared by all
// heads), then each thread rotates P consecutive pairs of one head with vector loads. The
// kernel is memory-bound; pass-through components are not touched when rotating in place.
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

// One token: Q row src_row of q_in and K row src_row of k_in, rotated to `pos`, to row dst_row
// of q_out and k_out. VEC: the launcher picked the 16-byte variant, so every row starts on a
// 16-byte boundary.
template <typename T, bool INTERLEAVED, int P>
__device__ void rope_token(const RopeParams& p, long long src_row, long long dst_row, TokenPos pos) {
    constexpr bool VEC = (INTERLEAVED ? 2 * P : P) * sizeof(T) == 16;
    RA_STATIC_SMEM(float2, cs, [RA_MAX_PAIRS]);
    const int half = p.rope.rotary_dim / 2;
    const float2* freq = p.use_leak_freq ? p.rope.freq_leak : p.rope.freq;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        cs[i] = cs_scaled(angle_turns(pair_position(p, pos, i), freq[i]), p.rope.attention_factor);
    }
    __syncthreads();

    const int D = p.head_dim;
    const int groups = half / P;
    const int heads = p.q_heads + p.k_heads;
    for (int w = threadIdx.x; w < heads * groups; w += blockDim.x) {
        const int h = w / groups, i0 = (w % groups) * P;
        const bool is_q = h < p.q_heads;
        const int hh = is_q ? h : h - p.q_heads;
        const T* src = static_cast<const T*>(is_q ? p.q_in : p.k_in) + src_row * (is_q ? p.q_in_stride : p.k_in_stride) + hh * D;
        T* dst = static_cast<T*>(is_q ? p.q_out : p.k_out) + dst_row * (is_q ? p.q_out_stride : p.k_out_stride) + hh * D;
        float x0[P], x1[P];
        if (INTERLEAVED) {
            float x[2 * P];
            load_f32<T, 2 * P>(src + 2 * i0, x);
#pragma unroll
            for (int j = 0; j < P; ++j) {
                rotate_pair(x[2 * j], x[2 * j + 1], cs[i0 + j].x, cs[i0 + j].y);
            }
            store_f32<T, 2 * P>(dst + 2 * i0, x);
        } else {
            load_f32<T, P>(src + i0, x0);
            load_f32<T, P>(src + i0 + half, x1);
#pragma unroll
            for (int j = 0; j < P; ++j) rotate_pair(x0[j], x1[j], cs[i0 + j].x, cs[i0 + j].y);
            store_f32<T, P>(dst + i0, x0);
            store_f32<T, P>(dst + i0 + half, x1);
        }
    }

    // Out of place: carry the pass-through components (rotary_dim..head_dim) along.
    if (p.rope.rotary_dim < D) {
        const bool vec = VEC || p.block_table != nullptr;
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
template <typename T, bool INTERLEAVED, int P>
__device__ void rope_body(const RopeParams& p) {
    if (p.block_table == nullptr) {
        const int t = blockIdx.x;
        rope_token<T, INTERLEAVED, P>(p, t, t, token_position(p, t));
        return;
    }
    const int b = blockIdx.y;
    const GatherSpan g = gathered_span(p.context_lens, b, p.max_pages * p.page_size, p.gather_rows);  // as the prefill finds it
    for (int j = blockIdx.x; j < g.len; j += gridDim.x) {
        const long long slot = paged_slot(p.block_table, b, j, p.page_size, p.max_pages, p.num_pages);
        const long long row = (long long)g.start + j;
        rope_token<T, INTERLEAVED, P>(p, slot, row, TokenPos{j, j, j});
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
#define RA_ROPE(T, NAME)                                                                                    \
    RA_KERNEL(128, rope_half_v1_##NAME, ra::RopeParams) { ra::rope_body<T, false, 1>(p); } \
    RA_KERNEL(128, rope_half_v2_##NAME, ra::RopeParams) { ra::rope_body<T, false, 2>(p); } \
    RA_KERNEL(128, rope_inter_v1_##NAME, ra::RopeParams) { ra::rope_body<T, true, 1>(p); } \
    RA_KERNEL(128, rope_inter_v2_##NAME, ra::RopeParams) { ra::rope_body<T, true, 2>(p); }
RA_FOR_EACH_DTYPE(RA_ROPE)
#define RA_ROPE_WIDE(T, NAME)                                                                           \
    RA_KERNEL(128, rope_half_v8_##NAME, ra::RopeParams) { ra::rope_body<T, false, 8>(p); } \
    RA_KERNEL(128, rope_inter_v4_##NAME, ra::RopeParams) { ra::rope_body<T, true, 4>(p); }
RA_ROPE_WIDE(__half, f16)
RA_ROPE_WIDE(__nv_bfloat16, bf16)
RA_KERNEL(128, rope_half_v4_f32, ra::RopeParams) { ra::rope_body<float, false, 4>(p); }
