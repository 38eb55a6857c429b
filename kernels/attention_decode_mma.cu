// Decode attention over a paged KV cache on tensor cores (f16, bf16), split along the keys
// (flash-decoding). Same contract as attention_decode.cu (its header says what the cache,
// the positions and the splits are); this is the kernel the 16-bit calls run.
//
// Why tensor cores for a memory-bound step: the CUDA-core kernel spends ~140 warp instructions
// per cached key (dot products and P·V as FMAs, shuffles to add up each score), several times
// what the memory system leaves per key on an H100. Here a block's 16 (query head, query) rows
// are the M dimension of mma.sync m16n8k16: S = Q·Kᵀ and O += P·V cost 2·D/16 mma per 8 keys
// per warp whatever the GQA group (up to 16 rows, e.g. 4 query heads × 4 speculative tokens, at
// no extra cost), and what is left per key is the rotation of the key.
//
// Layout. A block takes one split, one KV head and 16 rows. Its warps (4, fewer where shared
// memory would pass 99 KB: the launcher's choice) do not share tiles: warp w of W streams tiles
// w, w + W, ... of 16 keys through its own double-buffered shared memory
// (cp.async; no block barrier in the loop). Per tile: ldmatrix the K tile as B fragments, rotate
// them in registers, S = Q·Kᵀ (Q from shared memory, rotated once), online softmax in f32 on
// the accumulators, P to 16 bits as the A operand, O += P·V (V by ldmatrix.trans). The warps'
// (m, l, O) merge once at the end (decode.cuh).
//
// Rotation in registers. Thread (g, t)'s B fragments of a 16-key tile hold keys g and g + 8,
// components 16ks + 8h + 2t + {0, 1}: both halves of every rotate_half pair when the whole head
// rotates (component c pairs with c + D/2, same t), and every interleaved pair inside one 32-bit
// register. The angle of key j0 + 8a + u (u < 8) is composed, e^{iθ(j0 + 8a + u)} =
// e^{iθ(j0 + 8a)} · e^{iθ u}: an exact base per tile and pair (and its product with the exact
// e^{8iθ} for the second 8 keys), shared by the warp, times an exact table of the offsets u made
// once per block (tile.cuh's argument: as exact as a direct evaluation). The exact base costs
// a reduction and a sincospif per pair (a 75-instruction loop), two per lane per tile at head
// dim 128: about a seventh of the tile's work. With base_steps = S > 1 (a power of two, the
// launcher's choice where the table costs the SM no resident block and the warp runs enough
// tiles) a warp evaluates one exact anchor per S of its tiles instead, and the tile's two bases
// are the anchor times an exact per-block table of the steps e^{iθ(16Wm + 8h)} (m < S, h = 0,
// 1): still three exact factors per key, as the second 8 keys always had (tests/
// angle_precision.rs replays both). Partial rotary in the rotate_half layout (the pairs
// straddle other components) rotates the staged tile in shared memory instead. The attention factor is folded into Q (as its square: keys rotate without it).
//
// ReRoPE / Leaky ReRoPE: a second product with the far copy of Q (rotated to w, or to
// w + (i - w)/k) against the raw keys, or against keys rotated to j/k (the Leaky frequencies);
// per score the distance picks near or far (SPEC §3).
#include "decode.cuh"

namespace ra {

constexpr int DMMA_MAX_WARPS = 4, DMMA_ROWS = 16, DMMA_TILE = 16;

// How a warp rotates its K tiles.
enum KeyRot {
    KR_NONE = 0,   // no RoPE, or a pre-rotated cache
    KR_HALF = 1,   // rotate_half over the whole head: in registers
    KR_INTER = 2,  // interleaved pairs (partial too): in registers
    KR_SMEM = 3,   // rotate_half with partial rotary (and interleaved at head_dim 256): in shared memory
};

// The two 16-bit values of an mma operand register as f32 (low half first).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
    const T* h = reinterpret_cast<const T*>(&u);
    return make_float2(to_f32(h[0]), to_f32(h[1]));
}

// Two consecutive (cos, sin) entries of a 16-byte-aligned table.
__device__ __forceinline__ float4 load_cs2(const float2* src) {
    RA_VECTOR_ACCESS(src, 16);
    return *reinterpret_cast<const float4*>(src);
}

template <int K> struct DecKind {
    static constexpr int value = K;
};

// Key n-tiles (8 keys) a warp holds as B fragments at once: both of a tile's, or at head_dim
// 256 one at a time (its O accumulators take 128 registers; two n-tiles' fragments would spill).
// Interleaved pairs rotate in registers up to head_dim 128; at 256 in shared memory (KR_SMEM),
// whose code is lighter on the registers there.
template <int D> struct DecFrag {
    static constexpr int NTP = D > 128 ? 1 : 2;
    static constexpr bool REG_INTER = D <= 128;
    // Row pitch of the offset table (float2). Unpadded: a quarter-warp's 16-byte loads of rows g
    // and g + 1 then share banks (two wavefronts where one would do, 8 loads per tile), but 64
    // bytes of padding per row would cost an A100 its second block per SM at head_dim 128.
    static constexpr int OP = D / 2;
};

// Rotate B fragments of NTP n-tiles (from n-tile nt0) of a 16-key tile in registers (mode
// KR_HALF or KR_INTER; anything else leaves them). kf[ks][2·n + h] holds key 8(nt0 + n) + g of
// the tile, components 16ks + 8h + 2t and the next. base [2][D/2]: (cos, sin) per pair at the
// tile's keys 0 and 8; off [8][D/2]: per offset.
template <typename T, int D, int NTP>
__device__ __forceinline__ void rotate_fragments(uint32_t (&kf)[D / 16][2 * NTP], int nt0, int mode, int half,
                                                 const float2* base, const float2* off, int g, int t) {
    constexpr int H2 = D / 2, KS = D / 16;
    if (mode == KR_HALF) {
        // Slot (ks, h) covers components b .. b + 8 (b = 16ks + 8h); for b < D/2 its partners
        // b + D/2 .. sit in slot (ks2, h2), same t (D/2 is a multiple of 8 at every head dim).
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int b = 16 * ks + 8 * h;
                if (b >= H2) continue;
                const int ks2 = (b + H2) / 16, h2 = ((b + H2) % 16) / 8;
                const int pr = b + 2 * t;  // this thread's pairs pr, pr + 1
                const float4 of = load_cs2(off + g * DecFrag<D>::OP + pr);
#pragma unroll
                for (int n = 0; n < NTP; ++n) {
                    const float4 bs = load_cs2(base + (nt0 + n) * H2 + pr);
                    const float2 c0 = cmul(make_float2(bs.x, bs.y), make_float2(of.x, of.y));
                    const float2 c1 = cmul(make_float2(bs.z, bs.w), make_float2(of.z, of.w));
                    float2 x = unpack2<T>(kf[ks][2 * n + h]), y = unpack2<T>(kf[ks2][2 * n + h2]);
                    rotate_pair(x.x, y.x, c0.x, c0.y);
                    rotate_pair(x.y, y.y, c1.x, c1.y);
                    kf[ks][2 * n + h] = pack2<T>(x.x, x.y);
                    kf[ks2][2 * n + h2] = pack2<T>(y.x, y.y);
                }
            }
    } else if (DecFrag<D>::REG_INTER && mode == KR_INTER) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int pr = 8 * ks + 4 * h + t;  // components 2pr, 2pr + 1: one register
                if (pr >= half) continue;            // pass-through (partial rotary)
                const float2 of = off[g * DecFrag<D>::OP + pr];
#pragma unroll
                for (int n = 0; n < NTP; ++n) {
                    const float2 c = cmul(base[(nt0 + n) * H2 + pr], of);
                    float2 x = unpack2<T>(kf[ks][2 * n + h]);
                    rotate_pair(x.x, x.y, c.x, c.y);
                    kf[ks][2 * n + h] = pack2<T>(x.x, x.y);
                }
            }
    }
}

// KR_SMEM: a warp rotates a staged 16-key tile from src into dst (pitch LD): pairs by layout,
// pass-through components copied. Rows past the valid keys are zeros in src and stay zeros.
template <typename T, int D, int LD, int BT>
__device__ __forceinline__ void rotate_tile_warp(T* dst, const T* src, const RopeArgs& a, const float2* base,
                                                 const float2* off, int lane) {
    constexpr int H2 = D / 2;
    const int half = a.rotary_dim / 2;
    for (int e = lane; e < BT * half; e += 32) {
        const int row = e / half, pr = e % half;
        int ia, ib;
        pair_index(a.interleaved, a.rotary_dim, pr, ia, ib);
        const float2 c = cmul(base[(row / 8) * H2 + pr], off[(row % 8) * DecFrag<D>::OP + pr]);
        float x0 = to_f32(src[row * LD + ia]), x1 = to_f32(src[row * LD + ib]);
        rotate_pair(x0, x1, c.x, c.y);
        dst[row * LD + ia] = from_f32<T>(x0);
        dst[row * LD + ib] = from_f32<T>(x1);
    }
    const int rest = D - a.rotary_dim;
    for (int e = lane; e < BT * rest; e += 32) {
        const int row = e / rest, c = a.rotary_dim + e % rest;
        dst[row * LD + c] = src[row * LD + c];
    }
}

template <typename T, int D>
__device__ void decode_mma_body(const DecodeParams& p) {
    constexpr int R = DMMA_ROWS, BT = DMMA_TILE, LD = D + 8, H2 = D / 2, KS = D / 16, DT = D / 8, OP = DecFrag<D>::OP;
    static_assert(SPLIT_ALIGN_KEYS % BT == 0, "splits start on tiles");
    const RopeArgs& ra = p.rope;
    const bool rope = ra.rotary_dim > 0;
#ifdef RA_PROBE_DECODE  // static analysis only (scripts/sass-loops.py -D): one rotation mode, no ReRoPE
    const bool rel = false, leaky = false;
    const int mode = RA_PROBE_DECODE;
#else
    const bool rel = rope && ra.relative != REL_NONE, leaky = rope && ra.relative == REL_LEAKY;
    const int mode = !rope ? KR_NONE
                     : ra.interleaved ? (DecFrag<D>::REG_INTER ? KR_INTER : KR_SMEM)
                     : ra.rotary_dim == D ? KR_HALF : KR_SMEM;
#endif
    const int half = ra.rotary_dim / 2;
    const int W = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    // Tiles per exact base (see the header): only up to head_dim 128 (the anchors' registers
    // would cost the 256 kernel spills), never with Leaky (its second set of bases).
    int steps = 1;
    if constexpr (D <= 128) steps = rope && !leaky && p.base_steps > 1 ? p.base_steps : 1;
#ifdef RA_PROBE_STEPS  // static analysis only: one way of making the bases
    steps = RA_PROBE_STEPS;
#endif
    // Shared memory (decode_mma_layout in src/cuda/decode.rs sizes it; every piece a multiple of
    // 16 bytes): per warp its K and V tiles [2][BT][LD] each; Q rotated [R][LD] and with ReRoPE
    // its far copy; the offsets' (cos, sin) [8][OP] and e^{8iθ} [OP] (and Leaky's); per warp
    // the tile's bases at keys 0 and 8 [2][D/2] (and Leaky's); with base steps their table
    // [2][steps][half] (sized for D/2); per warp its cache slots [BT]; with
    // KR_SMEM per warp a rotated tile [BT][LD] at head_dim 256 or with Leaky ReRoPE (for its far
    // keys; the near keys rotate in place up to 128); with ReRoPE per lane its 8 far scores.
    RA_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* Kst = reinterpret_cast<T*>(smem_raw) + warp * 4 * BT * LD;
    T* Vst = Kst + 2 * BT * LD;
    T* Qs = reinterpret_cast<T*>(smem_raw) + W * 4 * BT * LD;
    T* Qf = Qs + R * LD;
    float2* Off = reinterpret_cast<float2*>(Qf + (rel ? R * LD : 0));
    float2* Offl = Off + 9 * OP;
    float2* Bases = Offl + (leaky ? 9 * OP : 0);  // [W][2][D/2] (x2 with Leaky)
    float2* Base = Bases + warp * 2 * H2 * (leaky ? 2 : 1);
    float2* Basel = Base + 2 * H2;
    float2* Steps = Bases + W * 2 * H2 * (leaky ? 2 : 1);
    int* AllSlots = reinterpret_cast<int*>(Steps + (steps > 1 ? steps * 2 * H2 : 0));
    int* Slots = AllSlots + warp * BT;
    T* Krot = reinterpret_cast<T*>(AllSlots + W * BT) + warp * BT * LD;
    // The far scores wait here, each lane's own 8, while the near product runs: in registers
    // they would push the head_dim-256 kernel into spills.
    float4* Sfar = reinterpret_cast<float4*>(reinterpret_cast<T*>(AllSlots + W * BT) + (mode == KR_SMEM && (leaky || D > 128) ? W * BT * LD : 0)) +
                   2 * threadIdx.x;

    const int split = blockIdx.x, b = blockIdx.z;
    // Chunked attention up to head_dim 128 (the launcher refuses it at 256, whose registers it
    // would push into spills): at 256 the chunk code compiles away.
    constexpr bool CHUNKS = D <= 128;
    const MaskArgs mask{p.causal, p.window, p.sinks, CHUNKS ? p.chunk : 0};
    const DecodeSpan span = decode_span(p, b, split, mask);
    const int ctx = span.ctx, k_begin = span.k_begin, k_end = span.k_end;
    const DecodeRows rw = decode_rows<R>(p, ctx);
    const int kvh = rw.kvh, rows = rw.rows;

    DecodeWalk<BT> walk{p, span, mask, b, W, lane};
    auto stage = [&](int n, int buf, int slot) {
        stage_kv_tile<T, D, LD, BT>(Kst + buf * BT * LD, Vst + buf * BT * LD, Slots, p, kvh, walk.keys(n), slot, lane);
    };
    // The warp's first tile on its way (its table reads, then its copies) before the prologue's
    // trigonometry, which then hides their latency instead of waiting in front of them (at head
    // dim 256 after it: the walk's state held across the prologue costs that kernel spills).
    if constexpr (D <= 128) walk.begin(warp, stage);

    // Q rotated to the rows' positions and its far copy for ReRoPE (decode.cuh), rounded once to
    // T; rows past `rows` zero. The offset tables, and the base steps.
    for (int e = threadIdx.x; e < R * H2; e += blockDim.x) {
        const int r = e / H2;
        int ia, ib;
        float2 x, f;
        rotated_query_pair<T, D>(p, rw, b, r, e % H2, rel, leaky, ia, ib, x, f);
        Qs[r * LD + ia] = from_f32<T>(x.x);
        Qs[r * LD + ib] = from_f32<T>(x.y);
        if (rel) {
            Qf[r * LD + ia] = from_f32<T>(f.x);
            Qf[r * LD + ib] = from_f32<T>(f.y);
        }
    }
    for (int e = threadIdx.x; e < 9 * half; e += blockDim.x) {  // offsets 0..7, and 8
        const int u = e / half, P = e % half;
        Off[u * OP + P] = cs_scaled(angle_turns(u, pair_freq(ra, P)), 1.f);
        if (leaky) Offl[u * OP + P] = cs_scaled(angle_turns(u, pair_freq_leak(ra, P)), 1.f);
    }
    if (steps > 1) {  // Steps[h][m]: the step 16Wm + 8h keys (tile.cuh's table filler; rows of `half` pairs)
        fill_rotation_table(Steps, ra, 0, BT * W, steps, 1.f);
        fill_rotation_table(Steps + steps * half, ra, 8, BT * W, steps, 1.f);
    }
    // With chunks, each row's visible keys past the sinks, [lo, hi] (mask.cuh, row_keys: the
    // causal, window and chunk bounds at once; a division per row here where the chunk test
    // would take one per key in the softmax), and the first and last query's chunk starts.
    RA_STATIC_SMEM(RowKeys, row_keys_of, [R]);
    RA_STATIC_SMEM(int, query_chunks, [2]);
    if (CHUNKS && mask.chunk > 0) {
        if (threadIdx.x < R) row_keys_of[threadIdx.x] = row_keys(mask, rw.pos(threadIdx.x));
        if (threadIdx.x < 2) query_chunks[threadIdx.x] = chunk_start(mask, threadIdx.x == 0 ? ctx - p.queries : ctx - 1);
    }
    __syncthreads();  // the only barrier before the end: the warps now run independently

    // This thread's rows g and g + 8: position, ALiBi slope (log2 units).
    int ipos[2];
    float slope[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = g + 8 * rr;
        ipos[rr] = rw.pos(r);
        slope[rr] = (p.alibi_total_heads > 0 && r < rows) ? alibi_slope(p.alibi_total_heads, p.alibi_head_offset + rw.head(r)) * LOG2E : 0.f;
    }

    // acc += Q·Kᵀ over the tile at kt (16 keys), its fragments rotated by `rot` first; NTP
    // n-tiles of fragments at a time.
    auto qk = [&](const T* kt, const T* q, float (&acc)[2][4], int rot, const float2* base, const float2* off) {
        constexpr int NTP = DecFrag<D>::NTP;
#pragma unroll
        for (int nt0 = 0; nt0 < 2; nt0 += NTP) {
            uint32_t kf[KS][2 * NTP];
            if constexpr (NTP == 2) {  // x4: keys 0-7 and 8-15, both halves of one k-step
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
                    ldmatrix_x4(kf[ks], kt + ((lane % 8) + (lane / 16) * 8) * LD + ks * 16 + ((lane / 8) % 2) * 8);
            } else {  // x4: keys 8·nt0 .. + 8, two k-steps (KS is even at head_dim 256)
#pragma unroll
                for (int ks = 0; ks < KS; ks += 2) {
                    uint32_t r4[4];
                    ldmatrix_x4(r4, kt + (8 * nt0 + lane % 8) * LD + ks * 16 + (lane / 8) * 8);
                    kf[ks][0] = r4[0], kf[ks][1] = r4[1], kf[ks + 1][0] = r4[2], kf[ks + 1][1] = r4[3];
                }
            }
            rotate_fragments<T, D, NTP>(kf, nt0, rot, half, base, off, g, t);
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t a[4];
                ldmatrix_x4(a, q + ((lane % 8) + ((lane / 8) % 2) * 8) * LD + ks * 16 + (lane / 16) * 8);
#pragma unroll
                for (int n = 0; n < NTP; ++n) mma_16816<T>(acc[nt0 + n], a, kf[ks][2 * n], kf[ks][2 * n + 1]);
            }
        }
    };

    // O accumulators: o[dt] is components 8dt + 2t, +1 of rows g (c 0, 1) and g + 8 (c 2, 3).
    float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[d][c] = 0.f;

    // With base steps: the anchor of this lane's pairs lane + 32k, at the first tile of the
    // group of `steps` warp tiles it serves (group: that tile's index among the warp's).
    constexpr int NA = (H2 + 31) / 32;
    float2 anchor[NA] = {};
    int group = -1;
    const int lg_w = W == 4 ? 2 : W == 2 ? 1 : 0;  // W is 4, 2 or 1 (the launcher's choice)

    int buf = 0;
    if constexpr (D > 128) walk.begin(warp, stage);
    while (walk.has(walk.cur)) {
        const int j0 = k_begin + walk.cur * BT, vk = walk.keys(walk.cur);
        const bool more = walk.stage_next(buf ^ 1, stage);  // the next tile's copies, the one after's table reads
        // The tile's bases, shared by the warp (while its copies land): the anchor times the
        // tile's two steps; without steps exact at key 0, times the exact e^{8iθ} at key 8.
        if (rope && D <= 128 && steps > 1) {
            // Tile i of the warp's (tile index warp + W·i) is step m of the group from tile i - m.
            const int i = walk.cur >> lg_w, m = i & (steps - 1);
            if (i - m != group) {  // a new group (or a window's jump into one): its exact anchor
                group = i - m;
                const int ja = k_begin + BT * (warp + W * group);
#pragma unroll
                for (int k = 0; k < NA; ++k)
                    if (lane + 32 * k < half) anchor[k] = cs_scaled(angle_turns(ja, pair_freq(ra, lane + 32 * k)), 1.f);
            }
#pragma unroll
            for (int k = 0; k < NA; ++k) {
                const int P = lane + 32 * k;
                if (P < half) {
                    Base[P] = cmul(anchor[k], Steps[m * half + P]);
                    Base[H2 + P] = cmul(anchor[k], Steps[(steps + m) * half + P]);
                }
            }
        } else if (rope) {
            for (int P = lane; P < half; P += 32) {
                const float2 b0 = cs_scaled(angle_turns(j0, pair_freq(ra, P)), 1.f);
                Base[P] = b0;
                Base[H2 + P] = cmul(b0, Off[8 * OP + P]);
                if (leaky) {
                    const float2 l0 = cs_scaled(angle_turns(j0, pair_freq_leak(ra, P)), 1.f);
                    Basel[P] = l0;
                    Basel[H2 + P] = cmul(l0, Offl[8 * OP + P]);
                }
            }
        }
        if (more) cp_async_wait<1>();  // this lane's copies of tile n landed ...
        else cp_async_wait<0>();
        __syncwarp();  // ... and every lane's; the bases are written
        const T* Kt = Kst + buf * BT * LD;
        const T* Vt = Vst + buf * BT * LD;

        // S = Q·Kᵀ; with ReRoPE first the far product, from the raw fragments (Leaky: rotated
        // to j/k). s[nt][c]: rows g (c 0, 1) and g + 8 (c 2, 3), keys 8nt + 2t and the next.
        float s[2][4] = {}, sf[2][4];
        if (rel) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) sf[nt][c] = 0.f;
            if (mode == KR_SMEM && leaky) {
                rotate_tile_warp<T, D, LD, BT>(Krot, Kt, ra, Basel, Offl, lane);  // far keys: j / k
                __syncwarp();
                qk(Krot, Qf, sf, KR_NONE, Basel, Offl);
                __syncwarp();  // every lane has read Krot before it takes the near keys
            } else {
                qk(Kt, Qf, sf, leaky ? mode : KR_NONE, Basel, Offl);
            }
            Sfar[0] = make_float4(sf[0][0], sf[0][1], sf[0][2], sf[0][3]);
            Sfar[1] = make_float4(sf[1][0], sf[1][1], sf[1][2], sf[1][3]);
        }
        if (mode == KR_SMEM) {
            // Up to head_dim 128 in place (the far product, if any, is done with the raw keys):
            // runs of pairs from vector loads (tile.cuh), pass-through components left where
            // they are. At 256 into the warp's own tile a pair at a time, lighter on the
            // registers (the vector runs cost that kernel a spill).
            T* Kw = D > 128 ? Krot : Kst + buf * BT * LD;
            __syncwarp();  // every lane's far product has read the raw keys
            if constexpr (D > 128) rotate_tile_warp<T, D, LD, BT>(Kw, Kt, ra, Base, Off, lane);
            else rotate_rows_composed(Kw, LD, BT, ra, Off, Base, H2, lane, 32);
            __syncwarp();
            qk(Kw, Qs, s, KR_NONE, Base, Off);
        } else {
            qk(Kt, Qs, s, mode, Base, Off);
        }

        // Online softmax on the accumulators (log2 domain; 4 lanes share a row). A whole tile
        // seen by every row without ReRoPE (the common decode step) takes no per-key mask: with
        // no ALiBi the plain form; with ALiBi, when every key is at or before every row, the
        // bias slope·(j - i) is linear in j (the linear form). Anything else masks per key.
        auto softmax = [&](auto kind_c) {
            constexpr int KIND = decltype(kind_c)::value;
            constexpr bool PLAIN = KIND == 1, LINEAR = KIND == 2;
            if (KIND == 0 && rel) {
                const float4 f0 = Sfar[0], f1 = Sfar[1];
                sf[0][0] = f0.x, sf[0][1] = f0.y, sf[0][2] = f0.z, sf[0][3] = f0.w;
                sf[1][0] = f1.x, sf[1][1] = f1.y, sf[1][2] = f1.z, sf[1][3] = f1.w;
            }
            bool grew = false;
            float alpha[2];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float mx = -INFINITY;
                const bool row_chunks = CHUNKS && KIND == 0 && mask.chunk > 0;
                const RowKeys rk = row_chunks ? row_keys_of[g + 8 * rr] : RowKeys{0, 0};
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = 2 * rr + e, u = 8 * nt + 2 * t + e;
                        float x;
                        if constexpr (PLAIN) {
                            x = s[nt][c] * p.scale_log2;
                        } else if constexpr (LINEAR) {
                            x = fmaf(s[nt][c], p.scale_log2, slope[rr] * static_cast<float>(j0 + u - ipos[rr]));
                        } else {
                            const int i = ipos[rr], j = j0 + u;
                            x = u < vk && (row_chunks ? row_sees(mask, i, rk, j) : visible_unchunked(mask, i, j)) ? score_log2(ra, p.scale_log2, s[nt][c], sf[nt][c], i, j, slope[rr], p.cap_in, p.cap_out)
                                                              : -INFINITY;
                        }
                        s[nt][c] = x;
                        mx = fmaxf(mx, x);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[rr], mx);
                const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: keep ex2 finite
                alpha[rr] = ex2(m[rr] - m_use);
                grew |= m_new != m[rr];
                m[rr] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        s[nt][2 * rr + e] = ex2(s[nt][2 * rr + e] - m_use);
                        sum += s[nt][2 * rr + e];
                    }
                l[rr] = l[rr] * alpha[rr] + sum;  // per-lane partial; the quad is summed at the end
            }
            // O is rescaled only when some row of the warp found a larger max.
            if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
                for (int d = 0; d < DT; ++d)
#pragma unroll
                    for (int c = 0; c < 4; ++c) o[d][c] *= alpha[c / 2];
            }
        };
        // Soft-capped scores are not linear in the dot product: the generic form for every tile.
        const bool whole = !rel && p.cap_in == 0.f && vk == BT && tile_fully_visible_unchunked(mask, ctx - p.queries, ctx, j0, j0 + BT) &&
                           decode_chunk_free(mask, query_chunks, j0, j0 + BT);
#ifdef RA_PROBE_DECODE
        softmax(DecKind<1>{});
#else
        if (whole && p.alibi_total_heads == 0) softmax(DecKind<1>{});
        else if (whole && j0 + BT - 1 <= ctx - p.queries) softmax(DecKind<2>{});  // keys at or before the first query
        else softmax(DecKind<0>{});
#endif

        // O += P·V: P as the A operand (16 rows x 16 keys), V by ldmatrix.trans.
        const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                                pack2<T>(s[1][2], s[1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, Vt + ((lane % 8) + ((lane / 8) % 2) * 8) * LD + np * 16 + (lane / 16) * 8);
            mma_16816<T>(o[2 * np], pa, bv[0], bv[1]);
            mma_16816<T>(o[2 * np + 1], pa, bv[2], bv[3]);
        }
        __syncwarp();  // every lane is done with buffer buf, Krot and the bases before they are refilled
        walk.advance();
        buf ^= 1;
    }

    // Each row's l over its quad; then the warps merge through shared memory (the staging
    // buffers, free now: every warp waited for all its copies).
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
    }
    __syncthreads();
    float* Wo = reinterpret_cast<float*>(smem_raw);  // [W][R][D] (fits in the staging buffers)
    float* Wm = Wo + W * R * D;                     // [W][R]
    float* Wl = Wm + W * R;
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int c = 0; c < 4; ++c) Wo[(warp * R + g + 8 * (c / 2)) * D + 8 * d + 2 * t + (c & 1)] = o[d][c];
    if (t == 0) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            Wm[warp * R + g + 8 * rr] = m[rr];
            Wl[warp * R + g + 8 * rr] = l[rr];
        }
    }
    __syncthreads();
    store_decode_rows<T, D, R>(p, Wo, Wm, Wl, W, rw, b, split);
}

}  // namespace ra

// One kernel per head dim and 16-bit dtype: attention_decode_d{64,80,96,128,256}_{f16,bf16}
// (the f32 ones are in attention_decode.cu under the same names).
#define RA_DECODE_MMA(T, NAME, D) \
    RA_KERNEL_MIN_BLOCKS(ra::DMMA_MAX_WARPS * 32, 2, attention_decode_d##D##_##NAME, ra::DecodeParams) { ra::decode_mma_body<T, D>(p); }
#define RA_DECODE_MMA_ALL(T, NAME) \
    RA_DECODE_MMA(T, NAME, 64)     \
    RA_DECODE_MMA(T, NAME, 80)     \
    RA_DECODE_MMA(T, NAME, 96)     \
    RA_DECODE_MMA(T, NAME, 128)    \
    RA_DECODE_MMA(T, NAME, 256)
RA_DECODE_MMA_ALL(__half, f16)
RA_DECODE_MMA_ALL(__nv_bfloat16, bf16)
