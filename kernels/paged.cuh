// Reading a paged KV cache ([num_pages, page_size, kv_heads, D], pages named by a caller-owned
// block table [batch, max_pages]): shared by the paged prefill, decode and the rope kernel's
// gather. Every entry is clamped into the pool, so a corrupt table can never address outside it.
#pragma once
#include "common.cuh"

namespace ra {

// A block-table entry clamped into the pool.
__device__ __forceinline__ int clamp_page(int page, int num_pages) { return imin(imax(page, 0), num_pages - 1); }

// Page pi of sequence b's block table, clamped.
__device__ __forceinline__ int paged_page(const int* table, int b, int pi, int max_pages, int num_pages) {
    return clamp_page(table[(long long)b * max_pages + pi], num_pages);
}

// Cache slot (page * page_size + offset) of key j of sequence b.
__device__ __forceinline__ long long paged_slot(const int* table, int b, int j, int page_size, int max_pages, int num_pages) {
    return (long long)paged_page(table, b, j / page_size, max_pages, num_pages) * page_size + j % page_size;
}

// Head kvh of key j of sequence b in a paged cache [num_pages, page_size, kv_heads, D].
template <typename T>
__device__ __forceinline__ const T* paged_key(const T* cache, const int* table, int b, int j, int kvh, int page_size,
                                              int max_pages, int num_pages, int kv_heads, int D) {
    return cache + (paged_slot(table, b, j, page_size, max_pages, num_pages) * kv_heads + kvh) * D;
}

// Where sequence b's keys lie in a packed gather workspace of `cap` rows (the paged prefill's
// gathered path): after the earlier sequences' keys, each context clamped to the table's rows
// as every paged reader clamps it, and cut where the workspace ends. The rope kernel's gather
// and the prefill derive it alike from context_lens, so no offsets travel from the host.
// A whole warp calls it: lane l adds up sequences l, l + 32, ..., then the warp sums its lanes
// (a few loads a lane for a server's batch of hundreds). Sums stay below 2 * cap < 2^32, since
// every addend and partial sum is first clamped to cap.
struct GatherSpan {
    int start, len;
};
__device__ __forceinline__ GatherSpan gathered_span(const int* context_lens, int b, int table_rows, int cap) {
    const unsigned ucap = static_cast<unsigned>(cap);
    unsigned s = 0;
    for (int i = threadIdx.x % 32; i < b; i += 32) {
        s += static_cast<unsigned>(imin(imax(context_lens[i], 0), table_rows));
        s = s < ucap ? s : ucap;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        s = s < ucap ? s : ucap;
    }
    const int start = static_cast<int>(s);
    return {start, imin(imin(imax(context_lens[b], 0), table_rows), cap - start)};
}

}  // namespace ra
