// The CPU kernels compiled for avx2; dispatch.cpp calls them only on CPUs that support it.
#pragma GCC target("avx2,bmi2")
#include "cpu_kernels.h"
#define LOWBIT_ISA_NS avx2
#define LOWBIT_ISA_AVX2 1
#include "kernels_impl.h"
#include "optim_impl.h"
#include "stats_impl.h"
#include "lowprec_impl.h"
