// The emulator's number formats and the one math function the C library lacks: f16 <-> f32
// conversions (bf16's are inline in simt.h) and sincospif, counted as trigonometry.
#include "simt.h"

namespace ra_emu {

// ---- f16 conversions (round to nearest even, subnormals, overflow to inf) ------------------
uint16_t f32_to_f16_bits(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {                         // below 2^-14: a subnormal half (or zero)
        // |f| * 2^24 is exact and < 1024; rintf rounds half to even. 1024 encodes 2^-14 itself.
        return sign | static_cast<uint16_t>(rintf(bits_f32(ax) * 16777216.0f));
    }
    uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent, as it should
    return sign | static_cast<uint16_t>(h);
}

float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {
        const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
    return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

}  // namespace ra_emu

void sincospif(float x, float* s, float* c) {
    ++ra_emu::tls_counters.trig;
    const double r = static_cast<double>(x) - 2.0 * nearbyint(static_cast<double>(x) / 2.0);  // exact, in [-1, 1]
    *s = static_cast<float>(sin(M_PI * r));
    *c = static_cast<float>(cos(M_PI * r));
}
