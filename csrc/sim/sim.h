// lowbit's test-only CUDA simulator: just enough of the CUDA programming model to run the
// kernels of csrc/cuda/*.cu, unchanged, on the CPU (DESIGN.md, "CUDA without a GPU").
//
// Model. A launch runs the blocks of the grid one after another on the calling OS thread. Each
// CUDA thread of a block is a cooperative fiber with its own stack. A round-robin scheduler runs
// every fiber until it completes or reaches a synchronization point:
//   __syncthreads()             waits until all threads of the block arrive at the same call site
//   __shfl_xor/down_sync(mask)  waits until every lane in `mask` of the warp arrives at the same
//                               call site with the same mask, then reads the source lane's value
// so barrier and shuffle results have real CUDA semantics, not just the semantics of code that
// happens to work when threads run one at a time. Misuse that would hang or be undefined on a GPU
// raises std::runtime_error (a Python RuntimeError) with a message instead: a barrier or shuffle
// that some threads never reach (they exited, or wait elsewhere), two different __syncthreads()
// sites, or lanes of a warp disagreeing about a shuffle's mask or call site.
//
// Atomics: atomicMax on unsigned int and atomicAdd on unsigned long long and double (what the
// kernels use).
// Fibers never preempt each other and blocks run one after another, so a plain read-modify-write
// is atomic here; add others the same way if a kernel needs them.
//
// Limits, on purpose (the kernels do not need more): one shuffle group per warp at a time (no
// disjoint sub-warp masks), no dynamic shared memory, streams are ignored (launches are
// synchronous). __CUDA_ARCH__ stays undefined, so shared
// __host__ __device__ helpers take their host branches, which compute identical results.
//
// Cost: a context switch is ~10 instructions (hand-written on x86-64; ucontext elsewhere, or with
// -DLOWBIT_SIM_UCONTEXT, ~10x slower since swapcontext makes a sigprocmask syscall), so a
// 256-thread block with a dozen synchronization points costs tens of microseconds.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// Context switches: hand-written on x86-64, ucontext elsewhere (or when LOWBIT_SIM_UCONTEXT is set,
// to test that path).
#if defined(__x86_64__) && !defined(LOWBIT_SIM_UCONTEXT)
#define LOWBIT_SIM_ASM_SWITCH 1
#else
#define LOWBIT_SIM_ASM_SWITCH 0
#include <ucontext.h>
#endif

// ---- CUDA keywords and types -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A function-local `static` is one object shared by every call, i.e. by every fiber of the block
// that is running: exactly CUDA's per-block __shared__ (uninitialized on a GPU; here it keeps the
// previous block's contents, which correct kernels never read). thread_local keeps concurrent
// launches from different OS threads apart.
#define __shared__ static thread_local

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
static constexpr int warpSize = 32;

namespace lowbit_sim {

// ---- fibers --------------------------------------------------------------------------------
enum class State { Ready, AtBarrier, AtShuffle, Done };

struct Fiber {
#if LOWBIT_SIM_ASM_SWITCH
  void* sp;  // saved stack pointer while suspended
#else
  ucontext_t ctx;
#endif
  char* stack;
  uint3 tid;
  int lane, warp;
  State state;
  uint64_t wait_gen;  // generation of the barrier / warp exchange it waits on
  const char* file;   // where it waits (for messages)
  int line;
};

struct Warp {  // one shuffle exchange in flight per warp
  int nlanes, arrived = 0;
  uint64_t gen = 0;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t slot[2][32];  // double-buffered by generation: a fast lane may deposit for the next
                         // shuffle while a slow one still reads this one's values
};

struct Runtime {  // per OS thread
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  char* stacks = nullptr;
  size_t nstacks = 0;
  Fiber* cur = nullptr;
#if LOWBIT_SIM_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  int nthreads = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::string error;  // set by a fiber that detected misuse; the scheduler throws it
  void (*body)(void*) = nullptr;  // runs the kernel with the launch's arguments
  void* body_arg = nullptr;
};

inline thread_local Runtime rt;
static constexpr size_t kStack = 64 * 1024;  // per fiber; the lowest page is a guard page
static constexpr int kMaxThreads = 1024;

inline std::string where(const char* file, int line) {
  return std::string(file ? file : "?") + ":" + std::to_string(line);
}
inline std::string tid_str(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ")";
}
inline std::string block_str() {
  return "block (" + std::to_string(rt.block_idx.x) + "," + std::to_string(rt.block_idx.y) + "," +
         std::to_string(rt.block_idx.z) + ")";
}

#if LOWBIT_SIM_ASM_SWITCH
// Saves the callee-saved registers and the stack pointer of the running context into *save_sp
// and resumes the context whose stack pointer is `load_sp`. Everything else is caller-saved under
// the SysV ABI, so the compiler has already spilled it around this (opaque) call.
// Arguments arrive in rdi (save_sp) and rsi (load_sp); a naked function cannot name them.
__attribute__((naked, noinline)) static void switch_stack(void** /*save_sp*/, void* /*load_sp*/) {
  __asm__ volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
inline void to_scheduler() { switch_stack(&rt.cur->sp, rt.sched_sp); }
inline void to_fiber(Fiber& f) { switch_stack(&rt.sched_sp, f.sp); }
#else
inline void to_scheduler() { swapcontext(&rt.cur->ctx, &rt.sched_ctx); }
inline void to_fiber(Fiber& f) { swapcontext(&rt.sched_ctx, &f.ctx); }
#endif

// Stops the fiber for good with a message; the scheduler throws it after the switch.
[[noreturn]] inline void fail(const std::string& msg) {
  rt.error = block_str() + " " + tid_str(*rt.cur) + ": " + msg;
  to_scheduler();
  __builtin_unreachable();
}

// First code a fiber runs: the kernel body for this thread, then back to the scheduler forever.
inline void fiber_entry() {
  rt.body(rt.body_arg);
  rt.cur->state = State::Done;
  to_scheduler();
  __builtin_unreachable();
}

inline void make_fiber(Fiber& f) {
#if LOWBIT_SIM_ASM_SWITCH
  char* top = f.stack + kStack;  // 16-byte aligned (stacks are page aligned)
  // Frame that switch_stack's pops + ret consume: six zeroed registers, then fiber_entry as the
  // return address, placed so fiber_entry starts with rsp = 8 (mod 16) as after a real call.
  void** sp = (void**)(top - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = (void*)&fiber_entry;
  sp[7] = nullptr;  // fake return address of fiber_entry (it never returns)
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_entry, 0);
#endif
}

inline void ensure_stacks(size_t n) {
  if (rt.nstacks >= n) return;
  if (rt.stacks) munmap(rt.stacks, rt.nstacks * kStack);
  // Pages are committed only when touched, so the reservation for 1024 threads is cheap.
  void* p = mmap(nullptr, n * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("lowbit sim: cannot allocate fiber stacks");
  rt.stacks = (char*)p;
  rt.nstacks = n;
  for (size_t i = 0; i < n; ++i) mprotect(rt.stacks + i * kStack, 4096, PROT_NONE);
}

// ---- synchronization (called from fibers) ------------------------------------------------------
inline void syncthreads(const char* file, int line) {
  Fiber& f = *rt.cur;
  if (rt.bar_arrived == 0) {
    rt.bar_file = file;
    rt.bar_line = line;
  } else if (line != rt.bar_line || strcmp(file, rt.bar_file) != 0) {
    fail("__syncthreads() at " + where(file, line) + " while other threads of the block wait "
         "at __syncthreads() at " + where(rt.bar_file, rt.bar_line) + " (divergent barrier)");
  }
  if (++rt.bar_arrived == rt.nthreads) {  // last to arrive releases everybody and runs on
    rt.bar_arrived = 0;
    ++rt.bar_gen;
    return;
  }
  f.state = State::AtBarrier;
  f.wait_gen = rt.bar_gen;
  f.file = file;
  f.line = line;
  to_scheduler();
}

// One warp-synchronous exchange: deposits `mine`, waits for the lanes of `mask`, returns the value
// deposited by lane `src` (this lane's own when src < 0).
inline uint64_t shuffle(unsigned mask, uint64_t mine, int src, const char* what, const char* file,
                        int line) {
  Fiber& f = *rt.cur;
  Warp& w = rt.warps[f.warp];
  // Messages are built only on failure: this is the hot path of every reduction.
  auto site = [&] { return std::string(what) + " at " + where(file, line); };
  auto hex = [](unsigned m) {
    char b[16];
    snprintf(b, sizeof b, "0x%08x", m);
    return std::string(b);
  };
  if (!(mask >> f.lane & 1u))
    fail(site() + ": mask " + hex(mask) + " does not include the calling lane " +
         std::to_string(f.lane));
  if (w.nlanes < 32 && (mask >> w.nlanes) != 0)
    fail(site() + ": mask " + hex(mask) + " names lanes beyond the warp's " +
         std::to_string(w.nlanes) + " threads");
  if (w.arrived == 0) {
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (mask != w.mask || line != w.line || strcmp(file, w.file) != 0) {
    fail(site() + " with mask " + hex(mask) + " while other lanes of warp " +
         std::to_string(f.warp) + " are in a shuffle at " + where(w.file, w.line) +
         " with mask " + hex(w.mask) + " (mismatched shuffle)");
  }
  if (src >= 0 && !(mask >> src & 1u))
    fail(site() + ": reads lane " + std::to_string(src) + ", which is not in the mask " +
         hex(mask));
  const uint64_t gen = w.gen;
  w.slot[gen & 1][f.lane] = mine;
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.gen;
  } else {
    f.state = State::AtShuffle;
    f.wait_gen = gen;
    f.file = file;
    f.line = line;
    to_scheduler();
  }
  return src < 0 ? mine : w.slot[gen & 1][src];
}

template <typename T>
inline uint64_t to_u64(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_u64(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

// ---- the scheduler -----------------------------------------------------------------------------
inline bool runnable(const Fiber& f) {
  switch (f.state) {
    case State::Ready: return true;
    case State::AtBarrier: return rt.bar_gen != f.wait_gen;
    case State::AtShuffle: return rt.warps[f.warp].gen != f.wait_gen;
    default: return false;
  }
}

// Everybody left is blocked: describe who waits where, and who has already exited.
[[noreturn]] inline void deadlock() {
  std::string msg = "lowbit sim: " + block_str() + ": deadlock:";
  int done = 0;
  std::vector<std::string> seen;
  for (const Fiber& f : rt.fibers) {
    if (f.state == State::Done) { ++done; continue; }
    std::string s = f.state == State::AtBarrier
                        ? " __syncthreads() at "
                        : " warp " + std::to_string(f.warp) + " shuffle at ";
    s += where(f.file, f.line);
    bool dup = false;
    for (auto& t : seen) dup |= (t == s);
    if (!dup) seen.push_back(s);
  }
  for (auto& s : seen) msg += s + " waits for threads that never arrive;";
  msg += " " + std::to_string(done) + " of " + std::to_string(rt.nthreads) +
         " threads already exited (a barrier or shuffle that not every thread reaches)";
  throw std::runtime_error(msg);
}

inline void run_block() {
  rt.bar_arrived = 0;
  for (Warp& w : rt.warps) w.arrived = 0;
  for (Fiber& f : rt.fibers) {
    f.state = State::Ready;
    make_fiber(f);
  }
  for (int live = rt.nthreads; live > 0;) {
    bool progress = false;
    for (Fiber& f : rt.fibers) {
      if (!runnable(f)) continue;
      f.state = State::Ready;
      rt.cur = &f;
      to_fiber(f);
      progress = true;
      if (!rt.error.empty()) {
        std::string msg = "lowbit sim: " + rt.error;
        rt.error.clear();
        throw std::runtime_error(msg);
      }
      if (f.state == State::Done) --live;
    }
    if (!progress && live > 0) deadlock();
  }
}

// Runs body(arg) as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  const uint64_t nt = (uint64_t)block.x * block.y * block.z;
  if (nt == 0 || nt > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    throw std::runtime_error(
        "lowbit sim: invalid launch configuration (cudaErrorInvalidConfiguration)");
  ensure_stacks(nt);
  rt.nthreads = (int)nt;
  rt.fibers.assign(nt, Fiber{});
  rt.warps.assign((nt + 31) / 32, Warp{});
  for (uint64_t i = 0; i < nt; ++i) {
    Fiber& f = rt.fibers[i];
    f.stack = rt.stacks + i * kStack;
    f.tid = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                  (unsigned)(i / ((uint64_t)block.x * block.y))};
    f.lane = (int)(i % 32);
    f.warp = (int)(i / 32);
  }
  for (size_t w = 0; w < rt.warps.size(); ++w)
    rt.warps[w].nlanes = (int)(nt - 32 * w < 32 ? nt - 32 * w : 32);
  rt.block_dim = block;
  rt.grid_dim = grid;
  rt.body = body;
  rt.body_arg = arg;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        rt.block_idx = uint3{x, y, z};
        run_block();
      }
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the kernel's
// parameter types once, as a real launch does, and every thread gets its own copy.
template <typename... P, typename... A>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...),
                   A&&... args) {
  if (smem != 0) throw std::runtime_error("lowbit sim: dynamic shared memory is not simulated");
  struct Call {
    void (*k)(P...);
    std::tuple<P...> params;
  } call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  run_grid(grid, block, [](void* c) {
    Call& cl = *(Call*)c;
    std::tuple<P...> mine = cl.params;
    std::apply(cl.k, mine);
  }, &call);
}

}  // namespace lowbit_sim

// ---- CUDA built-ins ----------------------------------------------------------------------------
#define threadIdx (::lowbit_sim::rt.cur->tid)
#define blockIdx (::lowbit_sim::rt.block_idx)
#define blockDim (::lowbit_sim::rt.block_dim)
#define gridDim (::lowbit_sim::rt.grid_dim)

// __builtin_FILE/LINE as default arguments evaluate at the caller: the call site identifies the
// barrier or shuffle.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  lowbit_sim::syncthreads(file, line);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  // Lanes may read from their own or an earlier width-segment, never a later one.
  const int lane = lowbit_sim::rt.cur->lane, src = lane ^ lane_mask;
  const bool own = src >= 32 || src / width > lane / width;
  return lowbit_sim::from_u64<T>(lowbit_sim::shuffle(mask, lowbit_sim::to_u64(var), own ? -1 : src,
                                                     "__shfl_xor_sync", file, line));
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  // A source beyond the end of the lane's width-segment leaves the value unchanged.
  const int lane = lowbit_sim::rt.cur->lane;
  const bool own = lane % width + (int)delta >= width;
  return lowbit_sim::from_u64<T>(lowbit_sim::shuffle(mask, lowbit_sim::to_u64(var),
                                                     own ? -1 : lane + (int)delta,
                                                     "__shfl_down_sync", file, line));
}

// A read-modify-write between two synchronization points cannot be interleaved with another
// fiber's (see the model above), so these are atomic for global and shared memory alike.
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  const unsigned long long old = *address;
  *address = old + val;
  return old;
}

inline double atomicAdd(double* address, double val) {
  const double old = *address;
  *address = old + val;
  return old;
}

inline unsigned int atomicMax(unsigned int* address, unsigned int val) {
  const unsigned int old = *address;
  if (val > old) *address = val;
  return old;
}

// Launches are synchronous and failures throw, so there is never a sticky error to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "error";
}
