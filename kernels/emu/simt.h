// The CUDA surface our kernels use, for a host C++ compiler: the SIMT emulator (feature
// `emulator`). build.rs compiles every kernels/*.cu with g++ -DRA_EMULATE, and common.cuh
// includes this header instead of the CUDA ones, so the *same kernel source* runs on the CPU.
//
// Every CUDA thread is a fiber; a block's fibers run on one OS thread, switching at barriers
// (__syncthreads, __syncwarp) and warp collectives (shuffles, ldmatrix, mma.sync), which are
// computed from all 32 lanes' operands exactly as the PTX ISA lays them out. Warps advance one
// collective at a time in a seeded random order (so they drift apart between barriers as on a
// GPU), lanes run in random order, each cp.async group lands either when committed or only at
// its wait, and shared memory starts as NaN: a missing barrier or wait changes results. Misuse
// that would hang or be undefined on a GPU (lanes split between a barrier and a collective, a
// collective with exited or diverged lanes) stops the launch with an error instead.
#pragma once
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// (Kernels declare shared memory through RA_DYNAMIC_SMEM / RA_STATIC_SMEM, common.cuh.)

struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- 16-bit floating point storage types (bit-exact round-to-nearest-even conversions) -----
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
struct alignas(4) __half2 {
    __half x, y;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

namespace ra_emu {
uint16_t f32_to_f16_bits(float f);
float f16_bits_to_f32(uint16_t h);
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
}  // namespace ra_emu

inline float __half2float(__half h) { return ra_emu::f16_bits_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{ra_emu::f32_to_f16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return ra_emu::bf16_bits_to_f32(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{ra_emu::f32_to_bf16_bits(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- math ----------------------------------------------------------------------------------
// exp2f, expf, log2f, fmaf, fmaxf, rintf, INFINITY: the C library's (<math.h>).
// sin and cos of pi*x: reduced exactly (as CUDA's sincospif), then evaluated in f64.
void sincospif(float x, float* s, float* c);
// 1/sqrt(x) rounded once (CUDA's rsqrtf is within 2 ulps of it; the checked tolerances allow that).
inline float rsqrtf(float x) { return static_cast<float>(1.0 / sqrt(static_cast<double>(x))); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// ---- the thread's identity and the block's barriers ---------------------------------------
namespace ra_emu {
struct ThreadState {
    uint3 tid;
};
struct BlockState {
    uint3 bid, bdim, gdim;
};
extern thread_local ThreadState* tls_thread;
extern thread_local BlockState* tls_block;
void* dynamic_smem();
// The block's copy of the static shared array identified by `key` (its bytes NaN-filled when the
// block starts): one per launch, so concurrent launches on other threads never share it.
void* static_smem(const void* key, size_t bytes);
void syncthreads();
void syncwarp(unsigned mask);
uint32_t shfl(unsigned mask, uint32_t bits, int src_lane_or_xor, bool is_xor);
int vote_any(unsigned mask, int pred);
// Warp-collective tensor-core operations, same operands as the PTX instructions.
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
enum MmaType { MMA_F16 = 0, MMA_BF16 = 1 };
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type);
void cp_async_16(void* smem, const void* gmem, bool valid);
// Stops the launch (as a GPU's "misaligned address" fault would) unless p is `bytes`-aligned.
void check_aligned(const void* p, size_t bytes);
// A vector load or store: check_aligned, and count the bytes unless they are in shared memory.
void vector_access(const void* p, size_t bytes);
void cp_async_commit();
void cp_async_wait(int newest_pending);

// Work done by a launch, counted as the kernels run (per OS thread; ra_emu_launch reports it).
struct Counters {
    uint64_t trig;          // sincospif evaluations
    uint64_t mma;           // mma.sync instructions (per warp)
    uint64_t global_bytes;  // bytes moved by vector loads/stores and cp.async from global memory
    uint64_t ldmatrix_bytes;  // shared-memory bytes ldmatrix fed to the tensor cores (512 per x4)
};
extern thread_local Counters tls_counters;

// Kernels register themselves (RA_KERNEL in common.cuh) under their extern "C" names.
using Entry = void (*)(const void* params);
struct Registrar {
    Registrar(const char* name, Entry entry, size_t params_size, int max_threads);
};
}  // namespace ra_emu

#define threadIdx (::ra_emu::tls_thread->tid)
#define blockIdx (::ra_emu::tls_block->bid)
#define blockDim (::ra_emu::tls_block->bdim)
#define gridDim (::ra_emu::tls_block->gdim)

inline void __syncthreads() { ra_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ra_emu::syncwarp(mask); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    return ra_emu::bits_f32(ra_emu::shfl(mask, ra_emu::f32_bits(v), lane_mask, true));
}
inline float __shfl_sync(unsigned mask, float v, int src_lane) {
    return ra_emu::bits_f32(ra_emu::shfl(mask, ra_emu::f32_bits(v), src_lane, false));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) { return ra_emu::shfl(mask, v, lane_mask, true); }
inline int __any_sync(unsigned mask, int pred) { return ra_emu::vote_any(mask, pred); }
