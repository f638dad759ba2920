// CPU kernels over whole tensors. Each is compiled three times (isa_avx512.cpp, isa_avx2.cpp,
// isa_scalar.cpp) under different target flags; dispatch.cpp picks one at run time.
#pragma once
#include <stdint.h>

#include "lowbit/clip_math.h"
#include "lowbit/optim_args.h"
#include "lowbit/stats_args.h"

namespace lowbit {
namespace cpu {

// Exact accelerator for nearest-code search over a 256-entry codebook: entry k covers every
// fp32 y whose top 16 bits equal k; low 16 bits = number of midpoints below the bucket, high 16
// bits = number of midpoints inside it (each needs one comparison). Built by build_nearest_lut.
struct NearestLut {
  const int32_t* table;  // 65536 entries
  int max_inside;        // max over buckets of the "inside" count
  // When max_inside <= 1, `packed` answers with one load and integer compares: bits 0-7 = below,
  // bit 8 = a midpoint lies inside the bucket, bits 16-31 = that midpoint's low 16 bits. A value
  // y in bucket k and a midpoint inside it share their top 16 bits (fp32 order is the order of
  // the bit patterns within one sign), so mid < y compares the low halves: mid_lo < y_lo for a
  // positive bucket, mid_lo > y_lo for a negative one.
  const uint32_t* packed;
};

struct QuantArgs {
  const void* x; int x_dtype; int64_t n; int block;
  const float* code; const float* mids; int ncode;
  NearestLut lut;                 // used for ncode == 256 nearest rounding
  uint8_t* codes; float* absmax;
  bool stochastic; uint64_t seed; uint64_t offset;
};

struct DequantArgs {
  const uint8_t* codes; const float* absmax; const float* code; int ncode;
  int64_t n; int block; void* out; int out_dtype;
};

struct RoundArgs {
  const float* x; int64_t n; void* out; int fmt; uint64_t seed; uint64_t offset;
};

// Raw Philox words (lowbit.ops.philox_words): word w (< words <= 4) of counter counter0 + i goes
// to out[w * n + i]; counter0 + n <= 2**62.
struct PhiloxArgs {
  uint32_t* out; int64_t n; int words; uint64_t seed; uint64_t counter0;
};

// The fused optimizer step's arguments plus the CPU's nearest-code tables of the two state
// codebooks (8-bit states; unused otherwise).
struct OptimCpuArgs {
  OptArgs a;
  NearestLut lut1, lut2;
};

// lowbit.ops' lowprec contract (python/lowbit/ops.py): x (rows, cols) of dtype fp32/bf16/fp16;
// fmt -1 = rotation only; codes / out may be null; absmax = zeroed scratch, one float per group.
struct LowprecArgs {
  const void* x; int dtype; int64_t rows, cols;
  int fmt, scaling, block; bool e8m0, stochastic; uint64_t seed, offset; int had;
  uint8_t* codes; void* scales; void* out; float* absmax;
};

#define LOWBIT_DECLARE_ISA(ns)                          \
  namespace ns {                                        \
  void quantize_blockwise(const QuantArgs& a);          \
  void dequantize_blockwise(const DequantArgs& a);      \
  void stochastic_round(const RoundArgs& a);            \
  void philox_words(const PhiloxArgs& a);               \
  void optim_step(const OptimCpuArgs& a);               \
  void grad_stats(const StatsArgs& a);                  \
  void lowprec(const LowprecArgs& a);                   \
  }
LOWBIT_DECLARE_ISA(avx512)
LOWBIT_DECLARE_ISA(avx2)
LOWBIT_DECLARE_ISA(scalar)
#undef LOWBIT_DECLARE_ISA

// dispatch.cpp
const char* isa_name();
void build_nearest_lut(const float* mids, int nmid, int32_t* table, int* max_inside,
                       uint32_t* packed);
void quantize_blockwise(const QuantArgs& a);
void dequantize_blockwise(const DequantArgs& a);
void stochastic_round(const RoundArgs& a);
void philox_words(const PhiloxArgs& a);
void optim_step(const OptimCpuArgs& a);
void grad_stats(const StatsArgs& a);
void lowprec(const LowprecArgs& a);

}  // namespace cpu
}  // namespace lowbit
