// Fused RoPE · QKᵀ · scale + ALiBi, masked: the f32 score matrix [Hq, Nq, Nk] from *unrotated*
// Q [Nq, Hq, d] and K [Nk, Hkv, d]. Queries sit at q_offset + i, keys at j (decode offset).
// ReRoPE / Leaky ReRoPE by the two-rotation trick: a near and a far copy of each tile, two
// dot products, and per element the one its distance selects (SPEC §3).
//
// Block: 4 warps on one tile of one query head (ScoresTile); f16/bf16 use tensor cores
// (mma.sync m16n8k16), f32 uses FMA. ReRoPE runs the tile twice (near, far) in the same
// shared memory rather than holding four tiles.
#include "alibi.cuh"
#include "mask.cuh"
#include "tile.cuh"
#include "params.cuh"

namespace ra {


constexpr int S_THREADS = 128;

// Tile shape per dtype: 64 x 64 with tensor cores for 16-bit types; 32 x 32 for f32 (FMA), so
// that two f32 tiles of head_dim 256 fit the 99 KB of shared memory an sm_86/89 block may have.
template <typename T> struct ScoresTile {
    static constexpr int BM = sizeof(T) == 4 ? 32 : 64;
    // Smem row pitch: +8 halves keep ldmatrix's eight row addresses on distinct banks; +1 float
    // does the same for the FMA path's column reads.
    static __host__ __device__ int pitch(int d) { return sizeof(T) == 4 ? d + 1 : d + 8; }
};

// One score: writes it when this pass (0 = near rotation, 1 = far) is the one its distance selects.
__device__ __forceinline__ void emit_score(const ScoresParams& p, int h, int m0, int n0, int row, int key, int vq, int vk,
                                           float dot, int pass, bool rel, float slope, const MaskArgs& mask) {
    if (row >= vq || key >= vk) return;
    const int i = p.q_offset + m0 + row, j = n0 + key;
    const bool use_far = rel && i - j >= p.rope.window;
    if (use_far != (pass == 1)) return;
    float s = -INFINITY;
    // Branch-free capping (both values, then a select): a branch here made sm_90's ptxas spill.
    const float t = p.cap_out * tanh_abs(dot * p.cap_in);
    // The row's key bounds, not visible(): its per-key chunk division cost sm_80's f32 build a spill.
    if (row_sees(mask, i, row_keys(mask, i), j)) s = (p.cap_in > 0.f ? t : p.scale * dot) + (p.alibi_total_heads > 0 ? alibi_bias(slope, i, j) : 0.f);
    p.out[((long long)h * p.nq + m0 + row) * p.nk + j] = s;
}

// Tensor cores: warp w computes rows 16w..16w+15 x 64 keys; acc[nt][c] is row g + 8(c/2),
// key 8nt + 2t + c%2 (the m16n8k16 accumulator layout).
template <typename T>
__device__ __forceinline__ void warp_qk_mma(float (&acc)[8][4], const T* Qs, const T* Ks, int ld, int D, int warp, int lane) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[nt][c] = 0.f;
    for (int kk = 0; kk < D; kk += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, Qs + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * ld + kk + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // two 8-key n-tiles per ldmatrix.x4
            uint32_t b[4];
            ldmatrix_x4(b, Ks + (np * 16 + (lane % 8) + (lane / 16) * 8) * ld + kk + ((lane / 8) % 2) * 8);
            mma_16816<T>(acc[2 * np], a, b[0], b[1]);
            mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

template <typename T>
__device__ void scores_body(const ScoresParams& p) {
    using Tile = ScoresTile<T>;
    constexpr int BM = Tile::BM;
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    const int D = p.head_dim, ld = Tile::pitch(D);
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + BM * ld;

    const int n0 = blockIdx.x * BM, m0 = blockIdx.y * BM, h = blockIdx.z;
    const int kvh = h / (p.q_heads / p.kv_heads);
    const T* q = static_cast<const T*>(p.q) + (long long)m0 * p.q_row_stride + (long long)h * D;
    const T* k = static_cast<const T*>(p.k) + (long long)n0 * p.k_row_stride + (long long)kvh * D;
    const int vq = imin(BM, p.nq - m0), vk = imin(BM, p.nk - n0);
    const bool rope = p.rope.rotary_dim > 0;
    const bool rel = rope && p.rope.relative != REL_NONE, leaky = p.rope.relative == REL_LEAKY;
    const MaskArgs mask{p.causal, p.window, p.sinks, p.chunk};
    const float slope = p.alibi_total_heads > 0 ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + h) : 0.f;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    // Pass 0: Q and K rotated to their positions. Pass 1 (ReRoPE only): the far copies.
    for (int pass = 0; pass < (rel ? 2 : 1); ++pass) {
        if (pass == 1) __syncthreads();  // pass 0 has finished reading the tiles
        const int qmode = !rope ? ROT_NONE : pass == 0 ? ROT_POS : leaky ? ROT_Q_LEAKY : ROT_Q_RE;
        const int kmode = !rope ? ROT_NONE : pass == 0 ? ROT_POS : leaky ? ROT_K_LEAKY : ROT_NONE;
        // Q with Llama 4's query temperature (query = true).
        load_rotated_tile(Qs, ld, q, p.q_row_stride, BM, vq, D, p.rope, qmode, p.q_offset + m0, nullptr, nullptr, true);
        load_rotated_tile(Ks, ld, k, p.k_row_stride, BM, vk, D, p.rope, kmode, n0);
        __syncthreads();
        if constexpr (sizeof(T) == 4) {
            // Warp w: rows 8w..8w+7, lane = key. Q reads broadcast; K reads hit distinct banks (pitch D+1).
            float acc[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) acc[r] = 0.f;
            // Unrolled by 4, not fully: a full unroll makes sm_80's ptxas spill.
#pragma unroll 4
            for (int x = 0; x < D; ++x) {
                const float kx = Ks[lane * ld + x];
#pragma unroll
                for (int r = 0; r < 8; ++r) acc[r] = fmaf(Qs[(warp * 8 + r) * ld + x], kx, acc[r]);
            }
#pragma unroll
            for (int r = 0; r < 8; ++r) emit_score(p, h, m0, n0, warp * 8 + r, lane, vq, vk, acc[r], pass, rel, slope, mask);
        } else {
            float acc[8][4];
            warp_qk_mma<T>(acc, Qs, Ks, ld, D, warp, lane);
            const int g = lane / 4, t = lane % 4;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    emit_score(p, h, m0, n0, warp * 16 + g + (c / 2) * 8, nt * 8 + 2 * t + (c % 2), vq, vk, acc[nt][c], pass,
                               rel, slope, mask);
        }
    }
}

}  // namespace ra

#define RA_SCORES(T, NAME) \
    RA_KERNEL(ra::S_THREADS, scores_##NAME, ra::ScoresParams) { ra::scores_body<T>(p); }
RA_FOR_EACH_DTYPE(RA_SCORES)
