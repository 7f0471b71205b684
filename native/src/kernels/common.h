// Shared definitions for the csmd_native CPU kernels.
//
// No MLX, no Python: these headers also compile standalone
// (for example for aarch64 in tests/neon_check.cpp).
//
// Weight layout (MLX "affine" quantization, transpose=True):
//   w      : uint32 [N, K*bits/32], element k of a row sits at bits
//            (k % (32/bits))*bits of word k / (32/bits) (low bits first);
//            viewed as bytes (little endian) a 4-bit byte j holds element 2j
//            in its low nibble and 2j+1 in its high nibble.
//   scales : [N, K/G], biases : [N, K/G];  w_dequant = scale * q + bias.
//
// 4-bit "block permutation".  The SIMD kernels split the packed bytes of a row
// into blocks of 32 bytes (64 elements; a final block of 16 bytes when K/2 is
// not a multiple of 32) and separate low and high nibbles.  Instead of
// re-interleaving them for every weight row, x is permuted once per call:
//   for a block starting at byte o with B bytes and b in [0, B):
//     xp[2o + b]     = x[2o + 2b]      (low nibble of byte o+b)
//     xp[2o + B + b] = x[2o + 2b + 1]  (high nibble of byte o+b)
// Dequantized weight tiles (for the many-row GEMM) use the same permuted
// order, so dot products over k are unchanged.  8-bit data is not permuted.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace csmd {

// bfloat16 (the upper 16 bits of a float32) to float.
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Bytes of the block that starts at byte `o` of a 4-bit row of `nbytes` bytes.
inline int block4_bytes(int o, int nbytes) {
  return (o + 32 <= nbytes) ? 32 : nbytes - o;
}

// Prepared activation row shared by all weight rows of one call.
struct XPrep {
  int K = 0;        // input features
  int G = 0;        // group size
  int bits = 0;     // 4 or 8
  const float* xf = nullptr;     // [K] x (permuted for 4 bits)
  const float* gsum = nullptr;   // [K/G] sum of x over each group (natural)
  const int8_t* xq = nullptr;    // [K] int8 quantized x (permuted, 4 bits)
  const int16_t* xq16 = nullptr; // [K] int16 quantized x (8 bits: natural order;
                                 //     4 bits: word-permuted, see permute4w)
  const float* gdx = nullptr;    // [K/G] quantization step of x per group
  // [K/G] the integer modes' centring term (MatvecPrep::centre): c * (gsum - gdx * sum of x's integers), with
  // c = (2^bits - 1) / 2 the weights' mid level. A row adds sum_g s[g] * gcorr[g]. nullptr: exact mode.
  const float* gcorr = nullptr;
};

// Permute a 4-bit row's x (see above).  K must be a multiple of 32.
template <typename T>
inline void permute4(const T* x, int K, T* xp) {
  const int nbytes = K / 2;
  for (int o = 0; o < nbytes; o += 32) {
    const int B = block4_bytes(o, nbytes);
    for (int b = 0; b < B; ++b) {
      xp[2 * o + b] = x[2 * o + 2 * b];
      xp[2 * o + B + b] = x[2 * o + 2 * b + 1];
    }
  }
}

// 4-bit "word permutation" (the int16 matvec).  The kernels read a block of
// B bytes (32, or a final 16) as W = B/2 little-endian 16-bit words; nibble j
// (bits 4j..4j+3) of word i is element 4i+j of the block.  Shifting and masking
// a word vector by nibble j gives the elements {4i+j}, which meet x at
//     xp[2o + W*j + i] = x[2o + 4i + j]   (o: block start byte, i < W, j < 4)
// so a 16-byte half of a 32-byte block (words 8h..8h+7) meets xp[2o + 16j + 8h ..].
template <typename T>
inline void permute4w(const T* x, int K, T* xp) {
  const int nbytes = K / 2;
  for (int o = 0; o < nbytes; o += 32) {
    const int W = block4_bytes(o, nbytes) / 2;
    for (int i = 0; i < W; ++i)
      for (int j = 0; j < 4; ++j) xp[2 * o + W * j + i] = x[2 * o + 4 * i + j];
  }
}

// Group sums of x only: gsum_buf [K/G].
inline void prep_gsum(const float* x, int K, int G, int bits, float* gsum_buf, XPrep& p) {
  p.K = K;
  p.G = G;
  p.bits = bits;
  for (int g = 0; g < K / G; ++g) {
    double s = 0.0;
    for (int i = 0; i < G; ++i) s += x[g * G + i];
    gsum_buf[g] = static_cast<float>(s);
  }
  p.gsum = gsum_buf;
}

// Fill the float part of an XPrep: xf (permuted if 4 bits) and gsum.
// xf_buf: [K], gsum_buf: [K/G].
inline void prep_x_float(const float* x, int K, int G, int bits, float* xf_buf,
                         float* gsum_buf, XPrep& p) {
  prep_gsum(x, K, G, bits, gsum_buf, p);
  if (bits == 4) {
    permute4(x, K, xf_buf);
  } else {
    std::memcpy(xf_buf, x, sizeof(float) * K);
  }
  p.xf = xf_buf;
}

// Fill the integer part of an XPrep: x quantized per group with a symmetric
// step, rounded to nearest even.  4 bits: int8, dx = max|x| / 127 (the AVX2
// kernel multiplies unsigned nibbles by signed bytes).  8 bits: int16,
// dx = max|x| / 32767 (products of u8 weights and int16 x are summed in
// int32: at most 128 * 255 * 32767 < 2^31 per group).
// q_buf: [K] int8 (used for 4 bits, permuted), q16_buf: [K] int16 (8 bits),
// tmp: [K] int8 scratch, gdx_buf: [K/G].
inline void prep_x_int(const float* x, int K, int G, int bits, int8_t* q_buf,
                       int16_t* q16_buf, int8_t* tmp, float* gdx_buf,
                       XPrep& p) {
  for (int g = 0; g < K / G; ++g) {
    const float qmax = bits == 4 ? 127.f : 32767.f;
    float amax = 0.f;
    for (int i = 0; i < G; ++i) amax = std::fmax(amax, std::fabs(x[g * G + i]));
    const float dx = amax / qmax;
    const float inv = dx > 0.f ? 1.f / dx : 0.f;
    gdx_buf[g] = dx;
    for (int i = 0; i < G; ++i) {
      float v = std::nearbyint(x[g * G + i] * inv);
      v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
      if (bits == 4)
        tmp[g * G + i] = static_cast<int8_t>(v);
      else
        q16_buf[g * G + i] = static_cast<int16_t>(v);
    }
  }
  if (bits == 4) {
    permute4(tmp, K, q_buf);
    p.xq = q_buf;
  } else {
    p.xq16 = q16_buf;
  }
  p.gdx = gdx_buf;
}

// int16 x for 4-bit weights (the "int16" matvec mode): per group
// dx = max|x| / 32767, x rounded to nearest even, then word-permuted
// (permute4w).  Integer dot products of nibbles (<= 15) and int16 x are summed
// per group in int32: at most 128 * 15 * 32767 < 2^26.
// q16_buf, tmp: [K] int16, gdx_buf: [K/G].  Call prep_gsum (or prep_x_float)
// too.
inline void prep_x_i16_4(const float* x, int K, int G, int16_t* q16_buf, int16_t* tmp,
                         float* gdx_buf, XPrep& p) {
  for (int g = 0; g < K / G; ++g) {
    float amax = 0.f;
    for (int i = 0; i < G; ++i) amax = std::fmax(amax, std::fabs(x[g * G + i]));
    const float dx = amax / 32767.f;
    const float inv = dx > 0.f ? 1.f / dx : 0.f;
    gdx_buf[g] = dx;
    for (int i = 0; i < G; ++i) {
      float v = std::nearbyint(x[g * G + i] * inv);
      v = v > 32767.f ? 32767.f : (v < -32767.f ? -32767.f : v);
      tmp[g * G + i] = static_cast<int16_t>(v);
    }
  }
  permute4w(tmp, K, q16_buf);
  p.xq16 = q16_buf;
  p.gdx = gdx_buf;
}

}  // namespace csmd
