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

}  // namespace ra
