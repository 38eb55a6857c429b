// Prefill attention, FlashAttention-2 style, with the position encoding inside the kernel:
// Q is rotated once as its tile is loaded; K either arrives unrotated and each tile is rotated
// in shared memory as it lands (the fused path), or was pre-rotated once into a workspace by
// the rope kernel (the API picks per shape: see src/cuda/attention.rs). ALiBi, causal and
// sliding-window masks with sinks, GQA, variable-length batches, ReRoPE by the two-rotation
// trick (a second, far copy of the Q tile and the K tile; per element the distance picks one).
//
// 16-bit path: WARPS warps x 16 query rows (x MB row blocks), BN keys per tile, tensor cores (mma.sync m16n8k16,
// ldmatrix), K/V through shared memory with cp.async (V of tile n and K of tile n+1 are in
// flight while the tensor cores work), online softmax in f32 in the log2 domain.
// f32 path: one warp per query row, FMA; correct everywhere, not fast.
#include "attention.cuh"

namespace ra {

// How a tile's scores become probabilities (attention_fwd_mma picks per tile, block-uniform):
// every option with per-element masks, or one of the two branch-free forms that cover almost
// every tile of a long prefill (fully visible, no ReRoPE).
enum SoftmaxKind {
    SM_GENERIC = 0,  // masks, ReRoPE's near/far choice, ALiBi's |i - j|: per element
    SM_PLAIN = 1,    // no bias, scale > 0: max of the raw scores, the scale folded into the exponent
    SM_LINEAR = 2,   // ALiBi on one side of the diagonal: the bias is linear in j, two FFMAs
    SM_EDGE = 3,     // the causal diagonal or the last, partial tile: SM_LINEAR's bias (0 without
                     // ALiBi) and one compare per score against the row's last visible key
};
template <int K> struct Kind {
    static constexpr int value = K;
};

// scripts/sass-loops.py -D RA_PROBE_COPY=1: count the loop with every tile's copies on the
// whole-tile path (static analysis only).
#ifndef RA_PROBE_COPY
#define RA_PROBE_COPY 0
#endif

// Rows of 16-byte chunks of a contiguous tile (row r at g + r * stride), zero-filling rows >=
// valid: each thread keeps one source pointer and steps it (no per-chunk index arithmetic).
// Needs THREADS to be a multiple of the chunks per row (head_dim 64, 128 and 256 at 16 bits).
// Every tile but a sequence's last is whole, so that case gets its own fully unrolled copy with
// no per-row compare and select: in the wide head_dim-128 loop a tile's two copies then cost
// 3 instructions a chunk instead of about 9 (a rolled loop re-testing r < ROWS, the select of a
// safe source, a zero-fill size): 952 instructions per tile issued instead of about 1146.
template <typename T, int D, int LD, int ROWS, int THREADS>
__device__ __forceinline__ void copy_tile_async(T* s, const T* g, long long stride, int valid) {
    constexpr int CH = D * sizeof(T) / 16, PER = 16 / sizeof(T), STEP = THREADS / CH;
    static_assert(THREADS % CH == 0 && ROWS % STEP == 0, "whole rows per pass");
    constexpr int N = ROWS / STEP;
    const int r0 = threadIdx.x / CH, col = (threadIdx.x % CH) * PER;
    const T* src = g + r0 * stride + col;
    T* dst = s + r0 * LD + col;
    if (RA_PROBE_COPY || valid >= ROWS) {
#pragma unroll
        for (int k = 0; k < N; ++k, src += STEP * stride) cp_async_16(dst + k * STEP * LD, src, true);
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k, src += STEP * stride) {
            const bool ok = r0 + k * STEP < valid;
            cp_async_16(dst + k * STEP * LD, ok ? src : g, ok);
        }
    }
}

// The same from a paged cache ([pages, page_size, kv_heads, D], keys j0 .. of sequence b through
// its block table). A thread's rows r0 + k·STEP: one division for the first, then page and
// offset advance by STEP keys at a time. The table is read for a group of rows before any of
// their copies needs it, so the reads' latencies overlap instead of adding up in front of every
// copy (a warp issues in order); the entries are clamped into the pool (clamp_page) at the copy.
// Addresses in bytes from the thread's column of the head: a chunk's source is one unsigned
// 32 x 32 -> 64-bit multiply-add from its slot (below 2^31: the host checked the pool's slots
// fit an i32), where signed 64-bit element arithmetic took ptxas about twenty instructions.
template <typename T, int D, int LD, int ROWS, int THREADS>
__device__ __forceinline__ void copy_paged_tile_async(T* s, const T* cache, const AttnParams& p, int b, int kvh, int j0,
                                                      int valid) {
    constexpr int CH = D * sizeof(T) / 16, PER = 16 / sizeof(T), STEP = THREADS / CH, N = ROWS / STEP;
    // Rows per group: at most 4 table entries and offsets in registers (8 cost the head_dim-128
    // kernel a spill on sm_80), and a divisor of N.
    constexpr int G = N % 4 == 0 ? 4 : N % 3 == 0 ? 3 : N % 2 == 0 ? 2 : 1;
    static_assert(THREADS % CH == 0 && ROWS % STEP == 0 && N % G == 0, "whole rows per pass, whole groups");
    const int r0 = threadIdx.x / CH, col = (threadIdx.x % CH) * PER;
    const char* head = reinterpret_cast<const char*>(cache + (long long)kvh * D + col);
    const unsigned row_bytes = static_cast<unsigned>(p.kv_heads) * (D * sizeof(T));
    const int ps = p.page_size, dp = STEP / ps, dq = STEP % ps;  // STEP keys: dp pages and dq keys
    const int* entry_at = p.block_table + (long long)b * p.max_pages + (j0 + r0) / ps;
    int off = (j0 + r0) % ps;
    const int left = valid - r0;  // row r0 + k·STEP is valid when k·STEP < left
    T* dst = s + r0 * LD + col;
#pragma unroll 1
    for (int k0 = 0; k0 < N; k0 += G) {
        int entry[G], offs[G];
#pragma unroll
        for (int k = 0; k < G; ++k) {
            // Valid rows lie inside the table's row: the host checked the context fits the pages.
            entry[k] = (k0 + k) * STEP < left ? *entry_at : 0;
            offs[k] = off;
            off += dq, entry_at += dp;
            if (off >= ps) off -= ps, ++entry_at;
        }
#pragma unroll
        for (int k = 0; k < G; ++k) {
            // An invalid row's source (entry 0) stays inside the pool, and is not read.
            const unsigned slot = static_cast<unsigned>(clamp_page(entry[k], p.num_pages) * ps + offs[k]);
            cp_async_16(dst, head + static_cast<unsigned long long>(slot) * row_bytes, (k0 + k) * STEP < left);
            dst += STEP * LD;
        }
    }
}

// O (and the row state) for the tensor-core path. The block's BM = MB·WARPS·16 query rows are
// MB row blocks of WARPS·16; thread (g, t) of warp w holds rows 16w + g and 16w + g + 8 of each
// (the mma accumulator layout).
// FULL kernels take every option: keys rotated in the kernel (fused path), ReRoPE's far copies,
// paged K/V, split keys. The others (MB = 2, FlashAttention-2's 128-row tile) take keys ready in memory
// (pre-rotated, or no RoPE): every K and V fragment a warp loads from shared memory then feeds
// two mmas, half the shared-memory traffic per flop, which is what limits mma.sync on A100/H100.
// O and S double in registers, so the options' state has to go: FULL = false compiles it out.
//
// Order of work. Query tiles run last first (blockIdx.x 0 takes the last tile): under a causal
// mask the last tiles see the most keys, and starting the heaviest blocks first keeps the tail
// of the grid short. Key tiles run from the diagonal backwards: the keys nearest the query
// (under ALiBi, and usually in trained models) carry the largest scores, so the running max
// is found in the first tile and later tiles rarely rescale O (a warp skips the rescale when
// no row's max grew).
//
// Head dim 512 (Gemma 4's full layers): a warp's O over the whole head would take 256
// registers. The head is split in DS = 2 parts: warp w takes rows 16·(w % RW) of the tile and
// components [DD·p, DD·(p + 1)) (p = w / RW, DD = D / DS), for Q·Kᵀ and for O alike. Each warp
// of a pair holds the partial scores over its half of the components; they are added through
// shared memory (K's buffer, once every warp has read the tile), each warp adding the other's
// to its own, so both hold the same scores (a + b = b + a exactly) and run the same softmax.
// No mma is done twice; what it costs is two barriers and 64 bytes a thread through shared
// memory per tile. No ReRoPE there (its far copies would not fit in 99 KB; the launcher refuses it).
template <typename T, int D, int WARPS, int BN, int MB, bool FULL>
__device__ void attention_fwd_mma(const AttnParams& p) {
    constexpr int DS = D > 256 ? 2 : 1, RW = WARPS / DS, DD = D / DS;
    constexpr int BM = MB * RW * 16, LD = D + 8, NT = BN / 8, DT = DD / 8;
    constexpr int THREADS = WARPS * 32;
    constexpr bool FAR = FULL && DS == 1;  // ReRoPE's far copies
    static_assert(WARPS % DS == 0 && (DS == 1 || MB == 1), "whole warp pairs, one row block");
    static_assert(DS == 1 || WARPS * NT * 4 * 32 * sizeof(float) <= BN * LD * sizeof(T), "the partial scores fit in K's buffer");
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + BM * LD;
    T* Vs = Ks + BN * LD;
    T* Qf = Vs + BN * LD;  // far copies: only with ReRoPE
    T* Kf = Qf + BM * LD;

    // Split keys (FULL kernels): block x is query tile (reversed) x / splits, key split x % splits.
    const int splits = FULL ? p.splits : 1, split = blockIdx.x % splits;
    const int q_tiles = gridDim.x / splits;
    const int m0 = (q_tiles - 1 - blockIdx.x / splits) * BM, h = blockIdx.y, b = blockIdx.z;
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
    // The launcher sends ReRoPE only to FULL kernels; a constant false drops the far code here.
    const bool rel = FAR && rope && p.rope.relative != REL_NONE, leaky = rel && p.rope.relative == REL_LEAKY;
    // The fused path rotates K tiles by composition (tile.cuh), its tables after the tiles in use:
    // (BM + 2·BN)·LD or (2·BM + 3·BN)·LD elements of T, multiples of 8 bytes. Not at head_dim
    // 256, where 12 KB of tables would cost an H100 a block per SM.
    constexpr bool COMPOSED = D <= 128;
    float2* rot_off = reinterpret_cast<float2*>(rel ? Kf + BN * LD : Qf);  // [ROT_SUB][D/2]
    float2* rot_base = rot_off + ROT_SUB * (D / 2);                       // [BN/ROT_SUB][D/2]
    float2* rot_step = rot_base + (BN / ROT_SUB) * (D / 2);               // [BN/ROT_SUB][D/2]
    // Key j's rows: contiguous from kg / vg / fg, or (paged) through the block table, where the
    // far copy is the raw key, rotated in shared memory like the near one.
    const bool paged = FULL && p.block_table != nullptr;  // the launcher sends paged calls to FULL kernels
    auto paged_at = [&](const void* cache, int j) {
        return paged_key(static_cast<const T*>(cache), p.block_table, b, j, kvh, p.page_size, p.max_pages, p.num_pages,
                         p.kv_heads, D);
    };
    auto frow = [&](int j) { return paged ? paged_at(p.k, j) : fg + (long long)j * p.kf_row_stride; };
    // A K or V tile: one stepped pointer (contiguous) or page walk (paged) per thread where the
    // chunks per row divide the block (16-bit head_dim 64, 128, 256, 512), else the per-chunk loader.
    constexpr bool STEPPED = THREADS % (D * sizeof(T) / 16) == 0;
    // The sequence's K and V row bases come from shared memory at each copy: O and S take the
    // wide kernel's registers, and ptxas would otherwise spill one of these (written before the
    // barrier below).
    RA_STATIC_SMEM(const T*, row_base, [2]);
    if (threadIdx.x == 0) row_base[0] = kg, row_base[1] = vg;
    auto copy_tile = [&](T* s, const void* cache, const T* base, long long stride, int j0, int valid) {
        if constexpr (STEPPED) {
            if (paged) copy_paged_tile_async<T, D, LD, BN, THREADS>(s, static_cast<const T*>(cache), p, b, kvh, j0, valid);
            else copy_tile_async<T, D, LD, BN, THREADS>(s, base + (long long)j0 * stride, stride, valid);
        } else if (paged) {
            copy_rows_async<T, D, LD, BN, THREADS>(s, valid, [&](int r) { return paged_at(cache, j0 + r); });
        } else {
            copy_rows_async<T, D, LD, BN, THREADS>(s, valid, [&](int r) { return base + (long long)(j0 + r) * stride; });
        }
    };

    // Q rotated by composition too (tile.cuh): exact offsets and a base per 8 rows in the K/V
    // buffers, free until the first K tile is staged (after the barrier before the loop). A
    // 128-row tile then costs 24 exact sincos per pair instead of 128.
    // Where Q's rows start on 16-byte boundaries (dense Q, most packed QKV views) the tile comes
    // by cp.async, while the tables are made, and is rotated in place in shared memory
    // (rotate_tile_composed, the K tiles' vector path): the same arithmetic, so the same bits,
    // as rotating on the way from global memory one pair at a time, which costs a 128-row tile
    // about 60 instructions a pair (a division by the rotary half, scalar loads and stores):
    // on the order of a 2k-token causal prefill's whole tile loop over again. (Head dims 80 and
    // 96, whose rows do not divide into the block's threads, keep that load: the per-chunk copy
    // costs the head_dim-80 kernel a spill on sm_90.)
    static_assert((ROT_SUB + BM / ROT_SUB) * (D / 2) * sizeof(float2) <= 2 * BN * LD * sizeof(T), "Q tables fit in Ks, Vs");
    float2* q_off = reinterpret_cast<float2*>(Ks);
    float2* q_base = q_off + ROT_SUB * (D / 2);
    const bool q_vec = STEPPED && reinterpret_cast<unsigned long long>(qg) % 16 == 0 && (p.q_row_stride * sizeof(T)) % 16 == 0;
    if constexpr (STEPPED) {
        if (q_vec) {
            copy_tile_async<T, D, LD, BM, THREADS>(Qs, qg, p.q_row_stride, vq);
            cp_async_commit();
        }
    }
    if (rope) {
        fill_rotation_offsets(q_off, p.rope);
        fill_rotation_bases(q_base, p.rope, i0, BM);
    }
    if (q_vec) cp_async_wait<0>();
    __syncthreads();  // the tables are written; the Q tile landed
    if (q_vec) {
        if (rope) rotate_tile_composed(Qs, LD, vq, p.rope, q_off, q_base);
    } else if (rope) {
        load_rotated_tile(Qs, LD, qg, p.q_row_stride, BM, vq, D, p.rope, ROT_POS, i0, q_off, q_base, true);
    } else {
        load_rotated_tile(Qs, LD, qg, p.q_row_stride, BM, vq, D, p.rope, ROT_NONE, i0, nullptr, nullptr, true);
    }
    if (COMPOSED && FULL && p.rotate_k) {  // read after the barrier before the loop
        fill_rotation_offsets(rot_off, p.rope);
        fill_rotation_steps(rot_step, p.rope, BN / ROT_SUB);
    }
    if (rel) load_rotated_tile(Qf, LD, qg, p.q_row_stride, BM, vq, D, p.rope, leaky ? ROT_Q_LEAKY : ROT_Q_RE, i0, nullptr, nullptr, true);
    // Llama 4's query temperature: the loads above applied it; an async-copied tile takes it now.
    if (q_vec && tile_has_temperature(p.rope, i0, vq)) {
        __syncthreads();  // the tile is rotated in place (the barrier before the loop orders the rest)
        scale_query_tile(Qs, LD, vq, D, p.rope.temp_floor, p.rope.temp_scale, p.rope.temp_offset, i0);
    }

    const MaskArgs mask{p.causal, p.window, p.sinks, p.chunk};
    const int n_tiles = (sb.seqlen_k + BN - 1) / BN;
    // Causal: no key after the last query of the tile.
    const int last_key = i0 + vq - 1 - kp;  // causal: the last key index any row of the tile sees
    const int n_causal = p.causal ? (last_key < 0 ? 0 : imin(n_tiles, last_key / BN + 1)) : n_tiles;
    // This split's tiles (keys_per_split is a multiple of every narrow tile's BN).
    const int n_begin = splits > 1 ? split * (p.keys_per_split / BN) : 0;
    const int n_end = splits > 1 ? imin(n_causal, (split + 1) * (p.keys_per_split / BN)) : n_causal;
    // The last tile at or before n that some row sees (n_begin - 1: none left).
    auto prev_tile = [&](int n) {
        while (n >= n_begin && !tile_visible(mask, i0, i0 + vq, kp + n * BN, kp + imin(n * BN + BN, sb.seqlen_k))) --n;
        return n;
    };
    auto issue_k = [&](int n) {
        const int valid = imin(BN, sb.seqlen_k - n * BN);
        copy_tile(Ks, p.k, row_base[0], p.k_row_stride, n * BN, valid);
        if (rel) copy_rows_async<T, D, LD, BN, THREADS>(Kf, valid, [&](int r) { return frow(n * BN + r); });
        cp_async_commit();
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rw = warp % RW, part = warp / RW;  // row warp, part of the head (DS > 1)
    // ALiBi slope in log2 units (the scores' unit); 0 = none.
    const float slope_log2 = p.alibi_total_heads > 0 ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + h) * LOG2E : 0.f;
    float o[MB][DT][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[mb][d][c] = 0.f;
    float row_max[MB][2], row_sum[MB][2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) row_max[mb][rr] = -INFINITY, row_sum[mb][rr] = 0.f;

    int n = prev_tile(n_end - 1);
    __syncthreads();  // row_base is written
    if (n >= n_begin) issue_k(n);
    while (n >= n_begin) {
        const int j0 = n * BN, vk = imin(BN, sb.seqlen_k - j0);
        // Every thread finished the previous tile's rotation (a barrier ago): the bases are free.
        if (COMPOSED && FULL && p.rotate_k) fill_rotation_bases_stepped(rot_base, p.rope, kp + j0, BN, rot_step);
        cp_async_wait<0>();
        __syncthreads();  // K_n landed; every warp finished P·V of the previous tile
        if (FULL && p.rotate_k) {
            if constexpr (COMPOSED) rotate_tile_composed(Ks, LD, vk, p.rope, rot_off, rot_base);
            else load_rotated_tile(Ks, LD, Ks, LD, BN, vk, D, p.rope, ROT_POS, kp + j0);
            // ReRoPE's far keys stay raw; Leaky's are rotated to j / k.
            if (leaky) load_rotated_tile(Kf, LD, Kf, LD, BN, vk, D, p.rope, ROT_K_LEAKY, kp + j0);
            __syncthreads();
        }
        copy_tile(Vs, p.v, row_base[1], p.v_row_stride, j0, vk);
        cp_async_commit();

        // S = Q Kᵀ (and the far product), 16 rows x BN keys per warp and row block; each K
        // fragment is loaded once for the MB row blocks.
        float s[MB][NT][4], sf[MB][FAR ? NT : 1][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[mb][nt][c] = 0.f;
        if constexpr (FAR) {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 4; ++c) sf[mb][nt][c] = 0.f;
        }
#pragma unroll
        for (int k16 = 0; k16 < DD; k16 += 16) {
            const int kk = part * DD + k16;
            uint32_t a[MB][4], af[MB][4];
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int arow = ((mb * RW + rw) * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + kk + (lane / 16) * 8;
                ldmatrix_x4(a[mb], Qs + arow);
                if constexpr (FAR)
                    if (rel) ldmatrix_x4(af[mb], Qf + arow);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t bk[4];
                const int brow = (np * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk + ((lane / 8) % 2) * 8;
                ldmatrix_x4(bk, Ks + brow);
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    mma_16816<T>(s[mb][2 * np], a[mb], bk[0], bk[1]);
                    mma_16816<T>(s[mb][2 * np + 1], a[mb], bk[2], bk[3]);
                }
                if constexpr (FAR)
                    if (rel) {
                        ldmatrix_x4(bk, Kf + brow);
#pragma unroll
                        for (int mb = 0; mb < MB; ++mb) {
                            mma_16816<T>(sf[mb][2 * np], af[mb], bk[0], bk[1]);
                            mma_16816<T>(sf[mb][2 * np + 1], af[mb], bk[2], bk[3]);
                        }
                    }
            }
        }

        // DS > 1: the pair's partial scores added up (see the kernel's header).
        if constexpr (DS > 1) {
            float* xs = reinterpret_cast<float*>(Ks);  // [WARPS][NT][4][32]
            const int other = part == 0 ? warp + RW : warp - RW;
            __syncthreads();  // every warp has read K_n
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) xs[((warp * NT + nt) * 4 + c) * 32 + lane] = s[0][nt][c];
            __syncthreads();  // the partials are written (read before the barrier that frees K's buffer)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[0][nt][c] += xs[((other * NT + nt) * 4 + c) * 32 + lane];
        }

        // Online softmax (rows g and g+8 of each row block; 4 lanes share a row), log2 domain.
        // First every row's new max, then (only if some row of the warp grew) the rescale of O,
        // then the exponentials.
        const bool full = vk == BN && tile_fully_visible(mask, i0, i0 + vq, kp + j0, kp + j0 + BN);
        // ALiBi's -slope·|i - j| is slope·(j - i) below the diagonal (every key at or before
        // every row; under a causal mask, every key a row sees) and -slope·(j - i) above it:
        // linear in j, so two FFMAs per score.
        const bool below = kp + j0 + BN - 1 <= i0, above = kp + j0 >= i0 + vq - 1;
        const float sigma = below || p.causal ? slope_log2 : -slope_log2;
        // SM_EDGE covers a tile whose only masks are the causal one and the end of the keys:
        // row i sees the tile's keys u <= edge(i) (the window and chunks, if any, hide none of them).
        const bool edge_ok = !rel && tile_window_free(mask, i0, i0 + vq, kp + j0, kp + j0 + BN) &&
                             (slope_log2 == 0.f || p.causal || below || above);
        auto softmax = [&](auto kind_c) {
            constexpr int KIND = decltype(kind_c)::value;
            bool grew = false;
            float alpha[MB][2];
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const int i = i0 + (mb * RW + rw) * 16 + g + rr * 8;
                    // SM_LINEAR: bias(j) = sigma·(j - i) = sigma·(j0 + 2t - i) + sigma·(8nt + e), exact offsets.
                    const float bias0 = KIND == SM_LINEAR || KIND == SM_EDGE ? sigma * static_cast<float>(kp + j0 + 2 * t - i) : 0.f;
                    // SM_EDGE: the last key u = 8nt + 2t + e this row sees, less 2t (so that the
                    // compare takes the constant 8nt + e).
                    const int edge = KIND == SM_EDGE ? imin(vk - 1, p.causal ? i - kp - j0 : BN) - 2 * t : 0;
                    float mx = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int c = 2 * rr; c < 2 * rr + 2; ++c) {
                            float x = s[mb][nt][c];
                            if constexpr (KIND == SM_LINEAR) {
                                x = fmaf(x, p.scale_log2, fmaf(sigma, static_cast<float>(nt * 8 + (c & 1)), bias0));
                            } else if constexpr (KIND == SM_EDGE) {
                                x = nt * 8 + (c & 1) <= edge ? fmaf(x, p.scale_log2, fmaf(sigma, static_cast<float>(nt * 8 + (c & 1)), bias0))
                                                             : -INFINITY;
                            } else if constexpr (KIND == SM_GENERIC) {
                                const int j = kp + j0 + nt * 8 + 2 * t + (c & 1);
                                if constexpr (FAR) x = score_log2(p.rope, p.scale_log2, x, sf[mb][nt][c], i, j, slope_log2, p.cap_in, p.cap_out);
                                else x = capped(x, p.scale_log2, p.cap_in, p.cap_out) + alibi_bias(slope_log2, i, j);
                                if (!full && (j >= kp + j0 + vk || !visible(mask, i, j))) x = -INFINITY;
                            }
                            s[mb][nt][c] = x;
                            mx = fmaxf(mx, x);
                        }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    if constexpr (KIND == SM_PLAIN) mx *= p.scale_log2;  // scale > 0: the max commutes with it
                    const float m_old = row_max[mb][rr], m_new = fmaxf(m_old, mx);
                    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep ex2 finite
                    alpha[mb][rr] = ex2(m_old - m_use);                   // 1 when the max did not grow
                    grew |= m_new != m_old;
                    row_max[mb][rr] = m_new;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int c = 2 * rr; c < 2 * rr + 2; ++c) {
                            const float x = s[mb][nt][c];
                            s[mb][nt][c] = KIND == SM_PLAIN ? ex2(fmaf(x, p.scale_log2, -m_use)) : ex2(x - m_use);
                            sum += s[mb][nt][c];
                        }
                    row_sum[mb][rr] = row_sum[mb][rr] * alpha[mb][rr] + sum;  // per-lane partial; the quad is summed at the end
                    if constexpr (KIND == SM_GENERIC) {  // rare tiles: rescale row by row (fewer live registers)
#pragma unroll
                        for (int d = 0; d < DT; ++d) o[mb][d][2 * rr] *= alpha[mb][rr], o[mb][d][2 * rr + 1] *= alpha[mb][rr];
                    }
                }
            // O is rescaled only when some row of the warp found a larger max (rare after the first tile).
            if constexpr (KIND != SM_GENERIC) {
                if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
                    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                        for (int d = 0; d < DT; ++d)
#pragma unroll
                            for (int c = 0; c < 4; ++c) o[mb][d][c] *= alpha[mb][c / 2];
                }
            }
        };
#ifdef RA_PROBE_SOFTMAX  // static analysis only (scripts/sass-loops.py -D): one form, to count its loop
        softmax(Kind<RA_PROBE_SOFTMAX>{});
#else
        // Soft-capped scores are not linear in the dot product: the generic form for every tile.
        const bool lin = p.cap_in == 0.f;
        if (lin && full && !rel && slope_log2 == 0.f && p.scale_log2 > 0.f) softmax(Kind<SM_PLAIN>{});
        else if (lin && full && !rel && slope_log2 != 0.f && (below || above)) softmax(Kind<SM_LINEAR>{});
        else if (lin && edge_ok) softmax(Kind<SM_EDGE>{});
        else softmax(Kind<SM_GENERIC>{});
#endif

        // P to 16 bits in the A-operand layout now, while the f32 scores die: half the registers
        // through the copy issue and P·V below.
        uint32_t pa[MB][BN / 16][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                pa[mb][kk][0] = pack2<T>(s[mb][2 * kk][0], s[mb][2 * kk][1]);
                pa[mb][kk][1] = pack2<T>(s[mb][2 * kk][2], s[mb][2 * kk][3]);
                pa[mb][kk][2] = pack2<T>(s[mb][2 * kk + 1][0], s[mb][2 * kk + 1][1]);
                pa[mb][kk][3] = pack2<T>(s[mb][2 * kk + 1][2], s[mb][2 * kk + 1][3]);
            }

        cp_async_wait<0>();
        __syncthreads();  // V_n landed; every warp finished reading K_n
        const int next = prev_tile(n - 1);
        if (next >= n_begin) issue_k(next);  // overlaps with P·V below

        // O += P V without P leaving registers; each V fragment is loaded once for the MB row blocks.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int np = 0; np < DD / 16; ++np) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, Vs + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + part * DD + np * 16 + (lane / 16) * 8);
#pragma unroll
                for (int mb = 0; mb < MB; ++mb) {
                    mma_16816<T>(o[mb][2 * np], pa[mb][kk], bv[0], bv[1]);
                    mma_16816<T>(o[mb][2 * np + 1], pa[mb][kk], bv[2], bv[3]);
                }
            }
        n = next;
    }

    // Normalise and write O and the LSE.
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float l = row_sum[mb][rr];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int row = m0 + (mb * RW + rw) * 16 + g + rr * 8;
            if (row >= sb.seqlen_q) continue;
            const RowEnd end = row_end(l, row_max[mb][rr], p.sink, h, splits == 1);
            const float inv = end.den > 0.f ? 1.f / end.den : 0.f, lse = end.lse;
            const long long tok = sb.q_start + row;
            if (splits > 1) {  // f32 partial of this split, for the combine
                float* prow = p.part_out + (((long long)split * p.total_q + tok) * p.q_heads + h) * D + part * DD;
#pragma unroll
                for (int d = 0; d < DT; ++d) {  // scalar stores: the workspace need only be 4-byte aligned
                    prow[d * 8 + 2 * t] = o[mb][d][2 * rr] * inv;
                    prow[d * 8 + 2 * t + 1] = o[mb][d][2 * rr + 1] * inv;
                }
                if (t == 0 && part == 0) p.part_lse[((long long)split * p.q_heads + h) * p.total_q + tok] = lse;
                continue;
            }
            T* orow = static_cast<T*>(p.out) + tok * p.o_row_stride + (long long)h * D + part * DD;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                const float v2[2] = {o[mb][d][2 * rr] * inv, o[mb][d][2 * rr + 1] * inv};
                store_f32<T, 2>(orow + d * 8 + 2 * t, v2);
            }
            if (t == 0 && part == 0) p.lse[(long long)h * p.total_q + tok] = lse;
        }
    // The output gate, once the block's rows are written, by the whole block (coalesced):
    // gating in the loop above made the d96 kernels spill, on sm_80 and sm_90. O is rounded
    // to T before the gate, as transformers' own product in the model's dtype rounds it.
    if (splits == 1 && p.gate.ptr != nullptr) {
        __syncthreads();  // every warp's rows are in global memory
        gate_rows<T, D>(p.gate, static_cast<T*>(p.out), p.o_row_stride, sb.q_start + m0, vq, h);
    }
}

// f32: one warp per query row; lane c owns components c, c + 32, ... K arrives pre-rotated
// (the launcher always takes the workspace path for f32), Q is rotated here in shared memory.
constexpr int ROW_WARPS = 4, ROW_MAXC = 16;  // head_dim <= 512

__device__ void attention_fwd_rows(const AttnParams& p) {
    RA_STATIC_SMEM(float, qrow, [ROW_WARPS][2][32 * ROW_MAXC]);
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
    const float temp = query_temperature(p.rope, i);  // Llama 4's, 1 without
#pragma unroll
    for (int x = 0; x < ROW_MAXC; ++x) {
        const int c = lane + 32 * x;
        qn[x] = c < D ? qrow[warp][0][c] * temp : 0.f;
        qf[x] = (rel && c < D) ? qrow[warp][1][c] * temp : 0.f;
        o[x] = 0.f;
    }
    const MaskArgs mask{p.causal, p.window, p.sinks, p.chunk};
    const float slope_log2 = p.alibi_total_heads > 0 ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + h) * LOG2E : 0.f;
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
        const float s = score_log2(p.rope, p.scale_log2, dn, df, i, sb.k_pos0 + j, slope_log2, p.cap_in, p.cap_out);
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
    const long long tok = sb.q_start + m;
    float* orow = static_cast<float*>(p.out) + tok * p.o_row_stride + (long long)h * D;
    const RowEnd end = row_end(sum, mx, p.sink, h, true);
    const float inv = end.den > 0.f ? 1.f / end.den : 0.f;
#pragma unroll
    for (int x = 0; x < ROW_MAXC; ++x) {
        const int c = lane + 32 * x;
        if (c < D) orow[c] = gated<float>(p.gate, tok, h, c, o[x] * inv);
    }
    if (lane == 0) p.lse[(long long)h * p.total_q + sb.q_start + m] = end.lse;
}

}  // namespace ra

// Two kernels per head dim and dtype (mma_fwd_launch in src/cuda/attention.rs picks):
// - attention_fwd_d<D>_<dtype> (FULL: in-kernel K rotation, ReRoPE far copies, paged K/V, key
//   splits): 4 warps x 64 keys per tile, 64 query rows; head_dim 256 takes 2 warps x 32 keys so
//   that Q, K, V and the far copies fit the 99 KB of an sm_86/89 block; head_dim 512 4 warps as
//   2 x 2 (rows x halves of the head) over 32 keys: Q, K and V at pitch 520 take 97.5 KB.
// - attention_fwd_wide_d<D>_<dtype>: 128 query rows x 64 keys up to head_dim 128, 64 x 64 at 256
//   (Q, K and V at pitch 264: exactly the 99 KB). On sm_80 head_dim 128 takes 48-key tiles: at 64,
//   ptxas's sm_80 allocation spills 20 bytes (sm_90's does not). The launcher sizes shared memory
//   for 64 keys either way. The emulator runs both tilings: 48 keys for f16, 64 for bf16.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define RA_WIDE_BN_D128(NAME) 48
#elif defined(__CUDA_ARCH__)
#define RA_WIDE_BN_D128(NAME) 64
#else
#define RA_WIDE_BN_D128_f16 48
#define RA_WIDE_BN_D128_bf16 64
#define RA_WIDE_BN_D128(NAME) RA_WIDE_BN_D128_##NAME
#endif
#define RA_FWD(T, NAME, KNAME, D, WARPS, BN, MB, FULL)                          \
    RA_KERNEL(WARPS * 32, attention_fwd_##KNAME##D##_##NAME, ra::AttnParams) { \
        ra::attention_fwd_mma<T, D, WARPS, BN, MB, FULL>(p);                     \
    }
#define RA_FWD_ALL_D(T, NAME)                                                                            \
    RA_FWD(T, NAME, d, 64, 4, 64, 1, true) RA_FWD(T, NAME, d, 80, 4, 64, 1, true)                      \
    RA_FWD(T, NAME, d, 96, 4, 64, 1, true) RA_FWD(T, NAME, d, 128, 4, 64, 1, true)                     \
    RA_FWD(T, NAME, d, 256, 2, 32, 1, true) RA_FWD(T, NAME, d, 512, 4, 32, 1, true)                      \
    RA_FWD(T, NAME, wide_d, 64, 4, 64, 2, false) RA_FWD(T, NAME, wide_d, 80, 4, 64, 2, false)          \
    RA_FWD(T, NAME, wide_d, 96, 4, 64, 2, false) RA_FWD(T, NAME, wide_d, 128, 4, RA_WIDE_BN_D128(NAME), 2, false) \
    RA_FWD(T, NAME, wide_d, 256, 4, 64, 1, false)
RA_FWD_ALL_D(__half, f16)
RA_FWD_ALL_D(__nv_bfloat16, bf16)

RA_KERNEL(ra::ROW_WARPS * 32, attention_fwd_rows_f32, ra::AttnParams) {
    ra::attention_fwd_rows(p);
}
