// The CPU kernels compiled for scalar; dispatch.cpp calls them only on CPUs that support it.
// baseline x86-64 (SSE2): no extra target flags
#include "cpu_kernels.h"
#define LOWBIT_ISA_NS scalar
#include "kernels_impl.h"
#include "optim_impl.h"
#include "stats_impl.h"
#include "lowprec_impl.h"
