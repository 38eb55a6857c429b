// Pieces shared by the prefill and decode attention kernels: the parameter struct, tile
// copies and the online-softmax state (FlashAttention-2's, in the log2 domain).
#pragma once
#include "alibi.cuh"
#include "mask.cuh"
#include "tile.cuh"
#include "paged.cuh"
#include "params.cuh"

namespace ra {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// The end of a softmax row: the denominator of its O (0: no visible key, O = 0) and its
// natural-log LSE, from the row's sum l of exp2(s - m) over its visible keys and their max m
// (log2 units). With `sink` (the row's result is final and sinks are on, params.cuh SinkArgs)
// head h's learned sink joins the denominator; a split's partial leaves it to the combine.
// Without it the values are exactly l and (m + log2 l)·ln 2, as before sinks existed. A row
// with no visible key gets LSE -inf, or the sink's logit.
struct RowEnd {
    float den, lse;
};
__device__ __forceinline__ RowEnd row_end(float l, float m, const SinkArgs& sk, int h, bool final_row) {
    if (!(final_row && sk.on)) return l > 0.f ? RowEnd{l, (m + log2f(l)) * LN2} : RowEnd{0.f, -INFINITY};
    if (!(l > 0.f)) return RowEnd{0.f, sk.logit[h]};
    const float s = sk.logit[h] * LOG2E;
    const float top = fmaxf(m, s);  // the LSE stays finite however far the sink is from the scores
    return RowEnd{l + exp2f(s - m), (top + log2f(l * exp2f(m - top) + exp2f(s - top))) * LN2};
}


// A sequence's rows, clamped to the totals the host validated, so that corrupt offsets can
// never index outside the buffers.
// q_pos0 / k_pos0: positions of the sequence's first query and key (seq_starts, or the
// bottom-right-aligned default seqlen_k - seqlen_q and 0).
struct SeqBounds {
    int q_start, seqlen_q, k_start, seqlen_k, q_pos0, k_pos0;
};
__device__ __forceinline__ SeqBounds seq_bounds(const AttnParams& p, int b) {
    SeqBounds s;
    s.q_start = imin(imax(p.cu_seqlens_q[b], 0), p.total_q);
    s.seqlen_q = imin(imax(p.cu_seqlens_q[b + 1], s.q_start), p.total_q) - s.q_start;
    if (p.context_lens) {  // paged keys: the context length, clamped to the keys there are
        const int table_rows = p.max_pages * p.page_size;
        if (p.block_table) {  // read through the block table
            s.k_start = 0;
            s.seqlen_k = imin(imax(p.context_lens[b], 0), table_rows);
        } else {  // gathered from it by the rope kernel, packed (the paged prefill's gathered path)
            const GatherSpan g = gathered_span(p.context_lens, b, table_rows, p.gather_rows);
            s.k_start = g.start;
            s.seqlen_k = g.len;
        }
    } else {
        s.k_start = imin(imax(p.cu_seqlens_k[b], 0), p.total_k);
        s.seqlen_k = imin(imax(p.cu_seqlens_k[b + 1], s.k_start), p.total_k) - s.k_start;
    }
    s.q_pos0 = p.seq_starts ? p.seq_starts[2 * b] : s.seqlen_k - s.seqlen_q;
    s.k_pos0 = p.seq_starts ? p.seq_starts[2 * b + 1] : 0;
    return s;
}

// ROWS x D tile into shared memory (row pitch LD) with 16-byte cp.async by the block's THREADS
// threads, row r read from row_ptr(r); rows >= valid are zero-filled without touching global
// memory. Not unrolled: the wide prefill issues K copies while O and P fill the registers, and
// unrolled copies keep a precomputed address per iteration (ptxas then spills).
template <typename T, int D, int LD, int ROWS, int THREADS, typename RowPtr>
__device__ __forceinline__ void copy_rows_async(T* s, int valid, RowPtr row_ptr) {
    constexpr int CH = D * sizeof(T) / 16;  // 16-byte chunks per row
    constexpr int PER = 16 / sizeof(T);
#pragma unroll 1
    for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
        const int row = c / CH, col = (c % CH) * PER;
        const bool ok = row < valid;
        cp_async_16(s + row * LD + col, row_ptr(ok ? row : 0) + col, ok);
    }
}

// Score of query position i and key position j, in log2 units, before masking: the near or
// far dot product (ReRoPE), scaled (and soft-capped), plus the ALiBi bias (slope_log2 =
// slope·log2(e); 0 = none).
__device__ __forceinline__ float score_log2(const RopeArgs& r, float scale_log2, float near, float far, int i, int j,
                                            float slope_log2, float cap_in, float cap_out) {
    const bool use_far = r.relative != REL_NONE && r.rotary_dim > 0 && i - j >= r.window;
    float s = capped(use_far ? far : near, scale_log2, cap_in, cap_out);
    if (slope_log2 != 0.f) s += alibi_bias(slope_log2, i, j);
    return s;
}

// The output gate (GateArgs) applied in place to rows [tok0, tok0 + rows) of head h of O (rows
// o_row_stride apart), by the whole block, after a barrier that made those rows visible.
template <typename T, int D>
__device__ __forceinline__ void gate_rows(const GateArgs& g, T* out, long long o_row_stride, long long tok0, int rows, int h) {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        const int r = e / D, c = e % D;
        T* o = out + (tok0 + r) * o_row_stride + (long long)h * D + c;
        *o = from_f32<T>(gated<T>(g, tok0 + r, h, c, to_f32(*o)));
    }
}

}  // namespace ra
