// Process-wide settings of csmd_native: kernel variant, matvec mode, threads.
#pragma once

#include <string>

#include "kernels/driver.h"

namespace csmd {

Variant current_variant();
// "auto", "scalar", "avx2" or "neon"; throws std::invalid_argument if the
// variant is unknown or not supported by this CPU.
void set_variant(const std::string& name);
const Kernels& current_kernels();

// Matrix-vector products: "int8" (x quantized per group, integer dots) or
// "exact" (float unpacking).
bool matvec_int8();
void set_matvec_mode(const std::string& mode);

ThreadPool& pool();
int num_threads();
void set_num_threads(int n);

}  // namespace csmd
