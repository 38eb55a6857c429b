// Exact combination of attention results over disjoint key sets (SPEC §5): with weights
// exp(lse_i - lse), lse = log Σ exp(lse_i). The split-K combine of decode, and the building block
// for cascade (shared-prefix) and ring (sequence-parallel) attention. A side with lse = -inf
// contributes nothing; all -inf gives O = 0, lse = -inf.
#include "common.cuh"
#include "params.cuh"

namespace ra {


// One block per (token, head), threads over components.
template <typename T>
__device__ void merge_body(const MergeParams& p) {
    const int tok = blockIdx.x, h = blockIdx.y;
    const long long li = (long long)h * p.tokens + tok;
    const float a = p.lse1[li], b = p.lse2[li];
    const float m = fmaxf(a, b);
    const long long base = ((long long)tok * p.heads + h) * p.head_dim;
    float wa = 0.f, wb = 0.f, lse = -INFINITY;
    if (m != -INFINITY) {
        const float ea = expf(a - m), eb = expf(b - m);
        lse = m + logf(ea + eb);
        wa = ea / (ea + eb);
        wb = eb / (ea + eb);
    }
    for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
        const float x = wa == 0.f ? 0.f : wa * to_f32(static_cast<const T*>(p.o1)[base + c]);
        const float y = wb == 0.f ? 0.f : wb * to_f32(static_cast<const T*>(p.o2)[base + c]);
        static_cast<T*>(p.out)[base + c] = from_f32<T>(gated<T>(p.gate, tok, h, c, x + y));
    }
    if (threadIdx.x == 0) p.lse_out[li] = lse;
}


// The splits' partials (each without the learned sink) into the final row, the sink (if any)
// joining the denominator once, as a split with no value: O = Σ_s e^lse_s O_s / (Σ_s e^lse_s + e^sink).
template <typename T>
__device__ void combine_splits_body(const SplitsParams& p) {
    const int tok = blockIdx.x, h = blockIdx.y;
    const float sink = p.sink.on ? p.sink.logit[h] : -INFINITY;
    float m = sink;
    for (int s = 0; s < p.splits; ++s) m = fmaxf(m, p.part_lse[((long long)s * p.heads + h) * p.tokens + tok]);
    float total = 0.f;
    if (m != -INFINITY) {
        for (int s = 0; s < p.splits; ++s) total += expf(p.part_lse[((long long)s * p.heads + h) * p.tokens + tok] - m);
        if (p.sink.on) total += expf(sink - m);
    }
    T* orow = static_cast<T*>(p.out) + (long long)tok * p.o_row_stride + (long long)h * p.head_dim;
    // One division per row, outside the loops: with the gate's state live across the IEEE
    // division's slow-path call inside them, the 16-bit builds spilled on sm_80.
    const float inv = m != -INFINITY ? 1.f / total : 0.f;
    for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
        float acc = 0.f;
        if (m != -INFINITY) {
            for (int s = 0; s < p.splits; ++s) {
                const float w = expf(p.part_lse[((long long)s * p.heads + h) * p.tokens + tok] - m) * inv;
                if (w > 0.f) acc = fmaf(w, p.part_out[(((long long)s * p.tokens + tok) * p.heads + h) * p.head_dim + c], acc);
            }
        }
        orow[c] = from_f32<T>(gated<T>(p.gate, tok, h, c, acc));
    }
    if (threadIdx.x == 0) p.lse[(long long)h * p.tokens + tok] = m == -INFINITY ? -INFINITY : m + logf(total);
}

}  // namespace ra

#define RA_MERGE(T, NAME)                                                                                           \
    RA_KERNEL(128, merge_##NAME, ra::MergeParams) { ra::merge_body<T>(p); } \
    RA_KERNEL(128, combine_splits_##NAME, ra::SplitsParams) {             \
        ra::combine_splits_body<T>(p);                                                                              \
    }
RA_FOR_EACH_DTYPE(RA_MERGE)
