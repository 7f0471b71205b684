// The kernel variants: which this build compiled (the CSMD_HAVE_*_KERNELS macros of the variants' headers)
// and which this CPU can run. No MLX or Python.
#pragma once

#include "avx2.h"
#include "avx512bf16.h"
#include "avx512vnni.h"
#include "neon.h"

namespace csmd {

enum class Variant { Scalar = 0, AVX2 = 1, NEON = 2, AVX512VNNI = 3 };
constexpr int kNumVariants = 4;

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::AVX2: return "avx2";
    case Variant::NEON: return "neon";
    case Variant::AVX512VNNI: return "avx512vnni";
    default: return "scalar";
  }
}

inline bool cpu_has_avx2() {
#if defined(CSMD_HAVE_AVX2_KERNELS)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// AVX-512 VNNI with the 256-bit (VL) encodings, on top of AVX2+FMA.
inline bool cpu_has_avx512vnni() {
#if defined(CSMD_HAVE_AVX512VNNI_KERNELS)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// AVX-512 BF16 (vdpbf16ps) with BW (word permutes), on top of the VNNI variant's features: the bf16 prefill GEMM
// (gemm_bf16.h), which that variant then runs (Kernels::bf16).
inline bool cpu_has_avx512bf16() {
#if defined(CSMD_HAVE_AVX512BF16_KERNELS)
  static const bool ok = cpu_has_avx512vnni() && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_neon() {
#if defined(CSMD_HAVE_NEON_KERNELS)
  return true;  // NEON (ASIMD) is mandatory on AArch64
#else
  return false;
#endif
}

inline bool variant_available(Variant v) {
  switch (v) {
    case Variant::Scalar: return true;
    case Variant::AVX2: return cpu_has_avx2();
    case Variant::NEON: return cpu_has_neon();
    case Variant::AVX512VNNI: return cpu_has_avx512vnni();
  }
  return false;
}

inline Variant best_variant() {
  if (cpu_has_avx512vnni()) return Variant::AVX512VNNI;
  if (cpu_has_avx2()) return Variant::AVX2;
  if (cpu_has_neon()) return Variant::NEON;
  return Variant::Scalar;
}

}  // namespace csmd
