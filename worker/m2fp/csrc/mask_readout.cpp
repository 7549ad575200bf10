// Fused multi-human mask readout, CPU: the op `m2fp::mask_readout`.
//
// The part of `worker.m2fp.postprocess.parse_multi_human` that touches every (query, output pixel):
// resize the low-res mask logits to the output size, sigmoid, accumulate the semantic map
// `sum_q class_probabilities[q, c] * sigmoid(logit_q)`, its argmax, and the per-query mask-score
// sums (sum of sigmoid where logit > 0, count of logit > 0), without ever holding a (Q, H, W) tensor:
//
//   mask_logits          (Q, h, w)  float32 (any strides)
//   class_probabilities  (Q, C)     float32, C <= 32
//   y_index, y_weight    (H, 4)     int64 rows of mask_logits and float32 weights: output row y is
//                                   sum_k y_weight[y, k] * mask_logits[:, y_index[y, k], :]
//   x_index, x_weight    (W, 4)     the same along the columns
//   keep_semantic        bool       also return the semantic map
//   -> labels            (H, W)     uint8 argmax over c (first maximum on ties, as torch.argmax)
//      semantic          (C, H, W)  float32, or an empty (0,) tensor unless keep_semantic
//      score_sums        (Q,)       float64 sum of sigmoid(logit) over the pixels where logit > 0
//      positive_counts   (Q,)       int64 number of those pixels
//
// And `m2fp::mask_bits(mask_logits (K, h, w), y_index, y_weight, x_index, x_weight)`: the kept
// queries' `logit > 0` at the output size with the same taps, as np.packbits of each flat (H, W)
// mask -> (K, ceil(H * W / 8)) uint8, one query per task (a byte per pixel first, then packed).
//
// Bilinear resize (and resize -> crop -> resize) is separable with at most 4 taps per output row
// and column; Python composes the taps from PyTorch's align_corners=False rule
// (`worker.m2fp.interpolation`). Work is split over the output rows with at::parallel_for. Per row
// and per thread: the queries' logits are first transposed once to (h, w, Q) so that each row's
// y-interpolation is one contiguous axpy over (w, Q); then per tile of 64 output pixels the
// x-interpolation, sigmoid and mask-score partials run over the contiguous queries (vectorised
// across queries), and the semantic tile is a small register-blocked product (pixels x queries) @
// (queries x classes). Mask-score partials are kept per output row and summed in row order at the
// end, so the results do not depend on the thread count.
//
// Instruction set: as `ms_deform_attn.cpp`, the kernels are compiled for the generic x86-64
// baseline and cloned for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) with `target_clones`.

// Vec8 values stay in registers (every helper is inlined): no ABI crosses a call, so no -Wpsabi note.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define M2FP_READOUT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M2FP_READOUT_CLONES
#endif

namespace {

constexpr int64_t kLanes = 8;          // floats per vector block (queries and classes are padded to it)
constexpr int64_t kTile = 64;          // output pixels per tile
constexpr int64_t kTaps = 4;           // taps per output row / column
constexpr int64_t kMaxClasses = 32;    // 4 vector blocks of classes

typedef float Vec8 __attribute__((vector_size(32)));

// The helpers are inlined into each ISA clone of the kernels below (a call would run the baseline code).
#define M2FP_INLINE inline __attribute__((always_inline))

struct Readout {
  const float* logits;      // (h, w, Qp) transposed, queries zero-padded to Qp
  const float* probs;       // (Qp, Cp) class probabilities, zero-padded
  const int64_t* y_index;   // (H, 4)
  const float* y_weight;    // (H, 4)
  const int64_t* x_index;   // (W, 4)
  const float* x_weight;    // (W, 4)
  int64_t in_width, padded_queries, classes, padded_classes, height, width;
  uint8_t* labels;          // (H, W)
  float* semantic;          // (C, H, W) or nullptr
  double* row_sums;         // (H, Qp) mask-score partials per output row
  int32_t* row_counts;      // (H, Qp)
};

typedef int32_t IVec8 __attribute__((vector_size(32)));

M2FP_INLINE Vec8 splat(float value) { return Vec8{} + value; }

M2FP_INLINE Vec8 load8(const float* source) {
  Vec8 value;
  __builtin_memcpy(&value, source, sizeof(value));
  return value;
}
M2FP_INLINE void store8(float* target, Vec8 value) { __builtin_memcpy(target, &value, sizeof(value)); }
M2FP_INLINE IVec8 load8(const int32_t* source) {
  IVec8 value;
  __builtin_memcpy(&value, source, sizeof(value));
  return value;
}
M2FP_INLINE void store8(int32_t* target, IVec8 value) { __builtin_memcpy(target, &value, sizeof(value)); }

// exp(x) for 8 floats, x clamped to [-87.3, 88]: Cephes' expf (range reduction by ln 2, degree-6
// polynomial) in plain vector arithmetic, so it stays vectorised (libm's expf is a call per element).
M2FP_INLINE Vec8 exp8(Vec8 x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const Vec8 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const Vec8 shifted = x * 1.44269504088896341f + shifter;
  const Vec8 n = shifted - shifter;
  const IVec8 exponent = (IVec8)shifted - (IVec8)shifter;
  const Vec8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec8 y = p * r * r + r + 1.0f;
  return y * (Vec8)((exponent + 127) << 23);
}

M2FP_INLINE Vec8 sigmoid8(Vec8 x) { return 1.0f / (1.0f + exp8(-x)); }

// row[(x, q)] = sum_k y_weight[y, k] * logits[y_index[y, k], x, q]: output row y at the input width.
M2FP_INLINE void interpolate_row(const Readout& r, int64_t y, float* __restrict row) {
  const int64_t span = r.in_width * r.padded_queries;
  const float* __restrict a = r.logits + r.y_index[y * kTaps + 0] * span;
  const float* __restrict b = r.logits + r.y_index[y * kTaps + 1] * span;
  const float* __restrict c = r.logits + r.y_index[y * kTaps + 2] * span;
  const float* __restrict d = r.logits + r.y_index[y * kTaps + 3] * span;
  const float* weight = r.y_weight + y * kTaps;
  const float wa = weight[0], wb = weight[1], wc = weight[2], wd = weight[3];
  for (int64_t e = 0; e < span; ++e) row[e] = wa * a[e] + wb * b[e] + wc * c[e] + wd * d[e];
}

// The tile's pixels [x0, x0 + pixels) of the row: their logits over the queries (x-interpolation),
// their sigmoids into `tile` (pixel-major), and the mask-score partials (sum of sigmoid where
// logit > 0, count of logit > 0) added to `sums` and `counts`, 8 queries at a time in registers.
M2FP_INLINE void read_tile(const Readout& r, const float* __restrict row, int64_t x0, int64_t pixels,
                           float* __restrict tile, float* __restrict sums, int32_t* __restrict counts) {
  const int64_t queries = r.padded_queries;
  for (int64_t q = 0; q < queries; q += kLanes) {
    Vec8 sum = {};
    IVec8 count = {};
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t* index = r.x_index + (x0 + p) * kTaps;
      const float* weight = r.x_weight + (x0 + p) * kTaps;
      const Vec8 logit = weight[0] * load8(row + index[0] * queries + q) +
                         weight[1] * load8(row + index[1] * queries + q) +
                         weight[2] * load8(row + index[2] * queries + q) +
                         weight[3] * load8(row + index[3] * queries + q);
      const Vec8 probability = sigmoid8(logit);
      const IVec8 positive = logit > 0.0f;  // -1 where positive, else 0
      store8(tile + p * queries + q, probability);
      sum += (Vec8)((IVec8)probability & positive);
      count -= positive;
    }
    store8(sums + q, load8(sums + q) + sum);
    store8(counts + q, load8(counts + q) + count);
  }
}

// semantic[(p, c)] = sum_q tile[(p, q)] * probs[(q, c)] for the tile's pixels, kPixels at a time
// with the (kPixels x kBlocks) accumulators in registers.
template <int kBlocks, int kPixels>
M2FP_INLINE void semantic_tile(const Readout& r, const float* __restrict tile, int64_t pixels,
                          float* __restrict semantic) {
  const int64_t queries = r.padded_queries, classes = r.padded_classes;
  for (int64_t p0 = 0; p0 < pixels; p0 += kPixels) {
    Vec8 acc[kPixels][kBlocks] = {};
    const float* pixel = tile + p0 * queries;
    for (int64_t q = 0; q < queries; ++q) {
      Vec8 prob[kBlocks];
      for (int j = 0; j < kBlocks; ++j) prob[j] = load8(r.probs + q * classes + j * kLanes);
      for (int p = 0; p < kPixels; ++p) {
        const float value = pixel[p * queries + q];
        for (int j = 0; j < kBlocks; ++j) acc[p][j] += value * prob[j];
      }
    }
    for (int p = 0; p < kPixels; ++p) {
      for (int j = 0; j < kBlocks; ++j) {
        __builtin_memcpy(semantic + (p0 + p) * classes + j * kLanes, &acc[p][j], sizeof(Vec8));
      }
    }
  }
}

// Labels (first maximum) and, if kept, the semantic map of `pixels` pixels from (x0, y).
M2FP_INLINE void store_tile(const Readout& r, int64_t y, int64_t x0, int64_t pixels, const float* semantic) {
  const int64_t offset = y * r.width + x0, plane = r.height * r.width;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* scores = semantic + p * r.padded_classes;
    float best = scores[0];
    uint8_t label = 0;
    for (int64_t c = 1; c < r.classes; ++c) {
      if (scores[c] > best) best = scores[c], label = static_cast<uint8_t>(c);
    }
    r.labels[offset + p] = label;
  }
  if (r.semantic == nullptr) return;
  for (int64_t c = 0; c < r.classes; ++c) {
    float* out = r.semantic + c * plane + offset;
    for (int64_t p = 0; p < pixels; ++p) out[p] = semantic[p * r.padded_classes + c];
  }
}

// Output rows [begin, end): everything of the readout for those rows, with per-call buffers.
template <int kBlocks, int kPixels>
M2FP_INLINE void read_rows(const Readout& r, int64_t begin, int64_t end) {
  const int64_t queries = r.padded_queries;
  std::vector<float> row(r.in_width * queries), tile((kTile + kPixels) * queries, 0.0f);
  std::vector<float> semantic((kTile + kPixels) * r.padded_classes), sums(queries);
  std::vector<double> row_sums(queries);
  for (int64_t y = begin; y < end; ++y) {
    interpolate_row(r, y, row.data());
    std::fill(row_sums.begin(), row_sums.end(), 0.0);
    int32_t* counts = r.row_counts + y * queries;
    std::fill(counts, counts + queries, 0);
    for (int64_t x0 = 0; x0 < r.width; x0 += kTile) {
      const int64_t pixels = std::min(kTile, r.width - x0);
      std::fill(sums.begin(), sums.end(), 0.0f);
      read_tile(r, row.data(), x0, pixels, tile.data(), sums.data(), counts);
      for (int64_t q = 0; q < queries; ++q) row_sums[q] += sums[q];
      semantic_tile<kBlocks, kPixels>(r, tile.data(), pixels, semantic.data());
      store_tile(r, y, x0, pixels, semantic.data());
    }
    std::copy(row_sums.begin(), row_sums.end(), r.row_sums + y * queries);
  }
}

#define M2FP_READOUT_KERNEL(name, blocks, pixels)                                      \
  M2FP_READOUT_CLONES void name(const Readout& readout, int64_t begin, int64_t end) {  \
    read_rows<blocks, pixels>(readout, begin, end);                                    \
  }
M2FP_READOUT_KERNEL(read_rows_c8, 1, 4)
M2FP_READOUT_KERNEL(read_rows_c16, 2, 4)
M2FP_READOUT_KERNEL(read_rows_c24, 3, 4)
M2FP_READOUT_KERNEL(read_rows_c32, 4, 2)
#undef M2FP_READOUT_KERNEL

using RowKernel = void (*)(const Readout&, int64_t, int64_t);

RowKernel pick_row_kernel(int64_t padded_classes) {
  switch (padded_classes) {
    case 8: return read_rows_c8;
    case 16: return read_rows_c16;
    case 24: return read_rows_c24;
    default: return read_rows_c32;
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// (Q, h, w) -> (h, w, Qp), queries zero-padded: each output row's y-interpolation is then contiguous.
at::Tensor transpose_logits(const at::Tensor& mask_logits, int64_t padded_queries) {
  const int64_t queries = mask_logits.size(0), height = mask_logits.size(1), width = mask_logits.size(2);
  const at::Tensor source = mask_logits.contiguous();
  at::Tensor transposed = at::zeros({height, width, padded_queries}, source.options());
  const float* in = source.data_ptr<float>();
  float* out = transposed.data_ptr<float>();
  at::parallel_for(0, height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      for (int64_t q = 0; q < queries; ++q) {
        const float* line = in + (q * height + y) * width;
        for (int64_t x = 0; x < width; ++x) out[(y * width + x) * padded_queries + q] = line[x];
      }
    }
  });
  return transposed;
}

// Row partials summed in row order, on one thread: the same result for any thread count.
void sum_rows(const double* row_sums, const int32_t* row_counts, int64_t rows, int64_t stride, int64_t queries,
              double* sums, int64_t* counts) {
  for (int64_t y = 0; y < rows; ++y) {
    for (int64_t q = 0; q < queries; ++q) {
      sums[q] += row_sums[y * stride + q];
      counts[q] += row_counts[y * stride + q];
    }
  }
}

void check_taps(const at::Tensor& index, const at::Tensor& weight, int64_t size, int64_t limit, const char* name) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == size && index.size(1) == kTaps && index.scalar_type() == at::kLong,
              "m2fp::mask_readout: ", name, "_index must be int64 (", size, ", 4), got ", index.sizes());
  TORCH_CHECK(weight.sizes() == index.sizes() && weight.scalar_type() == at::kFloat,
              "m2fp::mask_readout: ", name, "_weight must be float32 (", size, ", 4), got ", weight.sizes());
  TORCH_CHECK(index.numel() == 0 || (index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < limit),
              "m2fp::mask_readout: ", name, "_index out of range 0..", limit - 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_readout_cpu(
    const at::Tensor& mask_logits, const at::Tensor& class_probabilities, const at::Tensor& y_index,
    const at::Tensor& y_weight, const at::Tensor& x_index, const at::Tensor& x_weight, bool keep_semantic) {
  TORCH_CHECK(mask_logits.device().is_cpu() && class_probabilities.device().is_cpu(),
              "m2fp::mask_readout: tensors must be on the CPU");
  TORCH_CHECK(mask_logits.dim() == 3 && mask_logits.scalar_type() == at::kFloat,
              "m2fp::mask_readout: mask_logits must be float32 (Q, h, w), got ", mask_logits.sizes());
  const int64_t queries = mask_logits.size(0), classes = class_probabilities.size(1);
  TORCH_CHECK(class_probabilities.dim() == 2 && class_probabilities.size(0) == queries &&
                  class_probabilities.scalar_type() == at::kFloat,
              "m2fp::mask_readout: class_probabilities must be float32 (Q, C), got ", class_probabilities.sizes());
  TORCH_CHECK(classes >= 1 && classes <= kMaxClasses, "m2fp::mask_readout: 1..", kMaxClasses,
              " classes, got ", classes);
  const int64_t height = y_index.size(0), width = x_index.size(0);
  check_taps(y_index, y_weight, height, mask_logits.size(1), "y");
  check_taps(x_index, x_weight, width, mask_logits.size(2), "x");

  const int64_t padded_queries = round_up(std::max<int64_t>(queries, 1), kLanes);
  const int64_t padded_classes = round_up(classes, kLanes);
  const at::Tensor logits = transpose_logits(mask_logits, padded_queries);
  at::Tensor probs = at::zeros({padded_queries, padded_classes}, class_probabilities.options());
  probs.narrow(0, 0, queries).narrow(1, 0, classes).copy_(class_probabilities);
  const at::Tensor ys = y_index.contiguous(), yw = y_weight.contiguous();
  const at::Tensor xs = x_index.contiguous(), xw = x_weight.contiguous();

  at::Tensor labels = at::empty({height, width}, mask_logits.options().dtype(at::kByte));
  at::Tensor semantic = keep_semantic ? at::empty({classes, height, width}, mask_logits.options())
                                      : at::empty({0}, mask_logits.options());
  at::Tensor row_sums = at::empty({height, padded_queries}, mask_logits.options().dtype(at::kDouble));
  at::Tensor row_counts = at::empty({height, padded_queries}, mask_logits.options().dtype(at::kInt));
  const Readout readout{logits.data_ptr<float>(), probs.data_ptr<float>(), ys.data_ptr<int64_t>(),
                        yw.data_ptr<float>(), xs.data_ptr<int64_t>(), xw.data_ptr<float>(),
                        mask_logits.size(2), padded_queries, classes, padded_classes, height, width,
                        labels.data_ptr<uint8_t>(), keep_semantic ? semantic.data_ptr<float>() : nullptr,
                        row_sums.data_ptr<double>(), row_counts.data_ptr<int32_t>()};
  const RowKernel kernel = pick_row_kernel(padded_classes);
  if (height > 0 && width > 0) {
    at::parallel_for(0, height, 1, [&](int64_t begin, int64_t end) { kernel(readout, begin, end); });
  }
  at::Tensor sums = at::zeros({queries}, row_sums.options());
  at::Tensor counts = at::zeros({queries}, row_sums.options().dtype(at::kLong));
  sum_rows(row_sums.data_ptr<double>(), row_counts.data_ptr<int32_t>(), height, padded_queries, queries,
           sums.data_ptr<double>(), counts.data_ptr<int64_t>());
  return {labels, semantic, sums, counts};
}

// Eight 0/1 bytes (the first at the lowest address) -> one byte, the first as its most significant
// bit (np.packbits' order): each byte i moves to bit 63 - i of the product, and no other partial
// product reaches the top byte (checked for all 256 patterns in tests/model/test_mask_readout_op.py).
constexpr uint64_t kPackMultiplier = 0x8040201008040201ULL;

// `pixels` 0/1 bytes -> np.packbits of them into `bits` (the last byte zero-padded).
M2FP_INLINE void pack_bytes(const uint8_t* mask, int64_t pixels, uint8_t* bits) {
  const int64_t whole = pixels / 8;
  for (int64_t i = 0; i < whole; ++i) {
    uint64_t eight;
    std::memcpy(&eight, mask + 8 * i, sizeof(eight));
    bits[i] = static_cast<uint8_t>((eight * kPackMultiplier) >> 56);
  }
  if (whole * 8 < pixels) {
    uint8_t last = 0;
    for (int64_t pixel = whole * 8; pixel < pixels; ++pixel) last |= mask[pixel] << (7 - (pixel & 7));
    bits[whole] = last;
  }
}

// One query's `logit > 0` at the output size, bit-packed as np.packbits of the flat (H, W) mask
// (most significant bit first), in cache-sized passes:
//  1. x first: every input row resized to the output width (`columns`, in_height x W floats):
//     the gathers through `x_index` (tap-major, kTaps rows of W) run on in_height rows, not H;
//  2. per band of kBandRows output rows, the y-interpolation of four of those rows (contiguous,
//     vectorised) and `> 0` as a 0/1 byte per pixel (`band`, kBandRows x W bytes);
//  3. the band's bytes eight at a time into bit-bytes: a band starts at pixel y * W with y a
//     multiple of 8, so on a byte boundary of `bits`.
// Measured for 100 queries at 640x853, 2 threads, the worker's tuned malloc (Intel Xeon, avx512f;
// docs/BENCHMARKS.md, run J), min / median: 17 / 17 ms, against 61 / 62 ms for y first with each
// bit written into its byte in place (y first with bytes: 3x the time of x first, in a test
// without the tuned heap). The two orders round differently, so a logit within rounding of 0
// can fall the other way than in `mask_readout` (as between it and PyTorch's resize:
// tests/model/test_mask_readout_op.py).
constexpr int64_t kBandRows = 8;

M2FP_READOUT_CLONES
void pack_query(const float* logits, int64_t in_height, int64_t in_width, const int64_t* y_index,
                const float* y_weight, const int32_t* x_index, const float* x_weight, int64_t height,
                int64_t width, float* columns, uint8_t* band, uint8_t* bits) {
  for (int64_t r = 0; r < in_height; ++r) {
    const float* in = logits + r * in_width;
    float* out = columns + r * width;
    for (int64_t x = 0; x < width; ++x) {
      float logit = 0.0f;
      for (int64_t k = 0; k < kTaps; ++k) logit += x_weight[k * width + x] * in[x_index[k * width + x]];
      out[x] = logit;
    }
  }
  for (int64_t y0 = 0; y0 < height; y0 += kBandRows) {
    const int64_t rows = std::min(kBandRows, height - y0);
    for (int64_t y = y0; y < y0 + rows; ++y) {
      // __restrict__: a byte store may alias anything, and the compiler would not vectorise
      const float* __restrict__ a = columns + y_index[y * kTaps + 0] * width;
      const float* __restrict__ b = columns + y_index[y * kTaps + 1] * width;
      const float* __restrict__ c = columns + y_index[y * kTaps + 2] * width;
      const float* __restrict__ d = columns + y_index[y * kTaps + 3] * width;
      const float* wy = y_weight + y * kTaps;
      const float w0 = wy[0], w1 = wy[1], w2 = wy[2], w3 = wy[3];
      uint8_t* __restrict__ out = band + (y - y0) * width;
      for (int64_t x = 0; x < width; ++x) out[x] = (w0 * a[x] + w1 * b[x] + w2 * c[x] + w3 * d[x]) > 0.0f ? 1 : 0;
    }
    pack_bytes(band, rows * width, bits + y0 * width / 8);
  }
}

// (K, h, w) logits -> (K, ceil(H * W / 8)) packed `logit > 0` masks at the output size.
at::Tensor mask_bits_cpu(const at::Tensor& mask_logits, const at::Tensor& y_index, const at::Tensor& y_weight,
                         const at::Tensor& x_index, const at::Tensor& x_weight) {
  TORCH_CHECK(mask_logits.device().is_cpu() && mask_logits.dim() == 3 && mask_logits.scalar_type() == at::kFloat,
              "m2fp::mask_bits: mask_logits must be float32 (K, h, w) on the CPU, got ", mask_logits.sizes());
  const int64_t queries = mask_logits.size(0), in_height = mask_logits.size(1), in_width = mask_logits.size(2);
  const int64_t height = y_index.size(0), width = x_index.size(0);
  check_taps(y_index, y_weight, height, in_height, "y");
  check_taps(x_index, x_weight, width, in_width, "x");
  const at::Tensor logits = mask_logits.contiguous();
  const at::Tensor ys = y_index.contiguous(), yw = y_weight.contiguous();
  const at::Tensor xs = x_index.contiguous(), xw = x_weight.contiguous();
  at::Tensor bits = at::empty({queries, (height * width + 7) / 8}, logits.options().dtype(at::kByte));
  const float* in = logits.data_ptr<float>();
  uint8_t* out = bits.data_ptr<uint8_t>();
  // The x taps tap-major (kTaps rows of `width`), the indices as int32 (pack_query's first pass).
  std::vector<int32_t> x_index32(kTaps * width);
  std::vector<float> x_weight_by_tap(kTaps * width);
  for (int64_t x = 0; x < width; ++x) {
    for (int64_t k = 0; k < kTaps; ++k) {
      x_index32[k * width + x] = static_cast<int32_t>(xs.data_ptr<int64_t>()[x * kTaps + k]);
      x_weight_by_tap[k * width + x] = xw.data_ptr<float>()[x * kTaps + k];
    }
  }
  at::parallel_for(0, queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> columns(in_height * width);
    std::vector<uint8_t> band(kBandRows * width);
    for (int64_t q = begin; q < end; ++q) {
      pack_query(in + q * in_height * in_width, in_height, in_width, ys.data_ptr<int64_t>(),
                 yw.data_ptr<float>(), x_index32.data(), x_weight_by_tap.data(), height, width,
                 columns.data(), band.data(), out + q * bits.size(1));
    }
  });
  return bits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2fp, m) {
  m.def("mask_bits(Tensor mask_logits, Tensor y_index, Tensor y_weight, Tensor x_index, Tensor x_weight) -> Tensor");
  m.def("mask_readout(Tensor mask_logits, Tensor class_probabilities, Tensor y_index, Tensor y_weight, "
        "Tensor x_index, Tensor x_weight, bool keep_semantic) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(m2fp, CPU, m) {
  m.impl("mask_readout", &mask_readout_cpu);
  m.impl("mask_bits", &mask_bits_cpu);
}
