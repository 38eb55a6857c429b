// Kernels that test the emulator itself (src/emulator/mod.rs unit tests), built only into the
// emulator library: misuse it must refuse, and a matrix product through its ldmatrix and
// mma.sync checked against a plain one.
#define RA_EMULATE
#include "../common.cuh"

struct RaEmuSelftestParams {
    const void* a;  // [16][16] (A, row-major) as f16
    const void* b;  // [16][8]  (B, row-major: k rows of n) as f16
    float* d;       // [16][8]  D = A B
    int mode;
    int pad_;
};

// mode 0: D = A·B through ldmatrix.x4 (A), ldmatrix.x4.trans (B) and mma.sync. 1: a shuffle
// after half the warp has exited. 2: lanes split between a shuffle and __syncwarp.
// 3: ldmatrix from a misaligned row address.
// 4 to 7, for racecheck (feature `racecheck`; without it they run clean): shared memory written
// by one lane and read by another with only a shuffle between them (4: plain stores; 5: a
// cp.async retired by its wait, read after; 7: read before, the cp.async after), which orders
// no memory on a GPU: each a data race. 6 is 5 with a __syncwarp instead of the shuffle: none.
RA_KERNEL(32, ra_emu_selftest, RaEmuSelftestParams) {
    RA_DYNAMIC_SMEM(__half, sm);
    const int lane = threadIdx.x;
    if (p.mode >= 4) {
        if (p.mode == 4) {
            reinterpret_cast<float*>(sm)[lane] = 1.f;
            (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
            p.d[lane] = reinterpret_cast<const float*>(sm)[(lane + 1) % 32];
            return;
        }
        if (p.mode == 7 && lane == 1) p.d[0] = __half2float(sm[0]);
        if (p.mode == 7) (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
        if (lane == 0) {
            ra::cp_async_16(sm, p.a, true);
            ra::cp_async_commit();
            ra::cp_async_wait<0>();
        }
        if (p.mode == 5) (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
        if (p.mode == 6) __syncwarp();
        if (p.mode != 7 && lane == 1) p.d[0] = __half2float(sm[0]);
        return;
    }
    if (p.mode == 1) {
        if (lane >= 16) return;
        (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
        return;
    }
    if (p.mode == 2) {
        if (lane % 2) __syncwarp();
        else (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
        return;
    }
    // A at sm[0..256) (16 x 16, row pitch 16), B at sm[256..384) (16 x 8 as 16 rows of 8, pitch 8).
    const __half* a = static_cast<const __half*>(p.a);
    const __half* b = static_cast<const __half*>(p.b);
    for (int i = lane; i < 256; i += 32) sm[i] = a[i];
    for (int i = lane; i < 128; i += 32) sm[256 + i] = b[i];
    __syncwarp();
    uint32_t af[4], bf[4];
    // Matrices of A: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const int arow = lane % 8 + ((lane / 8) % 2) * 8, acol = (lane / 16) * 8;
    ra::ldmatrix_x4(af, sm + arow * 16 + acol + (p.mode == 3 ? 1 : 0));
    // B transposed on the way: matrices (k 0-7) and (k 8-15) of columns 0-7 (x4 loads them twice).
    ra::ldmatrix_x4_trans(bf, sm + 256 + (lane % 16) * 8);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    ra::mma_16816<__half>(d, af, bf[0], bf[1]);
    const int g = lane / 4, t = lane % 4;
    for (int c = 0; c < 4; ++c) p.d[(g + 8 * (c / 2)) * 8 + 2 * t + c % 2] = d[c];
}
