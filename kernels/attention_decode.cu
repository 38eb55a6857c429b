// Decode attention over a paged KV cache, split along the keys (flash-decoding), and the
// kernel that appends new K/V into the cache.
//
// The cache holds *unrotated* keys: [num_pages, page_size, Hkv, D] for K and for V, pages
// picked per sequence through a caller-owned block table. Keys are rotated on the fly at
// their cached positions, so dynamic-NTK frequencies or ReRoPE stay exact at any length.
// Sequence b has context_lens[b] cached keys, the last `queries` of them the new tokens
// (1..=16, speculative decoding): query qi sits at position context_len - queries + qi.
//
// A block takes one split of the keys, one KV head and up to 16 (query head, query) rows of
// its GQA group, so each K/V tile is read once for the whole group. The tile is rotated once in
// shared memory; each warp scores its 4 rows against it (lane = key) and accumulates O with
// lane = component. Splits > 1 write f32 partials that merge.cu combines.
#include "attention.cuh"

namespace ra {


constexpr int DEC_WARPS = 4, DEC_RPW = 4, DEC_ROWS = DEC_WARPS * DEC_RPW, DEC_MAXC = 8;

// Keys per tile: 32 up to head_dim 128, 16 for 256 (K, far K and V tiles stay ~50 KB in f32).
__host__ __device__ inline int decode_tile_keys(int d) { return d <= 128 ? 32 : 16; }

// Address of key j's head kvh in a paged cache; block-table entries are clamped into the pool.
template <typename T>
__device__ __forceinline__ const T* paged_row(const DecodeParams& p, const T* cache, int b, int j, int kvh) {
    return paged_key(cache, p.block_table, b, j, kvh, p.page_size, p.max_pages, p.num_pages, p.kv_heads, p.head_dim);
}

template <typename T>
__device__ void decode_body(const DecodeParams& p) {
    RA_DYNAMIC_SMEM(float, dsm);
    const int D = p.head_dim, BN = decode_tile_keys(D), LDK = D + 1;
    float* Ks = dsm;
    float* Kf = Ks + BN * LDK;
    float* Vs = Kf + BN * LDK;
    float* Qs = Vs + BN * LDK;     // [DEC_ROWS][D], rotated to the query positions
    float* Qf = Qs + DEC_ROWS * D;  // far copies (ReRoPE)
    // Keys are rotated by composition (tile.cuh, rotate_tile_composed): the offset table once
    // per block, the bases once per tile. 3·BN·(D+1) and 2·16·D floats are even counts: the
    // tables start 8-byte aligned.
    float2* Dcs = reinterpret_cast<float2*>(Qf + DEC_ROWS * D);  // [ROT_SUB][D/2]: offsets
    float2* Bcs = Dcs + ROT_SUB * (D / 2);                       // [BN/ROT_SUB][D/2]: the tile's bases

    const int split = blockIdx.x, b = blockIdx.z;
    const int group = p.q_heads / p.kv_heads, rows_total = group * p.queries;
    const int row_blocks = (rows_total + DEC_ROWS - 1) / DEC_ROWS;
    const int kvh = blockIdx.y / row_blocks, r0 = (blockIdx.y % row_blocks) * DEC_ROWS;
    const int ctx = imin(imax(p.context_lens[b], 0), p.max_pages * p.page_size);
    const int k_begin = split * p.keys_per_split, k_end = imin(ctx, k_begin + p.keys_per_split);
    const bool rope = p.rope.rotary_dim > 0;
    const bool rel = rope && p.rope.relative != REL_NONE, leaky = p.rope.relative == REL_LEAKY;
    const int half = p.rope.rotary_dim / 2;
    const MaskArgs mask{p.causal, p.window, p.sinks};
    const int tokens = p.batch * p.queries;

    // Row r of this block: query head kvh * group + (r0 + r) / queries, query (r0 + r) % queries.
    auto row_head = [&](int r) { return kvh * group + (r0 + r) / p.queries; };
    auto row_query = [&](int r) { return (r0 + r) % p.queries; };
    auto row_pos = [&](int r) { return ctx - p.queries + row_query(r); };
    const int rows = imin(DEC_ROWS, rows_total - r0);

    for (int e = threadIdx.x; e < DEC_ROWS * D; e += blockDim.x) {
        const int r = e / D, c = e % D;
        float x = 0.f;
        if (r < rows) {
            const T* qrow = static_cast<const T*>(p.q) + (long long)(b * p.queries + row_query(r)) * p.q_row_stride +
                            (long long)row_head(r) * D;
            x = to_f32(qrow[c]);
        }
        Qs[e] = x;
        if (rel) Qf[e] = x;
    }
    __syncthreads();
    if (rope) {
        // Read after the tile loop's first barrier.
        fill_rotation_offsets(Dcs, p.rope);
        for (int e = threadIdx.x; e < DEC_ROWS * half; e += blockDim.x) {
            const int r = e / half, pr = e % half;
            int ia, ib;
            pair_index(p.rope.interleaved, p.rope.rotary_dim, pr, ia, ib);
            float2 cs = mode_cs(p.rope, ROT_POS, row_pos(r), pr);
            rotate_pair(Qs[r * D + ia], Qs[r * D + ib], cs.x, cs.y);
            if (rel) {
                cs = mode_cs(p.rope, leaky ? ROT_Q_LEAKY : ROT_Q_RE, row_pos(r), pr);
                rotate_pair(Qf[r * D + ia], Qf[r * D + ib], cs.x, cs.y);
            }
        }
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float slope[DEC_RPW], mx[DEC_RPW], sum[DEC_RPW], o[DEC_RPW][DEC_MAXC];
#pragma unroll
    for (int x = 0; x < DEC_RPW; ++x) {
        const int r = warp * DEC_RPW + x;
        slope[x] = (p.alibi_total_heads > 0 && r < rows) ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + row_head(r)) : 0.f;
        mx[x] = -INFINITY;
        sum[x] = 0.f;
#pragma unroll
        for (int y = 0; y < DEC_MAXC; ++y) o[x][y] = 0.f;
    }
    const T* kc = static_cast<const T*>(p.k_cache);
    const T* vc = static_cast<const T*>(p.v_cache);

    for (int j0 = k_begin; j0 < k_end; j0 += BN) {
        const int vk = imin(BN, k_end - j0);
        __syncthreads();  // the previous tile is consumed (and Q is rotated, on the first pass)
        // 16-byte loads: a cache row (one key, one head) is D contiguous elements, 16-byte
        // aligned because D is a multiple of 8 and the pool is.
        constexpr int VEC = 16 / sizeof(T);
        const int row_chunks = D / VEC;
        for (int e = threadIdx.x; e < BN * row_chunks; e += blockDim.x) {
            const int key = e / row_chunks, c = (e % row_chunks) * VEC;
            float kx[VEC], vx[VEC];
            if (key < vk) {
                load_f32<T, VEC>(paged_row(p, kc, b, j0 + key, kvh) + c, kx);
                load_f32<T, VEC>(paged_row(p, vc, b, j0 + key, kvh) + c, vx);
            } else {
#pragma unroll
                for (int x = 0; x < VEC; ++x) kx[x] = vx[x] = 0.f;
            }
#pragma unroll
            for (int x = 0; x < VEC; ++x) {
                Ks[key * LDK + c + x] = kx[x];
                if (rel) Kf[key * LDK + c + x] = kx[x];
                Vs[key * LDK + c + x] = vx[x];
            }
        }
        if (rope) fill_rotation_bases(Bcs, p.rope, j0, BN);
        __syncthreads();
        if (rope) {
            rotate_tile_composed(Ks, LDK, vk, p.rope, Dcs, Bcs);
            if (leaky) load_rotated_tile(Kf, LDK, Kf, LDK, BN, vk, D, p.rope, ROT_K_LEAKY, j0);
            __syncthreads();
        }
#pragma unroll
        for (int x = 0; x < DEC_RPW; ++x) {
            const int r = warp * DEC_RPW + x;
            if (r >= rows) continue;  // warp-uniform
            const int i = row_pos(r), j = j0 + lane;
            float s = -INFINITY;
            if (lane < vk && visible(mask, i, j)) {
                float dn = 0.f, df = 0.f;
                for (int c = 0; c < D; ++c) {
                    dn = fmaf(Qs[r * D + c], Ks[lane * LDK + c], dn);
                    if (rel) df = fmaf(Qf[r * D + c], Kf[lane * LDK + c], df);
                }
                s = score_log2(p.rope, p.scale_log2, dn, df, i, j, slope[x]);
            }
            float tmax = s;
#pragma unroll
            for (int off = 16; off > 0; off /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
            const float m_new = fmaxf(mx[x], tmax);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(mx[x] - m_use);
            const float w = exp2f(s - m_use);
            float tsum = w;
#pragma unroll
            for (int off = 16; off > 0; off /= 2) tsum += __shfl_xor_sync(0xffffffffu, tsum, off);
            sum[x] = sum[x] * alpha + tsum;
            mx[x] = m_new;
#pragma unroll
            for (int y = 0; y < DEC_MAXC; ++y) o[x][y] *= alpha;
            for (int key = 0; key < vk; ++key) {
                const float wk = __shfl_sync(0xffffffffu, w, key);
#pragma unroll
                for (int y = 0; y < DEC_MAXC; ++y) {
                    const int c = lane + 32 * y;
                    if (c < D) o[x][y] = fmaf(wk, Vs[key * LDK + c], o[x][y]);
                }
            }
        }
    }

    // Write this split's result: final (one split) or f32 partial for merge.cu.
#pragma unroll
    for (int x = 0; x < DEC_RPW; ++x) {
        const int r = warp * DEC_RPW + x;
        if (r >= rows) continue;
        const int h = row_head(r), tok = b * p.queries + row_query(r);
        const float inv = sum[x] > 0.f ? 1.f / sum[x] : 0.f;
        const float m_use = mx[x] == -INFINITY ? 0.f : mx[x];
        const float lse = sum[x] > 0.f ? (m_use + log2f(sum[x])) * LN2 : -INFINITY;
        if (p.splits == 1) {
            T* orow = static_cast<T*>(p.out) + (long long)tok * p.o_row_stride + (long long)h * D;
#pragma unroll
            for (int y = 0; y < DEC_MAXC; ++y) {
                const int c = lane + 32 * y;
                if (c < D) orow[c] = from_f32<T>(o[x][y] * inv);
            }
            if (lane == 0) p.lse[(long long)h * tokens + tok] = lse;
        } else {
            float* orow = p.part_out + (((long long)split * tokens + tok) * p.q_heads + h) * D;
#pragma unroll
            for (int y = 0; y < DEC_MAXC; ++y) {
                const int c = lane + 32 * y;
                if (c < D) orow[c] = o[x][y] * inv;
            }
            if (lane == 0) p.part_lse[((long long)split * p.q_heads + h) * tokens + tok] = lse;
        }
    }
}


template <typename T>
__device__ void append_body(const AppendParams& p) {
    const int t = blockIdx.x;
    const int slot = p.slots[t];
    if (slot < 0 || slot >= p.num_slots) return;
    const int row = p.kv_heads * p.head_dim;
    const T* k = static_cast<const T*>(p.k) + (long long)t * p.k_row_stride;
    const T* v = static_cast<const T*>(p.v) + (long long)t * p.v_row_stride;
    T* kd = static_cast<T*>(p.k_cache) + (long long)slot * row;
    T* vd = static_cast<T*>(p.v_cache) + (long long)slot * row;
    for (int c = threadIdx.x; c < row; c += blockDim.x) {
        kd[c] = k[c];
        vd[c] = v[c];
    }
}

}  // namespace ra

#define RA_DECODE(T, NAME)                                                                                    \
    RA_KERNEL(ra::DEC_WARPS * 32, attention_decode_##NAME, ra::DecodeParams) { \
        ra::decode_body<T>(p);                                                                                \
    }                                                                                                         \
    RA_KERNEL(128, paged_append_##NAME, ra::AppendParams) { ra::append_body<T>(p); }
RA_FOR_EACH_DTYPE(RA_DECODE)
