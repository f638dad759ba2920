// Fused multi-tensor Adam/AdamW step on the CPU: one call updates every tensor of a parameter
// group (same state format), reading grad, param and states once and writing param and states
// once (DESIGN.md contract 5). OpenMP over the blocks of all tensors together.
//
// First slice of issue 3: fp32 params and grads, 32/8/4-bit states, plain loops (the
// vectorized search paths of kernels_impl.h come next). Per-element math: lowbit/adam.h; state
// quantization: lowbit/quant.h — so the results equal lowbit.reference.optim bit for bit.
#include "cpu/optim.h"

#include <vector>

#include "lowbit/adam.h"
#include "lowbit/formats.h"
#include "lowbit/quant.h"

namespace lowbit {
namespace cpu {

namespace {

// Work item: one block of one tensor.
struct BlockRef {
  int tensor;
  int64_t block;
};

float dequant_code(const uint8_t* codes, int64_t k, bool four_bit, const float* code, float am) {
  int c;
  if (four_bit) {
    const uint8_t byte = codes[k >> 1];
    c = (k & 1) ? (byte & 0xF) : (byte >> 4);
  } else {
    c = codes[k];
  }
  return dequant_value(code[c], am);
}

// Quantize vals[0..len) (fp32) into block `b` of a state: absmax from the new values, nearest
// codes, 4-bit codes packed with element 2j in the high nibble.
void requantize(const float* vals, int64_t len, int64_t begin, int64_t b, bool four_bit,
                const float* mids, int ncode, uint8_t* codes, float* absmax) {
  uint32_t mx = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t a = abs_bits(vals[i]);
    mx = a > mx ? a : mx;
  }
  const float am = bits_f32(mx);
  absmax[b] = am;
  const float inv = unit_scale(am);
  for (int64_t i = 0; i < len; ++i) {
    const int idx = nearest_index(scale_to_unit(vals[i], inv), mids, ncode - 1);
    const int64_t k = begin + i;
    if (four_bit) {
      // blocks have even size and start on a byte: the even element opens the byte (low nibble
      // 0, which stays for an odd tail), the odd one fills it
      uint8_t& byte = codes[k >> 1];
      byte = (k & 1) ? (uint8_t)(byte | idx) : (uint8_t)(idx << 4);
    } else {
      codes[k] = (uint8_t)idx;
    }
  }
}

}  // namespace

void adam_step(const AdamArgs& a) {
  const int64_t block = a.state_bits == 32 ? 4096 : a.block;
  std::vector<BlockRef> work;
  for (int t = 0; t < a.ntensors; ++t) {
    const int64_t nb = (a.tensors[t].n + block - 1) / block;
    for (int64_t b = 0; b < nb; ++b) work.push_back({t, b});
  }
  const bool four_bit = a.ncode == 16;
  int64_t total = 0;
  for (int t = 0; t < a.ntensors; ++t) total += a.tensors[t].n;
  const int64_t nwork = (int64_t)work.size();
#pragma omp parallel for schedule(static) if (total >= (1 << 16))
  for (int64_t w = 0; w < nwork; ++w) {
    const AdamTensor& t = a.tensors[work[w].tensor];
    const int64_t b = work[w].block;
    const int64_t begin = b * block;
    const int64_t len = t.n - begin < block ? t.n - begin : block;
    if (a.state_bits == 32) {
      float* m = (float*)t.m;
      float* v = (float*)t.v;
      for (int64_t i = begin; i < begin + len; ++i)
        adam_update_one(&t.p[i], t.g[i], &m[i], &v[i], a.s);
      continue;
    }
    float mbuf[4096], vbuf[4096];
    const float am_m = t.m_absmax[b], am_v = t.v_absmax[b];
    for (int64_t i = 0; i < len; ++i) {
      const int64_t k = begin + i;
      mbuf[i] = dequant_code((const uint8_t*)t.m, k, four_bit, a.m_code, am_m);
      vbuf[i] = dequant_code((const uint8_t*)t.v, k, four_bit, a.v_code, am_v);
      adam_update_one(&t.p[k], t.g[k], &mbuf[i], &vbuf[i], a.s);
    }
    requantize(mbuf, len, begin, b, four_bit, a.m_mids, a.ncode, (uint8_t*)t.m, t.m_absmax);
    requantize(vbuf, len, begin, b, four_bit, a.v_mids, a.ncode, (uint8_t*)t.v, t.v_absmax);
  }
}

}  // namespace cpu
}  // namespace lowbit
