// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), keyed and
// countered exactly as Triton's tl.randint / tl.randint4x:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(c), hi32(c), 0, 0)     for a 64-bit counter c
// so CPU, CUDA, the sim, Triton and the torch reference draw the same 32-bit words for the same
// (seed, offset, index). In the kernels, element i = offset + element index draws from one of
// two streams: word 0 of counter c = i (what tl.randint returns) for stochastic_round and
// stochastic quantize_blockwise, or philox_word_of below (word i % 4 of counter c = i / 4,
// tl.randint4x) for the optimizer write-back and the lowprec quantizers.
#pragma once
#include "hd.h"

namespace lowbit {

LOWBIT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
}

struct Philox4 {
  uint32_t w[4];
};

LOWBIT_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  // Fully unrolled so that CPU loops over elements vectorize around it.
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 r;
  r.w[0] = c0; r.w[1] = c1; r.w[2] = c2; r.w[3] = c3;
  return r;
}

// The one random word per element of stochastic_round and stochastic quantize_blockwise.
LOWBIT_HD uint32_t philox_word0(uint64_t seed, uint64_t counter) {
  return philox4x32_10(seed, counter).w[0];
}

// The optimizer write-back's and the lowprec quantizers' stream: element i takes word (i mod 4)
// of counter i / 4, so one Philox evaluation serves four consecutive elements (tl.randint4x's
// words on the Triton side).
LOWBIT_HD uint32_t philox_word_of(uint64_t seed, uint64_t i) {
  return philox4x32_10(seed, i >> 2).w[i & 3];
}

// A uniform in [0, 1) with 24 random bits: exact in fp32, identical on every backend.
LOWBIT_HD float uniform24(uint32_t r) { return (float)(r >> 8) * 5.9604644775390625e-08f; }

}  // namespace lowbit
