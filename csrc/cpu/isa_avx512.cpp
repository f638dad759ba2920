// The CPU kernels compiled for avx512; dispatch.cpp calls them only on CPUs that support it.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2,prefer-vector-width=512")
// GCC 12's own AVX-512 intrinsic headers trip -Wmaybe-uninitialized (their internal
// _mm512_undefined_* operands; GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu_kernels.h"
#define LOWBIT_ISA_NS avx512
#define LOWBIT_ISA_AVX512 1
#include "kernels_impl.h"
#include "optim_impl.h"
#include "stats_impl.h"
#include "lowprec_impl.h"
