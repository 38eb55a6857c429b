// Pieces both decode kernels share (attention_decode.cu: CUDA cores, f32; attention_decode_mma.cu:
// tensor cores, f16/bf16): which keys a split covers, the warp's walk over its tiles, staging a
// tile of the paged cache, and the end, where the warps' softmax states merge into the result.
#pragma once
#include "attention.cuh"

namespace ra {

// Key splits start on multiples of this (SPLIT_ALIGN in src/cuda/decode.rs): of every decode tile.
constexpr int SPLIT_ALIGN_KEYS = 32;

// Components (ia, ib) of pair P of a head: the rotary pairs by layout, then the pass-through
// components (partial rotary) in two halves. With no RoPE, (P, P + D/2).
__device__ __forceinline__ void head_pair(int P, int rd, int interleaved, int D, int& ia, int& ib) {
    const int half = rd / 2;
    if (P < half) {
        pair_index(interleaved, rd, P, ia, ib);
    } else {
        ia = half + P;
        ib = ia + (D - rd) / 2;
    }
}

// The keys of one decode block. ctx: the sequence's context (clamped to its pages). With a
// sliding window or chunks the splits share out the keys some query can see, [lo, ctx): from
// the earliest query's window start or chunk start, the later of the two (the host sized
// keys_per_split for window + queries - 1 or chunk + queries - 1 of them), not the whole
// context: a 32k context under a 4k window keeps every split busy. Sinks before lo belong to
// split 0, whose warps jump over the hidden keys between them and lo.
struct DecodeSpan {
    int ctx, lo, k_begin, k_end;
};
__device__ __forceinline__ DecodeSpan decode_span(const DecodeParams& p, int b, int split, const MaskArgs& mask) {
    DecodeSpan s;
    s.ctx = imin(imax(p.context_lens[b], 0), p.max_pages * p.page_size);
    const int first = imax(0, s.ctx - p.queries);  // the earliest query's position
    s.lo = p.window > 0 ? imax(0, first - p.window + 1) : 0;
    if (mask.chunk > 0) s.lo = imax(s.lo, chunk_start(mask, first));
    s.k_begin = split == 0 && p.sinks > 0 ? 0 : s.lo + split * p.keys_per_split;
    s.k_end = imin(s.ctx, s.lo + (split + 1) * p.keys_per_split);
    return s;
}

// A decode block's (query head, query) rows: R of them from r0 in its KV head's GQA group
// (blockIdx.y = KV head · row blocks + row block). Row r is query head kvh·group + (r0 + r) /
// queries, query (r0 + r) % queries, at position ctx - queries + query.
struct DecodeRows {
    int group, kvh, r0, rows, queries, ctx;
    __device__ __forceinline__ int head(int r) const { return kvh * group + (r0 + r) / queries; }
    __device__ __forceinline__ int query(int r) const { return (r0 + r) % queries; }
    __device__ __forceinline__ int pos(int r) const { return ctx - queries + query(r); }
};
template <int R>
__device__ __forceinline__ DecodeRows decode_rows(const DecodeParams& p, int ctx) {
    DecodeRows w;
    w.group = p.q_heads / p.kv_heads;
    const int rows_total = w.group * p.queries, row_blocks = (rows_total + R - 1) / R;
    w.kvh = blockIdx.y / row_blocks;
    w.r0 = (blockIdx.y % row_blocks) * R;
    w.rows = imin(R, rows_total - w.r0);
    w.queries = p.queries;
    w.ctx = ctx;
    return w;
}

// Pair P of row r's query (components ia, ib: head_pair's numbering) of sequence b, in f32:
// x rotated to the row's position times af² (keys are rotated without the attention factor,
// which scales both sides), f the far copy for ReRoPE (to w, times af²; Leaky: to w + (i - w)/k,
// times af²), both times the row's query temperature (Llama 4). Rows past rw.rows are zero.
template <typename T, int D>
__device__ __forceinline__ void rotated_query_pair(const DecodeParams& p, const DecodeRows& rw, int b, int r, int P, bool rel,
                                                   bool leaky, int& ia, int& ib, float2& x, float2& f) {
    const RopeArgs& ra = p.rope;
    head_pair(P, ra.rotary_dim, ra.interleaved, D, ia, ib);
    x = f = make_float2(0.f, 0.f);
    if (r >= rw.rows) return;
    const T* qrow = static_cast<const T*>(p.q) + (long long)(b * p.queries + rw.query(r)) * p.q_row_stride + (long long)rw.head(r) * D;
    // Llama 4's query temperature (1 without) on both copies, rotated components or not.
    const float temp = query_temperature(ra, rw.pos(r));
    x = f = make_float2(to_f32(qrow[ia]) * temp, to_f32(qrow[ib]) * temp);
    if (P < ra.rotary_dim / 2) {
        const float af = ra.attention_factor;
        const float2 cs = mode_cs(ra, ROT_POS, rw.pos(r), P);
        rotate_pair(x.x, x.y, cs.x * af, cs.y * af);
        if (rel) {
            const float2 cf = mode_cs(ra, leaky ? ROT_Q_LEAKY : ROT_Q_RE, rw.pos(r), P);
            const float sf = leaky ? af : 1.f;  // ROT_Q_RE already carries af²
            rotate_pair(f.x, f.y, cf.x * sf, cf.y * sf);
        }
    }
}

// The warp's next tile at or after its tile n that some query sees (tiles of BT keys from
// k_begin; warp w of `warps` takes tiles w, w + warps, ...): whole-tile skipping, and the keys
// hidden by the window or chunks between the sinks and lo jumped over in one step. A tile at or
// past k_end: none left. The chunks need no test of their own here: every key from lo (the
// earliest query's chunk start or later) to ctx is in the chunk of some query at or after it,
// so only the window and causal mask can hide a whole tile there (keeping the divisions out of
// the walk, whose state the head_dim-256 kernel cannot afford to grow).
template <int BT>
__device__ __forceinline__ int next_visible_tile(const DecodeParams& p, const DecodeSpan& s, const MaskArgs& mask, int n,
                                                 int warps) {
    for (;; n += warps) {
        const int j0 = s.k_begin + n * BT;
        if (j0 >= s.k_end) return n;
        if (j0 >= p.sinks && j0 + BT <= s.lo) {  // hidden: past the sinks, before lo
            const int need = (s.lo - s.k_begin - BT) / BT + 1;  // first tile that reaches lo
            if (need > n) n += ((need - n + warps - 1) / warps - 1) * warps;
            continue;
        }
        if (tile_visible_unchunked(mask, s.ctx - p.queries, s.ctx, j0, imin(j0 + BT, s.k_end))) return n;
    }
}

// Whether the chunks hide no key of [j0, j1) from any query of the sequence: every key a sink,
// or every query in one chunk (cl: the first and last query's chunk starts) and the keys in it
// (they are before ctx, so at most the last query's position).
__device__ __forceinline__ bool decode_chunk_free(const MaskArgs& m, const int (&cl)[2], int j0, int j1) {
    return m.chunk <= 0 || j1 - 1 < m.sinks || (cl[0] == cl[1] && j0 >= cl[0]);
}

// Key lane of the warp's tile n in the paged cache, as far as the block table says before the
// clamp: its page's entry as read and its offset in the page (off = -1: no key, for lanes past
// BT and keys past the span). The kernels read it a tile before they stage the tile
// (DecodeWalk) and clamp it only then (page_slot): a warp issues in order, and a read whose
// value is used at once (at the stage, or by a clamp right after it) stalls the warp for the
// read's whole latency before its copies can go out.
struct PageRef {
    int entry, off;
};
template <int BT>
__device__ __forceinline__ PageRef tile_page_ref(const DecodeParams& p, const DecodeSpan& s, int b, int n, int lane) {
    static_assert(BT <= 32, "one lane per key looks up the slots");
    const int j = s.k_begin + n * BT + lane;
    PageRef r{0, -1};
    if (lane < BT && j < s.k_end) {
        const int pi = j / p.page_size;
        r.off = j - pi * p.page_size;
        r.entry = p.block_table[(long long)b * p.max_pages + pi];
    }
    return r;
}

// The cache slot (page * page_size + offset) of a key, its page clamped into the pool; 0 for no
// key. (Slots fit an int: the host checks num_pages * page_size does.)
__device__ __forceinline__ int page_slot(const DecodeParams& p, PageRef r) {
    return r.off >= 0 ? clamp_page(r.entry, p.num_pages) * p.page_size + r.off : 0;
}

// A warp's walk over its visible tiles: `cur` is computed while the K/V copies of `next` are in
// flight and the block-table reads of the tile after it (`ref`: tile_page_ref's value for
// this lane) are outstanding. `stage(n, buf, slot)` stages tile n into buffer buf, this lane
// bringing its cache slot. The kernels' loop:
//     w.begin(warp, stage);
//     while (w.has(w.cur)) { const bool more = w.stage_next(buf ^ 1, stage); ...; w.advance(); buf ^= 1; }
// KEEP_OFF = false drops the offsets from the look-ahead (one register; the f32 kernel, at three
// blocks per SM, has none to spare) and divides again at the stage.
template <int BT, bool KEEP_OFF = true>
struct DecodeWalk {
    const DecodeParams& p;
    const DecodeSpan& s;
    const MaskArgs& mask;
    int b, warps, lane;
    int cur = 0, next = 0, after = 0;
    PageRef ref{0, -1};

    __device__ __forceinline__ bool has(int n) const { return s.k_begin + n * BT < s.k_end; }
    __device__ __forceinline__ int visible_from(int n) const { return next_visible_tile<BT>(p, s, mask, n, warps); }
    // This lane's cache slot in tile n, whose reference was read last.
    __device__ __forceinline__ int slot(int n) const {
        if constexpr (KEEP_OFF) return page_slot(p, ref);
        const int j = s.k_begin + n * BT + lane;
        return page_slot(p, PageRef{ref.entry, lane < BT && j < s.k_end ? j % p.page_size : -1});
    }
    // The keys of tile n the span holds (1 .. BT).
    __device__ __forceinline__ int keys(int n) const { return imin(BT, s.k_end - (s.k_begin + n * BT)); }
    // The first tile staged into buffer 0 (its entries waited for at once: nothing to hide them
    // behind yet); the second found, and its entries read.
    template <typename Stage>
    __device__ __forceinline__ void begin(int warp, Stage&& stage) {
        cur = visible_from(warp);
        ref = tile_page_ref<BT>(p, s, b, cur, lane);
        if (has(cur)) stage(cur, 0, slot(cur));
        next = has(cur) ? visible_from(cur + warps) : cur;
        if (has(next)) ref = tile_page_ref<BT>(p, s, b, next, lane);
    }
    // At the top of an iteration: `next` staged into buffer buf (free since the last iteration's
    // end), then the tile after it found and its entries read, for the next iteration. Whether
    // there was a `next`.
    template <typename Stage>
    __device__ __forceinline__ bool stage_next(int buf, Stage&& stage) {
        const bool more = has(next);
        if (more) stage(next, buf, slot(next));
        after = more ? visible_from(next + warps) : next;
        if (has(after)) ref = tile_page_ref<BT>(p, s, b, after, lane);
        return more;
    }
    __device__ __forceinline__ void advance() {
        cur = next;
        next = after;
    }
};

// Stage keys j0 .. j0 + BT of sequence b (vk of them valid) of KV head kvh, K and V, into a
// warp's buffers (row pitch LD elements) as one cp.async group; keys past vk are zero-filled
// without a read. Lane l < BT brings key l's cache slot (page_slot) for the warp's `slots`. Called by a whole warp.
template <typename T, int D, int LD, int BT>
__device__ __forceinline__ void stage_kv_tile(T* k_dst, T* v_dst, int* slots, const DecodeParams& p, int kvh, int vk,
                                              int slot, int lane) {
    __syncwarp();  // every lane is done with the previous tile's slots
    if (lane < BT) slots[lane] = slot;
    __syncwarp();
    // Byte addresses from the head's start: a chunk's K source is one unsigned 32 x 32 -> 64-bit
    // multiply-add from its slot (never negative: page_slot), its V source that plus the
    // distance between the caches (a 64-bit add; a second per-lane base would cost the
    // head_dim-256 kernel a spill), where signed 64-bit element arithmetic took ptxas ten
    // instructions a chunk.
    const char* kc = reinterpret_cast<const char*>(static_cast<const T*>(p.k_cache) + (long long)kvh * D);
    const unsigned long long v_minus_k = reinterpret_cast<unsigned long long>(p.v_cache) - reinterpret_cast<unsigned long long>(p.k_cache);
    const unsigned row_bytes = static_cast<unsigned>(p.kv_heads) * (D * sizeof(T));
    auto v_of = [&](const char* k) { return reinterpret_cast<const char*>(reinterpret_cast<unsigned long long>(k) + v_minus_k); };
    constexpr int VEC = 16 / sizeof(T), CH = D / VEC;  // 16-byte chunks per key
    constexpr int KPP = CH <= 32 ? 32 / CH : 0;  // whole keys per pass of the warp, if it covers some
    if constexpr (KPP > 0 && 32 % CH == 0 && BT % (KPP > 0 ? KPP : 1) == 0) {
        // Whole keys per pass: a lane keeps its column and steps over keys, so each chunk costs
        // a slot read, a multiply-add per source and the two copies.
        const int k0 = lane / CH, col = (lane % CH) * VEC;
        const char* kh = kc + col * sizeof(T);
        const int left = vk - k0;  // keys this lane's passes may still copy (a compare with a constant each)
#pragma unroll
        for (int it = 0; it < BT / KPP; ++it) {
            const int key = k0 + it * KPP;
            const bool ok = it * KPP < left;
            const char* src = kh + static_cast<unsigned long long>(static_cast<unsigned>(slots[key])) * row_bytes;
            cp_async_16(k_dst + key * LD + col, src, ok);
            cp_async_16(v_dst + key * LD + col, v_of(src), ok);
        }
    } else {
#pragma unroll
        for (int it = 0; it < (BT * CH + 31) / 32; ++it) {
            const int c = lane + 32 * it, key = c / CH, col = (c % CH) * VEC;
            if ((BT * CH) % 32 != 0 && c >= BT * CH) break;
            const bool ok = key < vk;
            const char* src = kc + static_cast<unsigned long long>(static_cast<unsigned>(slots[key])) * row_bytes + col * sizeof(T);
            cp_async_16(k_dst + key * LD + col, src, ok);
            cp_async_16(v_dst + key * LD + col, v_of(src), ok);
        }
    }
    cp_async_commit();
}

// The end of a decode block: each of its `warps` warps has written its (m, l, O) for the block's
// R rows to Wo [warps][R][D], Wm and Wl [warps][R] (log2 domain, O unnormalised, m = -inf where it saw no
// key); merge them and write this split's result, final (one split) or an f32 partial for
// merge.cu's combine, for the block's rows rw of sequence b.
template <typename T, int D, int R>
__device__ __forceinline__ void store_decode_rows(const DecodeParams& p, const float* Wo, const float* Wm, const float* Wl,
                                                  int warps, const DecodeRows& rw, int b, int split) {
    const int tokens = p.batch * p.queries;
    for (int e = threadIdx.x; e < rw.rows * D; e += blockDim.x) {
        const int x = e / D, c = e % D;
        float mx = -INFINITY;
        for (int w = 0; w < warps; ++w) mx = fmaxf(mx, Wm[w * R + x]);
        const float m_use = mx == -INFINITY ? 0.f : mx;
        float sum = 0.f, acc = 0.f;
        for (int w = 0; w < warps; ++w) {
            const float f = exp2f(Wm[w * R + x] - m_use);
            sum += Wl[w * R + x] * f;
            acc += Wo[(w * R + x) * D + c] * f;
        }
        const int h = rw.head(x), tok = b * p.queries + rw.query(x);
        // One split: the result is final, and a learned sink joins its denominator.
        const RowEnd end = row_end(sum, mx, p.sink, h, p.splits == 1);
        const float val = end.den > 0.f ? acc / end.den : 0.f;
        if (p.splits == 1) {
            static_cast<T*>(p.out)[(long long)tok * p.o_row_stride + (long long)h * D + c] = from_f32<T>(gated<T>(p.gate, tok, h, c, val));
        } else {
            p.part_out[(((long long)split * tokens + tok) * p.q_heads + h) * D + c] = val;
        }
        if (c == 0) {
            if (p.splits == 1) p.lse[(long long)h * tokens + tok] = end.lse;
            else p.part_lse[((long long)split * p.q_heads + h) * tokens + tok] = end.lse;
        }
    }
}

}  // namespace ra
