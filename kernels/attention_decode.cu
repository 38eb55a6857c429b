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
// its GQA group, so each K/V tile is read once for the whole group. Tiles stream through
// shared memory with cp.async, one tile ahead: K of tile n+1 lands while tile n is scored and
// accumulated, V of tile n+1 while tile n+1's keys are rotated and scored. Each K tile is
// rotated once, into f32, as it leaves its staging buffer; each warp scores its 4 rows
// against it (lane = key, the 4 rows in registers, so a key element is read once per warp)
// and accumulates O from the staged V (lane = a pair of components, each V pair read once per
// warp for its 4 rows). Tiles no row can see (sliding window) are skipped, never read.
// Splits > 1 write f32 partials that merge.cu combines.
#include "attention.cuh"

namespace ra {

constexpr int DEC_WARPS = 4, DEC_RPW = 4, DEC_ROWS = DEC_WARPS * DEC_RPW, DEC_MAXP = 4;  // pairs per lane: d <= 256

// Keys per tile: 32 up to head_dim 128, 16 at 256 (8 in f32, whose staged tiles are twice as
// large: with ReRoPE's far copies 16 would pass the 99 KB of an sm_86/89 block).
__host__ __device__ inline int decode_tile_keys(int d, int elem_bytes) { return d <= 128 ? 32 : elem_bytes == 2 ? 16 : 8; }

// Address of key j's head kvh in a paged cache; block-table entries are clamped into the pool.
template <typename T>
__device__ __forceinline__ const T* paged_row(const DecodeParams& p, const T* cache, int b, int j, int kvh) {
    return paged_key(cache, p.block_table, b, j, kvh, p.page_size, p.max_pages, p.num_pages, p.kv_heads, p.head_dim);
}

// acc[x] += q[x] · k for a warp's 4 rows: q is one component of 4 consecutive rows of the
// transposed Q tile (one 16-byte shared-memory load).
__device__ __forceinline__ void fma_rows4(float (&acc)[DEC_RPW], const float* q, float k) {
    RA_VECTOR_ACCESS(q, 16);
    const float4 v = *reinterpret_cast<const float4*>(q);
    acc[0] = fmaf(v.x, k, acc[0]);
    acc[1] = fmaf(v.y, k, acc[1]);
    acc[2] = fmaf(v.z, k, acc[2]);
    acc[3] = fmaf(v.w, k, acc[3]);
}

template <typename T>
__device__ void decode_body(const DecodeParams& p) {
    const int D = p.head_dim, BN = decode_tile_keys(D, sizeof(T)), LDK = D + 1;
    const bool rope = p.rope.rotary_dim > 0;
    const bool rel = rope && p.rope.relative != REL_NONE, leaky = p.rope.relative == REL_LEAKY;
    // Shared memory (src/cuda/decode.rs, decode_smem_bytes, sizes it): the staged K and V tiles
    // as cached (T, pitch D, 16-byte rows), Q transposed [D][16] in f32 so a warp's 4 rows of one
    // component are one 16-byte load, the rotated K tile in f32 (pitch D + 1: lane = key reads
    // conflict-free), then with ReRoPE the far Q and K; last the composed-rotation tables
    // (tile.cuh). Every piece is a multiple of 16 bytes.
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* Kst = reinterpret_cast<T*>(smem_raw);
    T* Vst = Kst + BN * D;
    float* Qt = reinterpret_cast<float*>(Vst + BN * D);
    float* Ks = Qt + D * DEC_ROWS;
    float* Qft = Ks + BN * LDK;
    float* Kf = Qft + D * DEC_ROWS;
    float2* Dcs = reinterpret_cast<float2*>(rel ? Kf + BN * LDK : Qft);  // [ROT_SUB][D/2]: offsets
    float2* Bcs = Dcs + ROT_SUB * (D / 2);                               // [BN/ROT_SUB][D/2]: the tile's bases

    const int split = blockIdx.x, b = blockIdx.z;
    const int group = p.q_heads / p.kv_heads, rows_total = group * p.queries;
    const int row_blocks = (rows_total + DEC_ROWS - 1) / DEC_ROWS;
    const int kvh = blockIdx.y / row_blocks, r0 = (blockIdx.y % row_blocks) * DEC_ROWS;
    const int ctx = imin(imax(p.context_lens[b], 0), p.max_pages * p.page_size);
    // With a sliding window the splits share out the keys some query can see, [lo, ctx) (the
    // host sized keys_per_split for window + queries - 1 of them), not the whole context: a
    // 32k context under a 4k window keeps every split busy. Sinks before lo belong to split 0,
    // whose tile loop skips the hidden keys between them and lo.
    const int lo = p.window > 0 ? imax(0, ctx - p.queries - p.window + 1) : 0;
    const int k_begin = split == 0 && p.sinks > 0 ? 0 : lo + split * p.keys_per_split;
    const int k_end = imin(ctx, lo + (split + 1) * p.keys_per_split);
    const int half = p.rope.rotary_dim / 2;
    const MaskArgs mask{p.causal, p.window, p.sinks};
    const int tokens = p.batch * p.queries;

    // Row r of this block: query head kvh * group + (r0 + r) / queries, query (r0 + r) % queries.
    auto row_head = [&](int r) { return kvh * group + (r0 + r) / p.queries; };
    auto row_query = [&](int r) { return (r0 + r) % p.queries; };
    auto row_pos = [&](int r) { return ctx - p.queries + row_query(r); };
    const int rows = imin(DEC_ROWS, rows_total - r0);

    // The next tile at or after key j that some query of the sequence sees (whole-tile skipping).
    auto next_tile = [&](int j) {
        while (j < k_end && !tile_visible(mask, ctx - p.queries, ctx, j, imin(j + BN, k_end))) j += BN;
        return j;
    };
    const T* kc = static_cast<const T*>(p.k_cache);
    const T* vc = static_cast<const T*>(p.v_cache);
    // Stage BN cache rows from key j0 (rows past k_end zero-filled, no global read) as one group.
    auto stage = [&](T* dst, const T* cache, int j0) {
        constexpr int VEC = 16 / sizeof(T);
        const int chunks = D / VEC, vk = imin(BN, k_end - j0);
        for (int e = threadIdx.x; e < BN * chunks; e += blockDim.x) {
            const int key = e / chunks, c = (e % chunks) * VEC;
            const bool ok = key < vk;
            cp_async_16(dst + key * D + c, paged_row(p, cache, b, j0 + (ok ? key : 0), kvh) + c, ok);
        }
        cp_async_commit();
    };

    int j0 = next_tile(k_begin);
    if (j0 < k_end) {
        stage(Kst, kc, j0);
        stage(Vst, vc, j0);
    }
    // Q (and its far copy), rotated to the rows' positions, while the first tile lands.
    for (int e = threadIdx.x; e < DEC_ROWS * D; e += blockDim.x) {
        const int r = e / D, c = e % D;
        float x = 0.f;
        if (r < rows) {
            const T* qrow = static_cast<const T*>(p.q) + (long long)(b * p.queries + row_query(r)) * p.q_row_stride +
                            (long long)row_head(r) * D;
            x = to_f32(qrow[c]);
        }
        Qt[c * DEC_ROWS + r] = x;
        if (rel) Qft[c * DEC_ROWS + r] = x;
    }
    if (rope) fill_rotation_offsets(Dcs, p.rope);  // read after the tile loop's first barrier
    __syncthreads();
    if (rope) {
        for (int e = threadIdx.x; e < DEC_ROWS * half; e += blockDim.x) {
            const int r = e / half, pr = e % half;
            int ia, ib;
            pair_index(p.rope.interleaved, p.rope.rotary_dim, pr, ia, ib);
            float2 cs = mode_cs(p.rope, ROT_POS, row_pos(r), pr);
            rotate_pair(Qt[ia * DEC_ROWS + r], Qt[ib * DEC_ROWS + r], cs.x, cs.y);
            if (rel) {
                cs = mode_cs(p.rope, leaky ? ROT_Q_LEAKY : ROT_Q_RE, row_pos(r), pr);
                rotate_pair(Qft[ia * DEC_ROWS + r], Qft[ib * DEC_ROWS + r], cs.x, cs.y);
            }
        }
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bool warp_has_rows = warp * DEC_RPW < rows;  // warp-uniform
    float slope[DEC_RPW], mx[DEC_RPW], sum[DEC_RPW], o[DEC_RPW][2 * DEC_MAXP];
#pragma unroll
    for (int x = 0; x < DEC_RPW; ++x) {
        const int r = warp * DEC_RPW + x;
        slope[x] = (p.alibi_total_heads > 0 && r < rows) ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + row_head(r)) : 0.f;
        mx[x] = -INFINITY;
        sum[x] = 0.f;
#pragma unroll
        for (int y = 0; y < 2 * DEC_MAXP; ++y) o[x][y] = 0.f;
    }

    while (j0 < k_end) {
        const int vk = imin(BN, k_end - j0);
        // Every thread is past the previous tile's rotation (a barrier ago): the bases are free.
        if (rope) fill_rotation_bases(Bcs, p.rope, j0, BN);
        cp_async_wait<1>();  // K_n landed (V_n, the newest group, may still be in flight)
        __syncthreads();     // ... for every thread; the previous tile's scores are done with Ks
        // Staged K -> f32, rotated to the keys' positions (by composition); the far copy raw
        // (ReRoPE) or rotated to j / k (Leaky). Rows past vk are zeros from the copy.
        for (int e = threadIdx.x; e < BN * (D / 2); e += blockDim.x) {
            const int row = e / (D / 2), pr = e % (D / 2);
            int ia, ib;
            if (pr < half) pair_index(p.rope.interleaved, p.rope.rotary_dim, pr, ia, ib);
            else ia = half + pr, ib = ia + (D - 2 * half) / 2;  // pass-through: D - rotary_dim components, in two halves
            float x0 = to_f32(Kst[row * D + ia]), x1 = to_f32(Kst[row * D + ib]);
            float f0 = x0, f1 = x1;
            if (pr < half && row < vk) {
                const float2 cs = composed_cs(Dcs, Bcs, row, pr, half);
                rotate_pair(x0, x1, cs.x, cs.y);
                if (leaky) {
                    const float2 cf = mode_cs(p.rope, ROT_K_LEAKY, j0 + row, pr);
                    rotate_pair(f0, f1, cf.x, cf.y);
                }
            }
            Ks[row * LDK + ia] = x0;
            Ks[row * LDK + ib] = x1;
            if (rel) {
                Kf[row * LDK + ia] = f0;
                Kf[row * LDK + ib] = f1;
            }
        }
        __syncthreads();  // Ks ready; K staging free
        const int next = next_tile(j0 + BN);
        if (next < k_end) stage(Kst, kc, next);  // lands while this tile is scored and accumulated

        // Scores: lane = key, the warp's 4 rows at once.
        float s[DEC_RPW], w[DEC_RPW];
        if (warp_has_rows) {
            float dn[DEC_RPW] = {0.f, 0.f, 0.f, 0.f}, df[DEC_RPW] = {0.f, 0.f, 0.f, 0.f};
            const int kr = lane < vk ? lane : 0;  // lanes past the tile (BN < 32) read a real row, masked below
            for (int c = 0; c < D; ++c) {
                const int qc = c * DEC_ROWS + warp * DEC_RPW;
                fma_rows4(dn, Qt + qc, Ks[kr * LDK + c]);
                if (rel) fma_rows4(df, Qft + qc, Kf[kr * LDK + c]);
            }
#pragma unroll
            for (int x = 0; x < DEC_RPW; ++x) {
                const int r = warp * DEC_RPW + x, i = row_pos(r), j = j0 + lane;
                const bool seen = r < rows && lane < vk && visible(mask, i, j);
                s[x] = seen ? score_log2(p.rope, p.scale_log2, dn[x], df[x], i, j, slope[x]) : -INFINITY;
            }
            // Online softmax per row (log2 domain).
#pragma unroll
            for (int x = 0; x < DEC_RPW; ++x) {
                float tmax = s[x];
#pragma unroll
                for (int off = 16; off > 0; off /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
                const float m_new = fmaxf(mx[x], tmax);
                const float m_use = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = exp2f(mx[x] - m_use);
                w[x] = exp2f(s[x] - m_use);
                float tsum = w[x];
#pragma unroll
                for (int off = 16; off > 0; off /= 2) tsum += __shfl_xor_sync(0xffffffffu, tsum, off);
                sum[x] = sum[x] * alpha + tsum;
                mx[x] = m_new;
#pragma unroll
                for (int y = 0; y < 2 * DEC_MAXP; ++y) o[x][y] *= alpha;
            }
        }

        // V_n landed: the newest group is K_{n+1} when one was staged.
        if (next < k_end) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();
        if (warp_has_rows) {
            // O += P V: lane holds component pairs 2·lane + 64y; each staged V pair is read
            // once and feeds the warp's 4 rows.
            for (int key = 0; key < vk; ++key) {
                float wk[DEC_RPW];
#pragma unroll
                for (int x = 0; x < DEC_RPW; ++x) wk[x] = __shfl_sync(0xffffffffu, w[x], key);
#pragma unroll
                for (int y = 0; y < DEC_MAXP; ++y) {
                    const int c = 2 * lane + 64 * y;
                    if (c < D) {
                        float v2[2];
                        load_f32<T, 2>(Vst + key * D + c, v2);
#pragma unroll
                        for (int x = 0; x < DEC_RPW; ++x) {
                            o[x][2 * y] = fmaf(wk[x], v2[0], o[x][2 * y]);
                            o[x][2 * y + 1] = fmaf(wk[x], v2[1], o[x][2 * y + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // V staging free
        if (next < k_end) stage(Vst, vc, next);  // lands while tile n+1's keys are rotated and scored
        j0 = next;
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
        // Scalar stores: the output may be any view (odd row strides, 2-byte aligned).
        T* orow = static_cast<T*>(p.out) + (long long)tok * p.o_row_stride + (long long)h * D;
        float* prow = p.part_out + (((long long)split * tokens + tok) * p.q_heads + h) * D;
#pragma unroll
        for (int y = 0; y < DEC_MAXP; ++y) {
            const int c = 2 * lane + 64 * y;
            if (c >= D) continue;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (p.splits == 1) orow[c + u] = from_f32<T>(o[x][2 * y + u] * inv);
                else prow[c + u] = o[x][2 * y + u] * inv;
            }
        }
        if (lane == 0) {
            if (p.splits == 1) p.lse[(long long)h * tokens + tok] = lse;
            else p.part_lse[((long long)split * p.q_heads + h) * tokens + tok] = lse;
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
