// LOWBIT_HD marks the per-element math that CPU, CUDA and the CUDA sim all compile from this one
// source, so that every backend rounds, searches and draws random bits identically.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD static inline __attribute__((always_inline))
#endif

namespace lowbit {

// Type punning through memcpy-free unions is not portable to device code; these are the idioms
// both gcc and nvcc compile to a plain register move.
LOWBIT_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}

LOWBIT_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
#endif
}

// IEEE round-to-nearest division on every target: nvcc's default is IEEE too, but naming the
// intrinsic keeps it so under --use_fast_math.
LOWBIT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// IEEE round-to-nearest product that nvcc may not contract into an FMA with a later add.
LOWBIT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace lowbit
