// Decode attention over a paged KV cache on CUDA cores (f32, and every dtype at head_dim 512;
// the other 16-bit kernels, on tensor cores, are in attention_decode_mma.cu), split along the
// keys (flash-decoding), and the kernel that appends new K/V into the cache.
//
// The cache holds *unrotated* keys: [num_pages, page_size, Hkv, D] for K and for V, pages
// picked per sequence through a caller-owned block table. Keys are rotated on the fly at
// their cached positions, so dynamic-NTK frequencies or ReRoPE stay exact at any length.
// Sequence b has context_lens[b] cached keys, the last `queries` of them the new tokens
// (1..=16, speculative decoding): query qi sits at position context_len - queries + qi.
//
// A block takes one split of the keys, one KV head and DEC_ROWS (query head, query) rows of
// its GQA group; its warps do NOT share tiles: each warp streams its own tiles of the split
// (warp w takes tiles w, w + 4, ...) through its own double-buffered shared memory with
// cp.async, so the loop has no block barrier, only __syncwarp, and every warp has a tile in
// flight while it works on the one before. Within a warp, G lanes share a key (FlashInfer's
// layout): each lane owns D / 2G rotation pairs of the head, rotates its pieces of the key,
// dots them with the rows' rotated queries (shared memory, broadcast) and G lanes add up the
// score by shuffles; the same lane accumulates those components of O from V, so P·V needs no
// shuffles at all. The warps' (m, l, O) are merged once at the end (decode.cuh). Splits > 1
// write f32 partials that merge.cu combines.
//
// Rotation by composition (tile.cuh's idea, per tile): e^{iθ(j0 + t)} = e^{iθ j0} · e^{iθ t},
// the first exact per tile and pair (shared by the warp), the second from an exact table of
// the tile's offsets made once per block. The attention factor is folded into Q (it scales
// both rotated sides, so the product carries its square).
#include "decode.cuh"

namespace ra {

constexpr int DEC_WARPS = 4, DEC_ROWS = 4;

// Keys per warp tile: a warp's K and V tiles, double-buffered, take 8 KB (head_dim rounded
// up to a power of two), so a block of four warps stages 32 KB and shared memory leaves room
// for the three blocks per SM that the registers allow. Head dim 512 takes 256's tile (16 KB
// a warp): the warps' merge at the end needs 32 KB of f32 O, which then fits in the staging.
__host__ __device__ constexpr int decode_tile_keys(int d, int elem_bytes) {
    return 2048 / ((d <= 64 ? 64 : d <= 128 ? 128 : 256) * elem_bytes);
}

// How a warp's lanes share a key: G lanes per key, SLOTS keys at once, PPL pairs per lane
// (4 at head_dim 64, 128 and 256; 5 at 80, 3 at 96). Few pairs per lane keep the lane's O
// accumulators (2 PPL components x 4 rows) small enough for three blocks per SM; measured on
// an H100 against 8 lanes per key and 16-key tiles at two blocks per SM: equal at short
// contexts, 1.25x faster on 16 sequences of 32k keys.
template <int D> struct DecLanes {
    static constexpr int G = D > 128 ? 32 : D > 80 ? 16 : 8;
    static constexpr int SLOTS = 32 / G;
    static constexpr int PPL = D / 2 / G;
};

// Where a lane's pairs sit in a row: two runs of PPL (rotate_half with every pair rotated, or
// no RoPE), one run of 2 PPL interleaved (interleaved, every pair rotated), or anywhere
// (partial rotary: head_pair per pair, scalar loads).
enum PairLoad { LOAD_HALF = 0, LOAD_INTERLEAVED = 1, LOAD_ANY = 2 };

// N consecutive elements to f32 with the widest aligned vectors N elements allow (the run
// starts at a multiple of N elements of a 16-byte-aligned row).
template <typename T, int N>
__device__ __forceinline__ void load_run(const T* src, float (&out)[N]) {
    constexpr int BYTES = N * static_cast<int>(sizeof(T));
    constexpr int VB = BYTES % 16 == 0 ? 16 : BYTES % 8 == 0 ? 8 : BYTES % 4 == 0 ? 4 : static_cast<int>(sizeof(T));
    constexpr int V = VB / static_cast<int>(sizeof(T));
#pragma unroll
    for (int i = 0; i < N / V; ++i) {
        float t[V];
        load_f32<T, V>(src + i * V, t);
#pragma unroll
        for (int u = 0; u < V; ++u) out[i * V + u] = t[u];
    }
}

// The lane's pairs (g * PPL + k) of a staged row: x0 = first components, x1 = second.
template <typename T, int D>
__device__ __forceinline__ void load_pairs(const T* row, int how, int g, const RopeArgs& a,
                                           float (&x0)[DecLanes<D>::PPL], float (&x1)[DecLanes<D>::PPL]) {
    constexpr int PPL = DecLanes<D>::PPL;
    if (how == LOAD_HALF) {
        load_run<T, PPL>(row + g * PPL, x0);
        load_run<T, PPL>(row + D / 2 + g * PPL, x1);
    } else if (how == LOAD_INTERLEAVED) {
        float t[2 * PPL];
        load_run<T, 2 * PPL>(row + 2 * g * PPL, t);
#pragma unroll
        for (int k = 0; k < PPL; ++k) x0[k] = t[2 * k], x1[k] = t[2 * k + 1];
    } else {
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
            int ia, ib;
            head_pair(g * PPL + k, a.rotary_dim, a.interleaved, D, ia, ib);
            x0[k] = to_f32(row[ia]);
            x1[k] = to_f32(row[ib]);
        }
    }
}

// PPL consecutive (cos, sin) entries (16-byte loads when PPL is even: the entries start at an
// even index of a 16-byte-aligned table).
template <int PPL>
__device__ __forceinline__ void load_cs(const float2* src, float2 (&out)[PPL]) {
    if constexpr (PPL % 2 == 0) {
#pragma unroll
        for (int k = 0; k < PPL; k += 2) {
            RA_VECTOR_ACCESS(src + k, 16);
            const float4 v = *reinterpret_cast<const float4*>(src + k);
            out[k] = make_float2(v.x, v.y);
            out[k + 1] = make_float2(v.z, v.w);
        }
    } else {
#pragma unroll
        for (int k = 0; k < PPL; ++k) out[k] = src[k];
    }
}

template <typename T, int D>
__device__ void decode_body(const DecodeParams& p) {
    constexpr int G = DecLanes<D>::G, SLOTS = DecLanes<D>::SLOTS, PPL = DecLanes<D>::PPL, H2 = D / 2;
    constexpr int BT = decode_tile_keys(D, sizeof(T)), UPT = BT / SLOTS, R = DEC_ROWS;
    static_assert(R == 4 && BT % SLOTS == 0 && 32 % BT == 0, "tiles hold whole slots and divide the split alignment");
    const RopeArgs& ra = p.rope;
    const bool rope = ra.rotary_dim > 0;
    const bool rel = rope && ra.relative != REL_NONE, leaky = rope && ra.relative == REL_LEAKY;
    const int half = ra.rotary_dim / 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slot = lane / G, g = lane % G;
    const int how = (ra.rotary_dim == 0 || (ra.rotary_dim == D && !ra.interleaved)) ? LOAD_HALF
                    : ra.rotary_dim == D                                          ? LOAD_INTERLEAVED
                                                                                  : LOAD_ANY;

    // Shared memory (src/cuda/decode.rs, decode_smem_bytes, sizes it): per warp its staged K
    // and V tiles [2][BT][D] each (as cached); Q rotated [R][D/2] (pairs) and with ReRoPE its far
    // copy; the offsets' (cos, sin) [BT][D/2] (and Leaky's); per warp the tile's bases [D/2]
    // (and Leaky's), its tile's scores [BT][R] and cache slots [BT]. Every piece is a multiple of 16 bytes.
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* Kst = reinterpret_cast<T*>(smem_raw) + warp * 4 * BT * D;
    T* Vst = Kst + 2 * BT * D;
    float2* Qn = reinterpret_cast<float2*>(smem_raw + DEC_WARPS * 4 * BT * D * sizeof(T));
    float2* Qf = Qn + R * H2;
    float2* Off = Qf + (rel ? R * H2 : 0);
    float2* Offl = Off + BT * H2;
    float2* Bases = Offl + (leaky ? BT * H2 : 0);  // [DEC_WARPS][D/2] (x2 with Leaky)
    float2* Base = Bases + warp * H2 * (leaky ? 2 : 1);
    float2* Basel = Base + H2;
    float* Scores = reinterpret_cast<float*>(Bases + DEC_WARPS * H2 * (leaky ? 2 : 1));  // [DEC_WARPS][BT][R]
    float* Sc = Scores + warp * BT * R;
    int* Slots = reinterpret_cast<int*>(Scores + DEC_WARPS * BT * R) + warp * BT;

    const int split = blockIdx.x, b = blockIdx.z;
    const MaskArgs mask{p.causal, p.window, p.sinks, p.chunk};
    const DecodeSpan span = decode_span(p, b, split, mask);
    const int ctx = span.ctx, k_begin = span.k_begin, k_end = span.k_end;
    const DecodeRows rw = decode_rows<R>(p, ctx);
    const int kvh = rw.kvh, rows = rw.rows;

    // Q rotated to the rows' positions and its far copy for ReRoPE (decode.cuh); the offset tables.
    for (int e = threadIdx.x; e < R * H2; e += blockDim.x) {
        int ia, ib;
        float2 x, f;
        rotated_query_pair<T, D>(p, rw, b, e / H2, e % H2, rel, leaky, ia, ib, x, f);
        Qn[e] = x;
        if (rel) Qf[e] = f;
    }
    for (int e = threadIdx.x; e < BT * half; e += blockDim.x) {
        const int t = e / half, P = e % half;
        Off[t * H2 + P] = pair_cs(t, pair_freq(ra, P), 1.f);
        if (leaky) Offl[t * H2 + P] = pair_cs(t, pair_freq_leak(ra, P), 1.f);
    }
    __syncthreads();  // the only barrier before the end: the warps now run independently

    // Per row: ALiBi slope (log2 units) and position, once (a row's position divides by the query count).
    float slope[R];
    int ipos[R];
#pragma unroll
    for (int x = 0; x < R; ++x) {
        slope[x] = (p.alibi_total_heads > 0 && x < rows) ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + rw.head(x)) * LOG2E : 0.f;
        ipos[x] = rw.pos(x);
    }

    DecodeWalk<BT, false> walk{p, span, mask, b, DEC_WARPS, lane};
    // Stage tile n's K and V into buffer buf as one cp.async group.
    auto stage = [&](int n, int buf, int slot) {
        stage_kv_tile<T, D, D, BT>(Kst + buf * BT * D, Vst + buf * BT * D, Slots, p, kvh, walk.keys(n), slot, lane);
    };

    float m[R], l[R], o0[R][PPL], o1[R][PPL];
#pragma unroll
    for (int x = 0; x < R; ++x) {
        m[x] = -INFINITY;
        l[x] = 0.f;
#pragma unroll
        for (int k = 0; k < PPL; ++k) o0[x][k] = o1[x][k] = 0.f;
    }

    int buf = 0;
    walk.begin(warp, stage);
    while (walk.has(walk.cur)) {
        const int j0 = k_begin + walk.cur * BT, vk = walk.keys(walk.cur);
        const bool more = walk.stage_next(buf ^ 1, stage);  // the next tile's copies, the one after's table reads
        // The tile's bases, exact, shared by the warp (while its copies land).
        if (rope) {
            for (int P = lane; P < half; P += 32) {
                Base[P] = pair_cs(j0, pair_freq(ra, P), 1.f);
                if (leaky) Basel[P] = pair_cs(j0, pair_freq_leak(ra, P), 1.f);
            }
        }
        if (more) cp_async_wait<1>();  // this lane's copies of tile n landed ...
        else cp_async_wait<0>();
        __syncwarp();  // ... and every lane's; the bases are written
        // Whole tile seen by every row, no ALiBi, no ReRoPE, no soft-capping (the common decode
        // step): scores need no per-key mask or bias.
        const bool plain = !rel && p.alibi_total_heads == 0 && p.cap_in == 0.f && vk == BT &&
                           tile_fully_visible(mask, ctx - p.queries, ctx, j0, j0 + BT);
        const T* Kt = Kst + buf * BT * D;
        const T* Vt = Vst + buf * BT * D;

        // Scores: lane slot + SLOTS·u of the tile, its G lanes' partial dots summed by shuffles.
        // Each key's masked scores go to the warp's score tile [BT][R] (one lane of the G writes),
        // so the loops below need no per-key register arrays (those pushed ptxas into spills).
#pragma unroll 2
        for (int u = 0; u < UPT; ++u) {
            const int t = slot + SLOTS * u;
            float k0[PPL], k1[PPL];
            load_pairs<T, D>(Kt + t * D, how, g, ra, k0, k1);
            float dn[R], df[R];
#pragma unroll
            for (int x = 0; x < R; ++x) dn[x] = df[x] = 0.f;
            if (rel) {  // far: raw keys (ReRoPE) or rotated to j / k (Leaky)
                float f0[PPL], f1[PPL];
#pragma unroll
                for (int k = 0; k < PPL; ++k) f0[k] = k0[k], f1[k] = k1[k];
                if (leaky) {
                    float2 of[PPL], bl[PPL];  // reloaded per key: registers are the scarce resource here
                    load_cs<PPL>(Offl + t * H2 + g * PPL, of);
                    load_cs<PPL>(Basel + g * PPL, bl);
#pragma unroll
                    for (int k = 0; k < PPL; ++k) {
                        if (g * PPL + k < half) {
                            const float2 c = cmul(bl[k], of[k]);
                            rotate_pair(f0[k], f1[k], c.x, c.y);
                        }
                    }
                }
#pragma unroll
                for (int x = 0; x < R; ++x) {
                    float2 q[PPL];
                    load_cs<PPL>(Qf + x * H2 + g * PPL, q);
#pragma unroll
                    for (int k = 0; k < PPL; ++k) df[x] = fmaf(q[k].x, f0[k], fmaf(q[k].y, f1[k], df[x]));
                }
            }
            float2 of[PPL], bs[PPL];
            if (rope) load_cs<PPL>(Off + t * H2 + g * PPL, of), load_cs<PPL>(Base + g * PPL, bs);
#pragma unroll
            for (int k = 0; k < PPL; ++k) {
                if (rope && g * PPL + k < half) {
                    const float2 c = cmul(bs[k], of[k]);
                    rotate_pair(k0[k], k1[k], c.x, c.y);
                }
            }
            // The rows' queries come from shared memory (broadcast within a slot): in registers
            // they would push the kernel past 255 registers.
#pragma unroll
            for (int x = 0; x < R; ++x) {
                float2 q[PPL];
                load_cs<PPL>(Qn + x * H2 + g * PPL, q);
#pragma unroll
                for (int k = 0; k < PPL; ++k) dn[x] = fmaf(q[k].x, k0[k], fmaf(q[k].y, k1[k], dn[x]));
            }
#pragma unroll
            for (int x = 0; x < R; ++x) {
#pragma unroll
                for (int off = 1; off < G; off *= 2) {
                    dn[x] += __shfl_xor_sync(0xffffffffu, dn[x], off);
                    if (rel) df[x] += __shfl_xor_sync(0xffffffffu, df[x], off);
                }
                if (plain) {
                    dn[x] = x < rows ? dn[x] * p.scale_log2 : -INFINITY;
                } else {
                    const int i = ipos[x], j = j0 + t;
                    const bool seen = x < rows && t < vk && visible(mask, i, j);
                    dn[x] = seen ? score_log2(ra, p.scale_log2, dn[x], df[x], i, j, slope[x], p.cap_in, p.cap_out) : -INFINITY;
                }
            }
            if (g == 0) *reinterpret_cast<float4*>(Sc + t * R) = make_float4(dn[0], dn[1], dn[2], dn[3]);
        }
        __syncwarp();  // the score tile is complete

        // Online softmax per row (log2 domain): the max over the warp's tile, so rescaling is
        // warp-uniform; l and O stay per slot (each slot sums its own keys) until the end.
        float4 tmax = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
#pragma unroll
        for (int u = 0; u < UPT; ++u) {
            const float4 v = *reinterpret_cast<const float4*>(Sc + (slot + SLOTS * u) * R);
            tmax = make_float4(fmaxf(tmax.x, v.x), fmaxf(tmax.y, v.y), fmaxf(tmax.z, v.z), fmaxf(tmax.w, v.w));
        }
        float m_use[R];
#pragma unroll
        for (int x = 0; x < R; ++x) {
            float tm = x == 0 ? tmax.x : x == 1 ? tmax.y : x == 2 ? tmax.z : tmax.w;
#pragma unroll
            for (int off = G; off < 32; off *= 2) tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, off));
            const float m_new = fmaxf(m[x], tm);
            m_use[x] = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m[x] - m_use[x]);
            m[x] = m_new;
            l[x] *= alpha;
#pragma unroll
            for (int k = 0; k < PPL; ++k) o0[x][k] *= alpha, o1[x][k] *= alpha;
        }

        // O += P V: the lane's components of its slot's keys.
#pragma unroll 2
        for (int u = 0; u < UPT; ++u) {
            const int t = slot + SLOTS * u;
            const float4 v = *reinterpret_cast<const float4*>(Sc + t * R);
            float pr[R] = {v.x, v.y, v.z, v.w};
            float v0[PPL], v1[PPL];
            load_pairs<T, D>(Vt + t * D, how, g, ra, v0, v1);
#pragma unroll
            for (int x = 0; x < R; ++x) {
                pr[x] = exp2f(pr[x] - m_use[x]);
                l[x] += pr[x];
#pragma unroll
                for (int k = 0; k < PPL; ++k) {
                    o0[x][k] = fmaf(pr[x], v0[k], o0[x][k]);
                    o1[x][k] = fmaf(pr[x], v1[k], o1[x][k]);
                }
            }
        }
        __syncwarp();  // every lane is done with buffer buf and the bases before they are refilled
        walk.advance();
        buf ^= 1;
    }

    // Sum the slots (each saw its own keys, under the same warp-uniform max) ...
#pragma unroll
    for (int x = 0; x < R; ++x) {
#pragma unroll
        for (int off = G; off < 32; off *= 2) {
            l[x] += __shfl_xor_sync(0xffffffffu, l[x], off);
#pragma unroll
            for (int k = 0; k < PPL; ++k) {
                o0[x][k] += __shfl_xor_sync(0xffffffffu, o0[x][k], off);
                o1[x][k] += __shfl_xor_sync(0xffffffffu, o1[x][k], off);
            }
        }
    }
    // ... then the warps, through shared memory (the staging buffers, now free).
    __syncthreads();
    float* Wo = reinterpret_cast<float*>(smem_raw);  // [DEC_WARPS][R][D]
    float* Wm = Wo + DEC_WARPS * R * D;             // [DEC_WARPS][R]
    float* Wl = Wm + DEC_WARPS * R;
    if (slot == 0) {
#pragma unroll
        for (int x = 0; x < R; ++x) {
#pragma unroll
            for (int k = 0; k < PPL; ++k) {
                int ia, ib;
                head_pair(g * PPL + k, ra.rotary_dim, ra.interleaved, D, ia, ib);
                Wo[(warp * R + x) * D + ia] = o0[x][k];
                Wo[(warp * R + x) * D + ib] = o1[x][k];
            }
            if (lane == 0) {
                Wm[warp * R + x] = m[x];
                Wl[warp * R + x] = l[x];
            }
        }
    }
    __syncthreads();
    store_decode_rows<T, D, R>(p, Wo, Wm, Wl, DEC_WARPS, rw, b, split);
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
    const bool v_norm = p.v_norm_eps > 0.f;
    for (int c = threadIdx.x; c < row; c += blockDim.x) {
        kd[c] = k[c];
        if (!v_norm) vd[c] = v[c];
    }
    if (!v_norm) return;
    // Gemma 3n's and Gemma 4's v_norm fused into the append (no pass over V of its own): each
    // head's RMS norm without weights, in f32 as transformers' Gemma3nRMSNorm(with_scale=False)
    // computes it, rounded once to T as it is cached. A warp per head (the early return above
    // is the whole block's, so every lane reaches the shuffles).
    const int lane = threadIdx.x % 32, d = p.head_dim;
    for (int h = threadIdx.x / 32; h < p.kv_heads; h += blockDim.x / 32) {
        const T* vh = v + (long long)h * d;
        float s = 0.f;
        for (int c = lane; c < d; c += 32) {
            const float x = to_f32(vh[c]);
            s = fmaf(x, x, s);
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float r = rsqrtf(s / static_cast<float>(d) + p.v_norm_eps);
        for (int c = lane; c < d; c += 32) vd[(long long)h * d + c] = from_f32<T>(to_f32(vh[c]) * r);
    }
}

}  // namespace ra

// One f32 decode kernel per head dim (the lane layout depends on it):
// attention_decode_d{64,80,96,128,256,512}_f32, and at 512 the 16-bit ones too (a tensor-core
// warp's O over 16 rows of 512 would take 256 registers; here a lane holds 8 pairs of 4 rows),
// and at 256 the 16-bit ones chunked attention takes (attention_decode_cores_d256_*); the paged
// append for every dtype.
#define RA_DECODE_D(D) \
    RA_KERNEL_MIN_BLOCKS(ra::DEC_WARPS * 32, 3, attention_decode_d##D##_f32, ra::DecodeParams) { ra::decode_body<float, D>(p); }
RA_DECODE_D(64)
RA_DECODE_D(80)
RA_DECODE_D(96)
RA_DECODE_D(128)
RA_DECODE_D(256)
// Head dim 512: two blocks per SM (the 88 KB of shared memory allow no more on an H100; at
// three, ptxas's 168-register budget spilled a lane's 64 accumulators and 16 key components).
#define RA_DECODE_D512(T, NAME) \
    RA_KERNEL_MIN_BLOCKS(ra::DEC_WARPS * 32, 2, attention_decode_d512_##NAME, ra::DecodeParams) { ra::decode_body<T, 512>(p); }
RA_FOR_EACH_DTYPE(RA_DECODE_D512)
// The 16-bit decode at head_dim 256 with chunked attention: the tensor-core kernel's 256 build
// leaves chunks out (at 255 registers they would spill), so those calls run here:
// attention_decode_cores_d256_{f16,bf16} (the tensor-core ones keep the plain names).
#define RA_DECODE_D256_CHUNKED(T, NAME) \
    RA_KERNEL_MIN_BLOCKS(ra::DEC_WARPS * 32, 3, attention_decode_cores_d256_##NAME, ra::DecodeParams) { ra::decode_body<T, 256>(p); }
RA_DECODE_D256_CHUNKED(__half, f16)
RA_DECODE_D256_CHUNKED(__nv_bfloat16, bf16)
#define RA_APPEND(T, NAME) \
    RA_KERNEL(128, paged_append_##NAME, ra::AppendParams) { ra::append_body<T>(p); }
RA_FOR_EACH_DTYPE(RA_APPEND)
