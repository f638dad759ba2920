// Runtime ISA dispatch for the CPU kernels, and host-side helpers they need.
#include "cpu_kernels.h"

#include "lowbit/quant.h"

#include <stdlib.h>
#include <string.h>

namespace lowbit {
namespace cpu {

namespace {
enum class Isa { kAvx512, kAvx2, kScalar };

Isa best_supported() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return Isa::kAvx2;
  return Isa::kScalar;
}

// LOWBIT_CPU_ISA=avx2|scalar forces a lower clone (the tests use it so that every clone runs);
// a request above what the CPU supports is ignored.
Isa detect() {
  const Isa best = best_supported();
  const char* forced = getenv("LOWBIT_CPU_ISA");
  if (forced == nullptr) return best;
  if (strcmp(forced, "scalar") == 0) return Isa::kScalar;
  if (strcmp(forced, "avx2") == 0 && best != Isa::kScalar) return Isa::kAvx2;
  return best;
}

const Isa kIsa = detect();
}  // namespace

const char* isa_name() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

#define LOWBIT_DISPATCH(fn, args)                  \
  switch (kIsa) {                                  \
    case Isa::kAvx512: avx512::fn(args); break;    \
    case Isa::kAvx2: avx2::fn(args); break;        \
    default: scalar::fn(args); break;              \
  }

void quantize_blockwise(const QuantArgs& a) { LOWBIT_DISPATCH(quantize_blockwise, a) }
void dequantize_blockwise(const DequantArgs& a) { LOWBIT_DISPATCH(dequantize_blockwise, a) }
void stochastic_round(const RoundArgs& a) { LOWBIT_DISPATCH(stochastic_round, a) }
void philox_words(const PhiloxArgs& a) { LOWBIT_DISPATCH(philox_words, a) }
void optim_step(const OptimCpuArgs& a) { LOWBIT_DISPATCH(optim_step, a) }
void grad_stats(const StatsArgs& a) { LOWBIT_DISPATCH(grad_stats, a) }
void lowprec(const LowprecArgs& a) { LOWBIT_DISPATCH(lowprec, a) }

void build_nearest_lut(const float* mids, int nmid, int32_t* table, int* max_inside,
                       uint32_t* packed) {
  int worst = 0;
  for (uint32_t key = 0; key < 65536; ++key) {
    if (((key >> 7) & 0xFFu) == 0xFFu) {  // inf/NaN bucket: only NaN y lands here -> index 0
      table[key] = 0;
      packed[key] = 0;
      continue;
    }
    const bool negative = key & 0x8000u;
    // The smallest and largest fp32 values whose top 16 bits are `key`.
    const float lowest = bits_f32(negative ? (key << 16) | 0xFFFFu : key << 16);
    const float highest = bits_f32(negative ? key << 16 : (key << 16) | 0xFFFFu);
    const int below = nearest_index(lowest, mids, nmid);
    const int inside = nearest_index(highest, mids, nmid) - below;
    worst = inside > worst ? inside : worst;
    table[key] = (int32_t)((uint32_t)below | ((uint32_t)inside << 16));
    const uint32_t mid_lo = inside == 1 ? (f32_bits(mids[below]) & 0xFFFFu) : 0u;
    packed[key] = (uint32_t)(below & 0xFF) | (inside == 1 ? 0x100u : 0u) | (mid_lo << 16);
  }
  *max_inside = worst;
}

}  // namespace cpu
}  // namespace lowbit
