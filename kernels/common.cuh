// Shared device helpers: dtype conversion, vector access, async copies and tensor-core mma.
// Everything here is header-only and inlined; the kernels read like the algorithm.
#pragma once
#ifdef RA_EMULATE
#include "emu/simt.h"  // the same source on the CPU: the SIMT emulator (feature `emulator`)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

// A kernel entry point: extern "C" (the launchers look kernels up by name), launch bounds, and
// one parameter struct passed by value. Under the emulator the kernel also registers itself.
#ifdef RA_EMULATE
#define RA_KERNEL(THREADS, NAME, PARAMS)                                                                    \
    extern "C" void NAME(const PARAMS p);                                                                   \
    static void NAME##_emu_entry(const void* a) { NAME(*static_cast<const PARAMS*>(a)); }                   \
    static ::ra_emu::Registrar NAME##_emu_registrar(#NAME, &NAME##_emu_entry, sizeof(PARAMS), (THREADS)); \
    extern "C" void NAME(const PARAMS p)
#define RA_KERNEL_MIN_BLOCKS(THREADS, MIN_BLOCKS, NAME, PARAMS) RA_KERNEL(THREADS, NAME, PARAMS)
#define RA_DYNAMIC_SMEM(TYPE, NAME) TYPE* NAME = static_cast<TYPE*>(::ra_emu::dynamic_smem())
// A static shared array: per block, NaN-filled at its start like dynamic shared memory. DIMS is
// the bracketed extent list, e.g. [4][256].
#define RA_STATIC_SMEM(TYPE, NAME, DIMS)                                                              \
    static thread_local char NAME##_smem_key;                                                         \
    using NAME##_smem_t = TYPE DIMS;                                                                  \
    NAME##_smem_t& NAME = *static_cast<NAME##_smem_t*>(::ra_emu::static_smem(&NAME##_smem_key, sizeof(NAME##_smem_t)))
#else
#define RA_KERNEL(THREADS, NAME, PARAMS) extern "C" __global__ void __launch_bounds__(THREADS) NAME(const PARAMS p)
// With an explicit minimum of resident blocks: ptxas then budgets registers for exactly that
// occupancy (its own heuristic otherwise picks a cap, and it spilled there).
#define RA_KERNEL_MIN_BLOCKS(THREADS, MIN_BLOCKS, NAME, PARAMS) \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(const PARAMS p)
#define RA_DYNAMIC_SMEM(TYPE, NAME) extern __shared__ __align__(16) TYPE NAME[]
#define RA_STATIC_SMEM(TYPE, NAME, DIMS) __shared__ TYPE NAME DIMS
#endif

namespace ra {

// ---- dtype <-> f32 -------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Two f32 -> one packed 32-bit register of two 16-bit values (low half = a), the operand
// format of mma.sync.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

// N consecutive elements moved as one access (the caller guarantees alignment).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

// A vector access of BYTES at P: the emulator checks the alignment a GPU enforces
// ("misaligned address" there) and counts the bytes moved to or from global memory; on the
// GPU, nothing.
#ifdef RA_EMULATE
#define RA_VECTOR_ACCESS(P, BYTES) ::ra_emu::vector_access(P, BYTES)
#else
#define RA_VECTOR_ACCESS(P, BYTES)
#endif

template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
    RA_VECTOR_ACCESS(p, sizeof(Vec<T, N>));
    Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(v.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_f32<T>(in[i]);
    RA_VECTOR_ACCESS(p, sizeof(Vec<T, N>));
    *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ---- async global -> shared copies (sm_80+) ----------------------------------------------
// 16 bytes per call; `valid == false` zero-fills (out-of-range rows) without reading global memory.
#ifdef RA_EMULATE
inline void cp_async_16(void* smem, const void* gmem, bool valid) { ra_emu::cp_async_16(smem, gmem, valid); }
inline void cp_async_commit() { ra_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ra_emu::cp_async_wait(N); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ra_emu::ldmatrix_x4(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { ra_emu::ldmatrix_x4(r, smem, true); }
template <typename T> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ra_emu::mma_16816(d, a, b0, b1, ra_emu::MMA_F16);
}
template <> inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ra_emu::mma_16816(d, a, b0, b1, ra_emu::MMA_BF16);
}
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- ldmatrix / mma.sync m16n8k16 ----------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// D = A(16x16) * B(16x8) + D, f32 accumulate. T selects the f16 or bf16 instruction.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // RA_EMULATE

// 2^x for the online softmax: the bare MUFU.EX2 (ex2.approx.ftz, 2 ulp). Plain exp2f keeps
// subnormal results, which costs a compare, a pre-scale and a post-square around every MUFU
// (4 instructions per score where 1 does); a probability below 2^-126 of the row's maximum is
// zero either way at f32 accumulation. ex2(-inf) = 0, so masked scores need no special case.
#ifdef RA_EMULATE
inline float ex2(float x) {
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.f : r;  // flush to zero, as .ftz does
}
#else
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
#endif

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// tanh(x) = 1 - 2 / (2^(2x·log2 e) + 1): one MUFU.EX2 and an approximate reciprocal, within
// 4e-7 absolute of tanh (the exponent's argument is rounded, and 1 - 2/(e + 1) cancels near 0:
// relative accuracy is lost there, absolute is not). Saturates cleanly: e = +inf gives 1, e = 0
// gives -1. (libdevice's tanhf made the f32 scores kernel spill on sm_90.)
#ifdef RA_EMULATE
inline float div_approx(float a, float b) { return a / b; }
#else
__device__ __forceinline__ float div_approx(float a, float b) { return __fdividef(a, b); }  // 2 ulp; 0 past 2^126
#endif
__device__ __forceinline__ float tanh_abs(float x) { return 1.f - div_approx(2.f, ex2(x * 2.8853900817779268f) + 1.f); }

// Logit soft-capping (Gemma 2's attn_logit_softcapping, Grok's): the scaled score s = scale·q·k
// becomes cap·tanh(s / cap), before ALiBi and the masks (FlashAttention's order). `cap_in` is
// scale / cap and `cap_out` cap in the units wanted (cap·log2(e) for the log2 domain); with
// cap_in = 0 the score is dot·scale, as without capping. The capped score is within
// cap·4e-7 of cap·tanh (tanh_abs), which Tolerance::scores adds.
__device__ __forceinline__ float capped(float dot, float scale, float cap_in, float cap_out) {
    return cap_in > 0.f ? cap_out * tanh_abs(dot * cap_in) : dot * scale;
}

}  // namespace ra

// One extern "C" symbol per dtype: NAME_f32, NAME_f16, NAME_bf16 (candle's convention).
#define RA_FOR_EACH_DTYPE(X) X(float, f32) X(__half, f16) X(__nv_bfloat16, bf16)
