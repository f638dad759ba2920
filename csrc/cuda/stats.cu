// CUDA kernels of the gradient-statistics pass (lowbit::grad_stats; spec:
// lowbit.reference.clip.grad_stats; the CPU kernel is csrc/cpu/stats_impl.h). Per tensor: the sum
// of squares and the largest magnitude of the finite elements (after the optional clip transform
// of lowbit/clip_math.h, the code the CPU and the fused step run), and the numbers of inf/NaN and
// of NaN elements of the raw gradient.
//
// Determinism without float atomics: every CUDA block reduces one work item (kStatsItem
// consecutive elements of one tensor) to a partial (double sum, counts, max bits) in its own slot
// of a caller-provided device workspace; a second, one-warp-per-tensor kernel then combines each
// tensor's partials in a fixed order. Both launches go to the same stream, so the second sees the
// first's writes without any host synchronization, and for fixed sizes the result is the same
// bits on every run. Squares are taken in float64, where the square of an fp32 value is exact
// (24-bit significand -> at most 48 bits), so sums differ from the reference's only by the
// order of the float64 additions; counts and maxima are exact.
//
// Capture (StatsArgs::tau non-null, flags 0): every finite element with |g| > tau[t] takes a
// slot from its tensor's int64 counter with one atomicAdd and stores |g| there while the slot is
// below the capacity. Elements above tau are rare (tau tracks the largest |g| of recent steps), so
// the atomics cost little; the counts are exact, the order of the stored values depends on
// scheduling (the spec leaves it open). A template bool keeps the plain kernel unchanged.
//
// Multi-tensor table: as in optim.cu, per-tensor pointers, sizes and the prefix sums of work
// items travel BY VALUE as a kernel parameter, one launch pair per chunk of up to kStatsChunk
// tensors.
#include "cuda/launchers.h"
#include "cuda/primitives.cuh"
#include "lowbit/clip_math.h"
#include "lowbit/formats.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kStatsChunk = 64;       // tensors per launch (kernel-parameter budget)
constexpr int kStatsThreads = 256;    // threads of a statistics block
constexpr int kStatsPerThread = 32;   // elements per thread of a work item
constexpr int64_t kStatsItem = (int64_t)kStatsThreads * kStatsPerThread;  // elements per block
constexpr int kStatsParamBytes = 4096;  // classic kernel-parameter limit

// One work item's partial statistics (a 32-byte workspace slot). The two counts of a work item
// fit in 32 bits each (kStatsItem elements), so the block reduction carries them packed in one
// 64-bit word; partials keep them apart, since a tensor's totals may exceed 32 bits.
struct StatsPart {
  double sumsq;
  uint64_t bad;       // inf/NaN elements of the raw gradient
  uint64_t nan;       // NaN elements of the raw gradient
  uint32_t max_bits;  // largest finite |element| after the transform, as fp32 bits
  uint32_t unused;
};

// Up to kStatsChunk tensors of one dtype. item_start[t] = index (within the chunk's slice of the
// workspace) of tensor t's first work item; item_start[count] = the chunk's number of items.
// xform and out point at the chunk's first tensor's row.
struct StatsChunk {
  const void* g[kStatsChunk];
  int64_t n[kStatsChunk];
  int64_t item_start[kStatsChunk + 1];
  const ClipTensor* xform;  // device memory, or null
  double* out;              // device memory, 4 per tensor
  // The capture's targets (device memory; null without a capture) at the chunk's first tensor,
  // indexed by t like xform and out: four words instead of three pointers per tensor.
  const float* tau;     // [count]
  float* over;          // tensor t's row at over + t * capacity
  int64_t* over_count;  // [count]
  int64_t capacity;
  int count;
};

// stats_kernel takes (StatsChunk, cv, flags, parts) by value.
static_assert(sizeof(StatsChunk) + sizeof(float) + sizeof(int) + sizeof(void*) <=
                  kStatsParamBytes,
              "statistics kernel parameters exceed 4 KB: lower kStatsChunk");

constexpr uint64_t kNanCount = 1ull << 32;  // one NaN in the high half of a packed count word

int64_t items_of(int64_t n) { return (n + kStatsItem - 1) / kStatsItem; }

// One tensor's capture target as a block sees it; tau as the smallest bit pattern of |g| it
// takes (capture_floor_bits, shared with the CPU kernel).
struct CaptureRow {
  uint32_t floor_bits;
  unsigned long long* count;  // the tensor's int64 counter (atomicAdd has no int64_t overload)
  float* row;
  unsigned long long capacity;
};

__device__ __forceinline__ CaptureRow capture_row(const StatsChunk& c, int t) {
  return CaptureRow{capture_floor_bits(c.tau[t]), reinterpret_cast<unsigned long long*>(c.over_count + t),
                    c.over + t * c.capacity, (unsigned long long)c.capacity};
}

// Captures the raw element whose magnitude has the bits `ra`, if it is finite and above tau. The
// slot is the count before this element's increment, so concurrent threads never share one.
__device__ __forceinline__ void capture(uint32_t ra, const CaptureRow& cap) {
  if (ra < 0x7F800000u && ra >= cap.floor_bits) {
    const unsigned long long slot = atomicAdd(cap.count, 1ull);
    if (slot < cap.capacity) cap.row[slot] = bits_f32(ra);
  }
}

// Element i of g into the thread's running statistics (`counts`: inf/NaN low, NaN high).
// With CAP, also the capture of the raw element (`cap` is unused otherwise).
template <int DT, bool XF, bool CAP>
__device__ __forceinline__ void accumulate(const void* g, int64_t i, int flags, float cv,
                                           const ClipTensor& ct, const CaptureRow& cap,
                                           double& sumsq, uint64_t& counts, uint32_t& max_bits) {
  const float raw = load_f32(g, DT, i);
  const uint32_t ra = abs_bits(raw);
  if (CAP) capture(ra, cap);
  const bool finite = ra < 0x7F800000u;
  counts += (finite ? 0u : 1u) + (ra > 0x7F800000u ? kNanCount : 0u);
  bool clipped;  // the step's counter, not a statistic
  const float x = XF ? clip_transform(raw, flags, cv, ct, clipped) : raw;
  const double d = finite ? (double)x : 0.0;
  sumsq += d * d;  // exact product: an FMA contraction gives the same sum
  const uint32_t a = abs_bits(x);
  max_bits = finite && a > max_bits ? a : max_bits;
}

// One CUDA block per work item; its partial goes to parts[blockIdx.x]. CAP: with the capture.
template <int DT, bool XF, bool CAP>
__global__ void __launch_bounds__(kStatsThreads)
stats_kernel(const StatsChunk c, const float cv, const int flags, StatsPart* __restrict__ parts) {
  __shared__ double s_sum[kMaxWarps + 1];
  __shared__ uint64_t s_cnt[kMaxWarps + 1];
  __shared__ uint32_t s_max[kMaxWarps + 1];
  // Which tensor: the last whose first item is <= blockIdx.x (a linear scan over a small chunk;
  // empty tensors have no items and are skipped by the strict comparison).
  const int64_t item = blockIdx.x;
  int t = 0;
  while (t + 1 < c.count && c.item_start[t + 1] <= item) ++t;
  const int64_t begin = (item - c.item_start[t]) * kStatsItem;
  const int64_t end = begin + kStatsItem < c.n[t] ? begin + kStatsItem : c.n[t];
  const void* __restrict__ g = c.g[t];
  const ClipTensor ct = XF && c.xform ? c.xform[t] : ClipTensor{1.0f, 0.0f, 1.0f, 1.0f};
  const CaptureRow cap = CAP ? capture_row(c, t) : CaptureRow{};

  double sumsq = 0.0;
  uint64_t counts = 0;
  uint32_t max_bits = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)  // coalesced
    accumulate<DT, XF, CAP>(g, i, flags, cv, ct, cap, sumsq, counts, max_bits);

  // Fixed-shape trees (block_allreduce): the same order on every run.
  sumsq = block_allreduce(sumsq, SumF64(), 0.0, s_sum);
  counts = block_allreduce(counts, SumU64(), (uint64_t)0, s_cnt);
  max_bits = block_allreduce(max_bits, MaxU32(), 0u, s_max);
  if (threadIdx.x == 0)
    parts[item] = StatsPart{sumsq, counts & 0xFFFFFFFFu, counts >> 32, max_bits, 0u};
}

// One warp per tensor of the chunk: lane l takes the tensor's items l, l + 32, ... in order, then
// a butterfly combines the lanes. A tensor without items (no elements) writes zeros.
__global__ void __launch_bounds__(kWarpSize)
stats_combine_kernel(const StatsChunk c, const StatsPart* __restrict__ parts) {
  const int t = blockIdx.x, lane = threadIdx.x;
  double sumsq = 0.0;
  uint64_t bad = 0, nan = 0;
  uint32_t max_bits = 0;
  for (int64_t p = c.item_start[t] + lane; p < c.item_start[t + 1]; p += kWarpSize) {
    const StatsPart part = parts[p];
    sumsq += part.sumsq;
    bad += part.bad;
    nan += part.nan;
    max_bits = MaxU32()(max_bits, part.max_bits);
  }
  sumsq = warp_allreduce(sumsq, SumF64());
  bad = warp_allreduce(bad, SumU64());
  nan = warp_allreduce(nan, SumU64());
  max_bits = warp_allreduce(max_bits, MaxU32());
  if (lane == 0) {
    double* o = c.out + 4 * (int64_t)t;
    o[0] = sumsq;
    o[1] = (double)bad;
    o[2] = (double)bits_f32(max_bits);
    o[3] = (double)nan;
  }
}

// ---- host side ---------------------------------------------------------------------------------

// Tensors [first, first + count) of the call; returns the chunk's number of work items.
int64_t fill_stats_chunk(StatsChunk& c, const StatsArgs& a, int first) {
  c = StatsChunk{};
  c.count = a.ntensors - first < kStatsChunk ? a.ntensors - first : kStatsChunk;
  int64_t total = 0;
  for (int j = 0; j < c.count; ++j) {
    c.g[j] = a.g[first + j];
    c.n[j] = a.n[first + j];
    c.item_start[j] = total;
    total += items_of(a.n[first + j]);
  }
  c.item_start[c.count] = total;
  c.xform = a.xform ? a.xform + first : nullptr;
  c.out = a.out + 4 * (int64_t)first;
  if (a.tau) {
    c.tau = a.tau + first;
    c.over = a.over + first * a.capacity;
    c.over_count = a.over_count + first;
    c.capacity = a.capacity;
  }
  return total;
}

// Every chunk of the call with the kernel instance for (DT, XF, CAP). Chunk k's partials take the
// workspace slots after chunk k-1's, so no launch overwrites a slot another still has to read
// (stream order would allow reuse; disjoint slots keep that reasoning out of the picture).
template <int DT, bool XF, bool CAP>
cudaError_t run_stats(const StatsArgs& a, StatsPart* parts, cudaStream_t stream) {
  for (int first = 0; first < a.ntensors; first += kStatsChunk) {
    StatsChunk c;
    const int64_t items = fill_stats_chunk(c, a, first);
    if (items > 0x7FFFFFFF) return cudaErrorInvalidValue;  // gridDim.x limit
    if (items > 0) {  // an empty grid is an invalid configuration on CUDA
      auto kernel = stats_kernel<DT, XF, CAP>;
      LOWBIT_LAUNCH(kernel, dim3((unsigned)items), dim3(kStatsThreads), 0, stream, c, a.cv,
                    a.flags, parts);
    }
    auto combine = stats_combine_kernel;
    LOWBIT_LAUNCH(combine, dim3((unsigned)c.count), dim3(kWarpSize), 0, stream, c,
                  (const StatsPart*)parts);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    parts += items;
  }
  return cudaSuccess;
}

template <int DT>
cudaError_t stats_by_flags(const StatsArgs& a, StatsPart* parts, cudaStream_t stream) {
  // Without a transform the instance carries no transform code at all; the capture comes only
  // without one (valid_stats_args), so it needs no transform instance.
  if (a.tau) return run_stats<DT, false, true>(a, parts, stream);
  if (a.flags != 0) return run_stats<DT, true, false>(a, parts, stream);
  return run_stats<DT, false, false>(a, parts, stream);
}

bool valid_stats_args(const StatsArgs& a) {
  if (a.ntensors < 0) return false;
  if (a.ntensors > 0 && (a.g == nullptr || a.n == nullptr || a.out == nullptr)) return false;
  if (a.dtype != kF32 && a.dtype != kBF16 && a.dtype != kF16) return false;
  if ((a.flags & ~kStatsFlags) != 0) return false;
  if ((a.flags & kStatsRowFlags) != 0 && a.xform == nullptr) return false;
  // the capture works on the raw gradients (as the bindings check: stats_lists.h)
  if (a.tau && (a.flags != 0 || a.over == nullptr || a.over_count == nullptr || a.capacity < 0))
    return false;
  for (int i = 0; i < a.ntensors; ++i)
    if (a.n[i] < 0) return false;
  return true;
}

}  // namespace

size_t grad_stats_workspace(const int64_t* n, int ntensors) {
  int64_t items = 0;
  for (int i = 0; i < ntensors; ++i) items += n[i] > 0 ? items_of(n[i]) : 0;
  return (size_t)items * sizeof(StatsPart);
}

cudaError_t grad_stats(const StatsArgs& a, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (!valid_stats_args(a)) return cudaErrorInvalidValue;
  const size_t need = grad_stats_workspace(a.n, a.ntensors);
  if (workspace_bytes < need || (need > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  StatsPart* parts = static_cast<StatsPart*>(workspace);
  switch (a.dtype) {
    case kBF16: return stats_by_flags<kBF16>(a, parts, stream);
    case kF16: return stats_by_flags<kF16>(a, parts, stream);
    default: return stats_by_flags<kF32>(a, parts, stream);
  }
}

}  // namespace cuda
}  // namespace lowbit
