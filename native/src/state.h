// Process-wide settings of csmd_native: kernel variant, matvec mode, threads.
#pragma once

#include <string>

#include "kernels/cpu_features.h"
#include "kernels/kernel_table.h"
#include "kernels/qmatmul_driver.h"
#include "kernels/thread_pool.h"

namespace csmd {

Variant current_variant();
// "auto", "scalar", "avx2", "avx512vnni" or "neon"; throws std::invalid_argument if the
// variant is unknown or not supported by this CPU.
void set_variant(const std::string& name);
const Kernels& current_kernels();

// Matrix-vector products: "auto" (default: int8 on the avx2 and avx512vnni variants, else int16), "int16" (x
// quantized per group to int16, integer dots, ~2e-5 relative), "int8" (int8 x for 4-bit weights, ~0.6%)
// or "exact" (float unpacking). matvec_mode() is the mode in force (auto resolved).
MatvecMode matvec_mode();
const char* matvec_mode_name();            // "auto", "int16", "int8" or "exact": the setting
const char* effective_matvec_mode_name();  // what it means on the current variant (auto resolved)
void set_matvec_mode(const std::string& mode);

// Many-row products of quantized and bf16 weights (a prefill): "auto" (default: "bf16" where the kernels have
// the bf16 GEMM, Kernels::bf16, else "fp32"), "bf16" (x and the weights rounded to bf16, fp32 sums; an error
// where the kernels lack it) or "fp32" (the fp32 GEMM). fp32 weights always take the fp32 GEMM.
// prefill_bf16(): the bf16 GEMM serves those products now (auto resolved, on the current variant).
bool prefill_bf16();
const char* prefill_mode_name();            // "auto", "bf16" or "fp32": the setting
const char* effective_prefill_mode_name();  // "bf16" or "fp32": what runs on the current variant
void set_prefill_mode(const std::string& mode);

ThreadPool& pool();
int num_threads();
void set_num_threads(int n);

}  // namespace csmd
