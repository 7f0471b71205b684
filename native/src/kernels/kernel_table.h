// The single-row and GEMM kernels of each variant, as one table of function pointers chosen at run time.
#pragma once

#include <cstdint>

#include "avx2.h"
#include "avx512bf16.h"
#include "avx512vnni.h"
#include "common.h"
#include "cpu_features.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "neon.h"
#include "scalar.h"
#include "softmax.h"

namespace csmd {

// One variant's kernels (kernels_for). The matvec dots take a weight row, its scales and biases, and x as
// prepared by MatvecPrep (qmatmul_driver.h).
struct Kernels {
  using RowDot = float (*)(const uint8_t*, const float*, const float*, const XPrep&);
  using RowDotBf16 = float (*)(const uint8_t*, const uint16_t*, const uint16_t*, const XPrep&);
  // A RowDotBf16 for several rows of x against one weight row: (w, s, bias, preps, count, out[count]), each
  // out[r] bit for bit the one-row dot with preps[r].
  using RowDotsBf16 = void (*)(const uint8_t*, const uint16_t*, const uint16_t*, const XPrep* const*, int, float*);
  RowDot dot_f = nullptr;    // the exact mode: float unpacking, fp32 sums
  RowDot dot_i = nullptr;    // the int8 mode (int16 x at 8 bits)
  RowDot dot_i16 = nullptr;  // the int16 mode
  // dot_i16 for groups of 64 with bf16 scales and biases read in place (4 and 8 bits); nullptr where the
  // variant has none (scalar, NEON), which then converts each row's scales and biases to fp32 for dot_i16.
  RowDotBf16 dot_i16_g64_bf16 = nullptr;
  RowDotsBf16 dots_i16_g64_bf16 = nullptr;  // the same over several rows of x, each weight group unpacked once
  // int16 x for the groups of 64 (steps, group sums; permuted for 4 bits) in one SIMD pass; nullptr: the
  // scalar prep_gsum + prep_x_i16_4 / prep_x_int (same integers).
  void (*prep_i16_g64)(const float*, int, bool, int16_t*, float*, float*) = nullptr;
  // The int8 mode's 4-bit product with bf16 scales and biases read in place (AVX2 and VNNI; nullptr for scalar
  // and NEON, where the rows' scales and biases are converted for dot_i).
  RowDotBf16 dot_i8_g64_bf16 = nullptr;
  RowDotsBf16 dots_i8_g64_bf16 = nullptr;  // the same over several rows of x, each weight group unpacked once
  // The int8 mode's x at 4 bits, groups of 64, in one SIMD pass; nullptr: prep_gsum + prep_x_int.
  void (*prep_i8_g64)(const float*, int, int8_t*, float*, float*) = nullptr;
  // Weight rows dequantized to fp32 for the GEMM (qmatmul_driver.h's QuantFill).
  void (*dequant)(const uint8_t*, const float*, const float*, int, int, int, int, int, float*) = nullptr;
  GemmKernels gemm{};
  // The bf16 GEMM of many-row products (gemm_bf16.h): only where the CPU multiplies bf16 pairs natively (the
  // avx512vnni variant on a CPU with AVX-512 BF16); empty elsewhere, where those products run the fp32 GEMM.
  Bf16GemmKernels bf16{};
  float (*dot_f32)(const float*, const float*, int) = nullptr;
  float (*dot_bf16)(const uint16_t*, const float*, int) = nullptr;
  void (*cvt_bf16)(const uint16_t*, int, float*) = nullptr;
  void (*softmax_row)(const float*, int, int, float*) = nullptr;
};

// Each variant's table, filled field by field: most fields share a signature, so an entry out of place would
// compile. A field left out is nullptr (the fallbacks its comment in Kernels names).
inline Kernels kernels_for(Variant v) {
  switch (v) {
#if defined(CSMD_HAVE_AVX2_KERNELS)
    case Variant::AVX2:
      return {
          .dot_f = avx2::dot_f,
          .dot_i = avx2::dot_i,
          .dot_i16 = avx2::dot_i16,
          .dot_i16_g64_bf16 = avx2::dot_i16_g64_bf16,
          .dots_i16_g64_bf16 = avx2::dots_i16_g64_bf16,
          .prep_i16_g64 = avx2::prep_i16_g64,
          .dot_i8_g64_bf16 = avx2::dot_i8_g64_bf16,
          .dots_i8_g64_bf16 = avx2::dots_i8_g64_bf16,
          .prep_i8_g64 = avx2::prep_i8_g64,
          .dequant = avx2::dequant,
          .gemm = {.micro = avx2::gemm_micro, .pack_w = avx2::gemm_pack_w},
          .dot_f32 = avx2::dot_f32,
          .dot_bf16 = avx2::dot_bf16,
          .cvt_bf16 = avx2::cvt_bf16,
          .softmax_row = avx2::softmax_row,
      };
#endif
#if defined(CSMD_HAVE_AVX512VNNI_KERNELS)
    case Variant::AVX512VNNI: {  // AVX2's table but for the integer dots, which use vpdpwssd / vpdpbusd
      Kernels k = kernels_for(Variant::AVX2);
      k.dot_i = avx512vnni::dot_i;
      k.dot_i16 = avx512vnni::dot_i16;
      k.dot_i16_g64_bf16 = avx512vnni::dot_i16_g64_bf16;
      k.dot_i8_g64_bf16 = avx512vnni::dot_i8_g64_bf16;
      k.dots_i16_g64_bf16 = avx512vnni::dots_i16_g64_bf16;
      k.dots_i8_g64_bf16 = avx512vnni::dots_i8_g64_bf16;
#if defined(CSMD_HAVE_AVX512BF16_KERNELS)
      if (cpu_has_avx512bf16()) k.bf16 = avx512bf16::kernels();
#endif
      return k;
    }
#endif
#if defined(CSMD_HAVE_NEON_KERNELS)
    case Variant::NEON:
      return {
          .dot_f = neon::dot_f,
          .dot_i = neon::dot_i,
          .dot_i16 = neon::dot_i16,
          .dequant = neon::dequant,
          .gemm = {.micro = neon::gemm_micro, .pack_w = neon::gemm_pack_w},
          .dot_f32 = neon::dot_f32,
          .dot_bf16 = neon::dot_bf16,
          .cvt_bf16 = neon::cvt_bf16,
          .softmax_row = neon::softmax_row,
      };
#endif
    default:
      return {
          .dot_f = scalar::dot_f,
          .dot_i = scalar::dot_i,
          .dot_i16 = scalar::dot_i16,
          .dequant = scalar::dequant,
          .gemm = {.micro = scalar::gemm_micro, .pack_w = scalar::gemm_pack_w},
          .dot_f32 = scalar::dot_f32,
          .dot_bf16 = scalar::dot_bf16,
          .cvt_bf16 = scalar::cvt_bf16,
          .softmax_row = scalar::softmax_row,
      };
  }
}

}  // namespace csmd
