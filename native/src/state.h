// Process-wide settings of csmd_native: kernel variant, matvec mode, threads.
#pragma once

#include <string>

#include "kernels/driver.h"

namespace csmd {

Variant current_variant();
// "auto", "scalar", "avx2", "avx512vnni" or "neon"; throws std::invalid_argument if the
// variant is unknown or not supported by this CPU.
void set_variant(const std::string& name);
const Kernels& current_kernels();

// Matrix-vector products: "int16" (default: x quantized per group to int16,
// integer dots, ~1e-5 relative), "int8" (int8 x for 4-bit weights, lossier)
// or "exact" (float unpacking).
MatvecMode matvec_mode();
const char* matvec_mode_name();
void set_matvec_mode(const std::string& mode);

ThreadPool& pool();
int num_threads();
void set_num_threads(int n);

}  // namespace csmd
