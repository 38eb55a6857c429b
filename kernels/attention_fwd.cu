// Prefill attention, FlashAttention-2 style, with the position encoding inside the kernel:
// Q is rotated once as its tile is loaded; K either arrives unrotated and each tile is rotated
// in shared memory as it lands (the fused path), or was pre-rotated once into a workspace by
// the rope kernel (the API picks per shape: see src/cuda/attention.rs). ALiBi, causal and
// sliding-window masks with sinks, GQA, variable-length batches, ReRoPE by the two-rotation
// trick (a second, far copy of the Q tile and the K tile; per element the distance picks one).
//
// 16-bit path: WARPS warps x 16 query rows, BN keys per tile, tensor cores (mma.sync m16n8k16,
// ldmatrix), K/V through shared memory with cp.async (V of tile n and K of tile n+1 are in
// flight while the tensor cores work), online softmax in f32 in the log2 domain.
// f32 path: one warp per query row, FMA; correct everywhere, not fast.
#include "attention.cuh"

namespace ra {

// O (and the row state) for the tensor-core path. Thread (g, t) of warp w holds query rows
// 16w + g and 16w + g + 8 (in-tile), the mma accumulator layout.
template <typename T, int D, int WARPS, int BN>
__device__ void attention_fwd_mma(const AttnParams& p) {
    constexpr int BM = WARPS * 16, LD = D + 8, NT = BN / 8, DT = D / 8;
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + BM * LD;
    T* Vs = Ks + BN * LD;
    T* Qf = Vs + BN * LD;  // far copies: only with ReRoPE
    T* Kf = Qf + BM * LD;

    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const SeqBounds sb = seq_bounds(p, b);
    if (m0 >= sb.seqlen_q) return;
    const int kvh = h / (p.q_heads / p.kv_heads);
    const T* qg = static_cast<const T*>(p.q) + (long long)(sb.q_start + m0) * p.q_row_stride + (long long)h * D;
    const T* kg = static_cast<const T*>(p.k) + (long long)sb.k_start * p.k_row_stride + (long long)kvh * D;
    const T* vg = static_cast<const T*>(p.v) + (long long)sb.k_start * p.v_row_stride + (long long)kvh * D;
    const T* fg = static_cast<const T*>(p.k_far) + (long long)sb.k_start * p.kf_row_stride + (long long)kvh * D;
    const int vq = imin(BM, sb.seqlen_q - m0);
    const int kp = sb.k_pos0;          // position of the sequence's key 0
    const int i0 = sb.q_pos0 + m0;     // position of the tile's first query
    const bool rope = p.rope.rotary_dim > 0;
    const bool rel = rope && p.rope.relative != REL_NONE, leaky = p.rope.relative == REL_LEAKY;
    // The fused path rotates K tiles by composition (tile.cuh), its tables after the tiles in use:
    // (BM + 2·BN)·LD or (2·BM + 3·BN)·LD elements of T, multiples of 8 bytes. Not at head_dim
    // 256, where 12 KB of tables would cost an H100 a block per SM.
    constexpr bool COMPOSED = D <= 128;
    float2* rot_off = reinterpret_cast<float2*>(rel ? Kf + BN * LD : Qf);  // [ROT_SUB][D/2]
    float2* rot_base = rot_off + ROT_SUB * (D / 2);                       // [BN/ROT_SUB][D/2]
    // Key j's rows: contiguous from kg / vg / fg, or (paged) through the block table, where the
    // far copy is the raw key, rotated in shared memory like the near one.
    const bool paged = p.block_table != nullptr;
    auto paged_at = [&](const void* cache, int j) {
        return paged_key(static_cast<const T*>(cache), p.block_table, b, j, kvh, p.page_size, p.max_pages, p.num_pages,
                         p.kv_heads, D);
    };
    auto krow = [&](int j) { return paged ? paged_at(p.k, j) : kg + (long long)j * p.k_row_stride; };
    auto vrow = [&](int j) { return paged ? paged_at(p.v, j) : vg + (long long)j * p.v_row_stride; };
    auto frow = [&](int j) { return paged ? paged_at(p.k, j) : fg + (long long)j * p.kf_row_stride; };

    load_rotated_tile(Qs, LD, qg, p.q_row_stride, BM, vq, D, p.rope, rope ? ROT_POS : ROT_NONE, i0);
    if (COMPOSED && p.rotate_k) fill_rotation_offsets(rot_off, p.rope);  // read after the loop's first barrier
    if (rel) load_rotated_tile(Qf, LD, qg, p.q_row_stride, BM, vq, D, p.rope, leaky ? ROT_Q_LEAKY : ROT_Q_RE, i0);

    const MaskArgs mask{p.causal, p.window, p.sinks};
    const int n_tiles = (sb.seqlen_k + BN - 1) / BN;
    // Causal: no key after the last query of the tile.
    const int last_key = i0 + vq - 1 - kp;  // causal: the last key index any row of the tile sees
    const int n_end = p.causal ? (last_key < 0 ? 0 : imin(n_tiles, last_key / BN + 1)) : n_tiles;
    auto next_tile = [&](int n) {
        while (n < n_end && !tile_visible(mask, i0, i0 + vq, kp + n * BN, kp + imin(n * BN + BN, sb.seqlen_k))) ++n;
        return n;
    };
    auto issue_k = [&](int n) {
        const int valid = imin(BN, sb.seqlen_k - n * BN);
        copy_rows_async<T, D, LD>(Ks, BN, valid, [&](int r) { return krow(n * BN + r); });
        if (rel) copy_rows_async<T, D, LD>(Kf, BN, valid, [&](int r) { return frow(n * BN + r); });
        cp_async_commit();
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float slope = p.alibi_total_heads > 0 ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + h) : 0.f;
    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[d][c] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    int n = next_tile(0);
    if (n < n_end) issue_k(n);
    while (n < n_end) {
        const int j0 = n * BN, vk = imin(BN, sb.seqlen_k - j0);
        // Every thread finished the previous tile's rotation (a barrier ago): the bases are free.
        if (COMPOSED && p.rotate_k) fill_rotation_bases(rot_base, p.rope, kp + j0, BN);
        cp_async_wait<0>();
        __syncthreads();  // K_n landed; every warp finished P·V of the previous tile
        if (p.rotate_k) {
            if constexpr (COMPOSED) rotate_tile_composed(Ks, LD, vk, p.rope, rot_off, rot_base);
            else load_rotated_tile(Ks, LD, Ks, LD, BN, vk, D, p.rope, ROT_POS, kp + j0);
            // ReRoPE's far keys stay raw; Leaky's are rotated to j / k.
            if (leaky) load_rotated_tile(Kf, LD, Kf, LD, BN, vk, D, p.rope, ROT_K_LEAKY, kp + j0);
            __syncthreads();
        }
        copy_rows_async<T, D, LD>(Vs, BN, vk, [&](int r) { return vrow(j0 + r); });
        cp_async_commit();

        // S = Q Kᵀ (and the far product), 16 rows x BN keys per warp.
        float s[NT][4], sf[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[nt][c] = sf[nt][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            uint32_t a[4], af[4];
            const int arow = (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + kk + (lane / 16) * 8;
            ldmatrix_x4(a, Qs + arow);
            if (rel) ldmatrix_x4(af, Qf + arow);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t bk[4];
                const int brow = (np * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk + ((lane / 8) % 2) * 8;
                ldmatrix_x4(bk, Ks + brow);
                mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
                mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
                if (rel) {
                    ldmatrix_x4(bk, Kf + brow);
                    mma_16816<T>(sf[2 * np], af, bk[0], bk[1]);
                    mma_16816<T>(sf[2 * np + 1], af, bk[2], bk[3]);
                }
            }
        }

        // Scale, bias, mask; online softmax (rows g and g+8 of the warp; 4 lanes share a row).
        const bool full = vk == BN && tile_fully_visible(mask, i0, i0 + vq, kp + j0, kp + j0 + BN);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int i = i0 + warp * 16 + g + rr * 8;
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 2 * rr; c < 2 * rr + 2; ++c) {
                    const int key = nt * 8 + 2 * t + (c & 1), j = kp + j0 + key;
                    float x = score_log2(p.rope, p.scale_log2, s[nt][c], sf[nt][c], i, j, slope);
                    if (!full && (key >= vk || !visible(mask, i, j))) x = -INFINITY;
                    s[nt][c] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(row_max[rr], mx);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exp2 finite
            const float alpha = exp2f(row_max[rr] - m_use);
            row_max[rr] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 2 * rr; c < 2 * rr + 2; ++c) {
                    s[nt][c] = exp2f(s[nt][c] - m_use);
                    sum += s[nt][c];
                }
            row_sum[rr] = row_sum[rr] * alpha + sum;  // per-lane partial; the quad is summed at the end
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                o[d][2 * rr] *= alpha;
                o[d][2 * rr + 1] *= alpha;
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V_n landed; every warp finished reading K_n
        const int next = next_tile(n + 1);
        if (next < n_end) issue_k(next);  // overlaps with P·V below

        // O += P V: P goes from accumulator to A-operand layout without leaving registers.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, Vs + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + np * 16 + (lane / 16) * 8);
                mma_16816<T>(o[2 * np], a, bv[0], bv[1]);
                mma_16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
            }
        }
        n = next;
    }

    // Normalise and write O and the LSE.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float l = row_sum[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = m0 + warp * 16 + g + rr * 8;
        if (row >= sb.seqlen_q) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* orow = static_cast<T*>(p.out) + (long long)(sb.q_start + row) * p.o_row_stride + (long long)h * D;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
            const float v2[2] = {o[d][2 * rr] * inv, o[d][2 * rr + 1] * inv};
            store_f32<T, 2>(orow + d * 8 + 2 * t, v2);
        }
        if (t == 0) {
            const float m_use = row_max[rr] == -INFINITY ? 0.f : row_max[rr];
            p.lse[(long long)h * p.total_q + sb.q_start + row] = l > 0.f ? (m_use + log2f(l)) * LN2 : -INFINITY;
        }
    }
}

// f32: one warp per query row; lane c owns components c, c + 32, ... K arrives pre-rotated
// (the launcher always takes the workspace path for f32), Q is rotated here in shared memory.
constexpr int ROW_WARPS = 4, ROW_MAXC = 8;  // head_dim <= 256

__device__ void attention_fwd_rows(const AttnParams& p) {
    RA_STATIC_SMEM(float, qrow, [ROW_WARPS][2][256]);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int m = blockIdx.x * ROW_WARPS + warp, h = blockIdx.y, b = blockIdx.z;
    const SeqBounds sb = seq_bounds(p, b);
    if (m >= sb.seqlen_q) return;  // whole warp leaves together: no block-wide barrier below
    const int D = p.head_dim, kvh = h / (p.q_heads / p.kv_heads);
    const int i = sb.q_pos0 + m;
    const float* qg = static_cast<const float*>(p.q) + (long long)(sb.q_start + m) * p.q_row_stride + (long long)h * D;
    const bool rope = p.rope.rotary_dim > 0;
    const bool rel = rope && p.rope.relative != REL_NONE, leaky = p.rope.relative == REL_LEAKY;
    // The tile loader with blockDim-wide strides cannot be used per warp: rotate here by pairs.
    const int half = rope ? p.rope.rotary_dim / 2 : 0;
    for (int copy = 0; copy < (rel ? 2 : 1); ++copy) {
        const int mode = !rope ? ROT_NONE : copy == 0 ? ROT_POS : leaky ? ROT_Q_LEAKY : ROT_Q_RE;
        for (int c = lane; c < D; c += 32) qrow[warp][copy][c] = qg[c];
        __syncwarp();
        for (int pr = lane; pr < half; pr += 32) {
            int ia, ib;
            pair_index(p.rope.interleaved, p.rope.rotary_dim, pr, ia, ib);
            float x0 = qrow[warp][copy][ia], x1 = qrow[warp][copy][ib];
            const float2 cs = mode_cs(p.rope, mode, i, pr);
            rotate_pair(x0, x1, cs.x, cs.y);
            qrow[warp][copy][ia] = x0;
            qrow[warp][copy][ib] = x1;
        }
        __syncwarp();
    }
    float qn[ROW_MAXC], qf[ROW_MAXC], o[ROW_MAXC];
#pragma unroll
    for (int x = 0; x < ROW_MAXC; ++x) {
        const int c = lane + 32 * x;
        qn[x] = c < D ? qrow[warp][0][c] : 0.f;
        qf[x] = (rel && c < D) ? qrow[warp][1][c] : 0.f;
        o[x] = 0.f;
    }
    const MaskArgs mask{p.causal, p.window, p.sinks};
    const float slope = p.alibi_total_heads > 0 ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + h) : 0.f;
    const float* kg = static_cast<const float*>(p.k) + (long long)sb.k_start * p.k_row_stride + (long long)kvh * D;
    const float* fg = static_cast<const float*>(p.k_far) + (long long)sb.k_start * p.kf_row_stride + (long long)kvh * D;
    const float* vg = static_cast<const float*>(p.v) + (long long)sb.k_start * p.v_row_stride + (long long)kvh * D;
    float mx = -INFINITY, sum = 0.f;
    const int j_end = p.causal ? imin(sb.seqlen_k, imax(0, i - sb.k_pos0 + 1)) : sb.seqlen_k;
    for (int j = 0; j < j_end; ++j) {
        if (!visible(mask, i, sb.k_pos0 + j)) continue;
        float dn = 0.f, df = 0.f;
#pragma unroll
        for (int x = 0; x < ROW_MAXC; ++x) {
            const int c = lane + 32 * x;
            if (c < D) {
                dn = fmaf(qn[x], kg[(long long)j * p.k_row_stride + c], dn);
                if (rel) df = fmaf(qf[x], fg[(long long)j * p.kf_row_stride + c], df);
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            dn += __shfl_xor_sync(0xffffffffu, dn, off);
            df += __shfl_xor_sync(0xffffffffu, df, off);
        }
        const float s = score_log2(p.rope, p.scale_log2, dn, df, i, sb.k_pos0 + j, slope);
        const float m_new = fmaxf(mx, s);
        const float alpha = exp2f(mx - m_new), w = exp2f(s - m_new);
        sum = sum * alpha + w;
#pragma unroll
        for (int x = 0; x < ROW_MAXC; ++x) {
            const int c = lane + 32 * x;
            o[x] = o[x] * alpha + (c < D ? w * vg[(long long)j * p.v_row_stride + c] : 0.f);
        }
        mx = m_new;
    }
    float* orow = static_cast<float*>(p.out) + (long long)(sb.q_start + m) * p.o_row_stride + (long long)h * D;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int x = 0; x < ROW_MAXC; ++x) {
        const int c = lane + 32 * x;
        if (c < D) orow[c] = o[x] * inv;
    }
    if (lane == 0) p.lse[(long long)h * p.total_q + sb.q_start + m] = sum > 0.f ? (mx + log2f(sum)) * LN2 : -INFINITY;
}

}  // namespace ra

// attention_fwd_d<D>_<dtype>: 4 warps x 64 keys per tile; head_dim 256 takes 2 warps x 32 keys
// so that Q, K, V and the ReRoPE far copies fit the 99 KB of an sm_86/89 block.
#define RA_FWD(T, NAME, D, WARPS, BN)                                                             \
    RA_KERNEL(WARPS * 32, attention_fwd_d##D##_##NAME, ra::AttnParams) { ra::attention_fwd_mma<T, D, WARPS, BN>(p); }
#define RA_FWD_ALL_D(T, NAME) \
    RA_FWD(T, NAME, 64, 4, 64) RA_FWD(T, NAME, 80, 4, 64) RA_FWD(T, NAME, 96, 4, 64) RA_FWD(T, NAME, 128, 4, 64) RA_FWD(T, NAME, 256, 2, 32)
RA_FWD_ALL_D(__half, f16)
RA_FWD_ALL_D(__nv_bfloat16, bf16)

RA_KERNEL(ra::ROW_WARPS * 32, attention_fwd_rows_f32, ra::AttnParams) {
    ra::attention_fwd_rows(p);
}
