// Winograd F(4x4, 3x3) and F(2x2, 3x3) transforms for 3x3, stride-1, padding-1 convolutions,
// CPU, float32: the ops `m2fp::winograd_input` and `m2fp::winograd_output` (worker/m2fp/winograd.py
// owns the weight transform, the products between the two ops and where each variant applies).
//
// A 3x3 convolution over a channels-last (N, C, H, W) map is computed per tile of m x m outputs
// (m = `tile`, 4 or 2) from the (m+2) x (m+2) input patch around it (Lavin and Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2016; interpolation points 0, +-1, +-2, infinity
// for m = 4, 0, +-1, infinity for m = 2):
//
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A      per input channel pair, summed over the channels,
//
// so the T = (m+2)^2 positions of a transformed tile are T independent (tiles x C) @ (C x K)
// products: 36 multiply-adds per 16 outputs and channel pair for m = 4, 16 per 4 for m = 2,
// against 9 per output directly.
//
//   winograd_input(x, tile, tiles_h, tiles_w, first, count)
//       x (N, C, H, W) float32, channels-last in memory; tiles are numbered p = (n, ty, tx)
//       row-major over N x tiles_h x tiles_w, tile (ty, tx) reading rows m*ty-1 .. m*ty+m and
//       columns m*tx-1 .. m*tx+m of x, zero outside (padding 1, the right/bottom remainder)
//     -> V (count, T * C): row r the transformed tile first + r, columns [T][C]
//   winograd_output(m, out, tile, first, bias, relu)
//       m (count, T * K) float32 row-major: the products of tiles first .. first + count
//     -> writes those tiles' m x m outputs into out (N, K, H, W) float32 channels-last:
//        A^T m A per tile, + bias[k], then max(0, .) if relu
//
// A convolution runs in bands of tiles (winograd.py), so that the transformed tiles and their
// products stay a few MB: the whole map at once made the stem's 159 MB of products and their
// inputs fresh memory on every image.
//
// Work is split over the tiles with at::parallel_for. Per tile, the channels go in chunks of 64:
// a pass over the patch's columns, then over its rows, through a scratch of at most 9 KB that
// stays in L1; the inner loops run over the chunk's channels, contiguous in the channels-last
// layout, and are left to the compiler's auto-vectoriser. Like the other ops, the kernels are
// compiled for the x86-64 baseline and again for x86-64-v3 and x86-64-v4 (`target_clones`).
//
// Accuracy: float32 throughout; F(4x4)'s constants (at most 8 and 5) multiply the rounding error
// of a direct convolution by about 25 (max 6e-6 of the output's largest value at 256 channels,
// against float64), F(2x2)'s (all 1) by a few; tests/model/test_winograd.py bounds both.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define M2FP_WINOGRAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M2FP_WINOGRAD_CLONES
#endif

namespace {

constexpr int64_t kChunk = 64;  // channels per pass

struct InputProblem {
  const float* x;
  const float* zeros;  // C zeros: what a position outside the map reads
  float* out;          // (count, T, C): row r is tile first + r
  int64_t first;
  int64_t channels, height, width, tiles_h, tiles_w;
  int64_t stride_n, stride_h, stride_w;  // of x, in floats; the channel stride is 1
};

struct OutputProblem {
  const float* m;     // (count, T, K): row r is tile first + r
  const float* bias;  // K
  float* out;         // (N, H, W, K)
  int64_t first;
  int64_t channels, height, width, tiles_h, tiles_w;
  bool relu;
};

// The 1-D transforms, each over `count` channels of rows given by pointers: B^T maps the patch's
// kIn rows to kIn rows, A^T maps kIn rows to kTile rows.
template <int kTile>
struct Transform;

template <>
struct Transform<4> {
  static constexpr int kIn = 6;
  static inline __attribute__((always_inline)) void input(const float* const* d, float* const* t,
                                                          int64_t count) {
    const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
    float *t0 = t[0], *t1 = t[1], *t2 = t[2], *t3 = t[3], *t4 = t[4], *t5 = t[5];
    for (int64_t c = 0; c < count; ++c) {
      t0[c] = 4.f * d0[c] - 5.f * d2[c] + d4[c];
      t1[c] = -4.f * (d1[c] + d2[c]) + d3[c] + d4[c];
      t2[c] = 4.f * (d1[c] - d2[c]) - d3[c] + d4[c];
      t3[c] = 2.f * (d3[c] - d1[c]) - d2[c] + d4[c];
      t4[c] = 2.f * (d1[c] - d3[c]) - d2[c] + d4[c];
      t5[c] = 4.f * d1[c] - 5.f * d3[c] + d5[c];
    }
  }
  static inline __attribute__((always_inline)) void output(const float* const* m, float* const* t,
                                                           int64_t count) {
    const float *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3], *m4 = m[4], *m5 = m[5];
    float *t0 = t[0], *t1 = t[1], *t2 = t[2], *t3 = t[3];
    for (int64_t c = 0; c < count; ++c) {
      const float plus12 = m1[c] + m2[c], minus12 = m1[c] - m2[c];
      const float plus34 = m3[c] + m4[c], minus34 = m3[c] - m4[c];
      t0[c] = m0[c] + plus12 + plus34;
      t1[c] = minus12 + 2.f * minus34;
      t2[c] = plus12 + 4.f * plus34;
      t3[c] = minus12 + 8.f * minus34 + m5[c];
    }
  }
};

template <>
struct Transform<2> {
  static constexpr int kIn = 4;
  static inline __attribute__((always_inline)) void input(const float* const* d, float* const* t,
                                                          int64_t count) {
    const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    float *t0 = t[0], *t1 = t[1], *t2 = t[2], *t3 = t[3];
    for (int64_t c = 0; c < count; ++c) {
      t0[c] = d0[c] - d2[c];
      t1[c] = d1[c] + d2[c];
      t2[c] = d2[c] - d1[c];
      t3[c] = d1[c] - d3[c];
    }
  }
  static inline __attribute__((always_inline)) void output(const float* const* m, float* const* t,
                                                           int64_t count) {
    const float *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3];
    float *t0 = t[0], *t1 = t[1];
    for (int64_t c = 0; c < count; ++c) {
      t0[c] = m0[c] + m1[c] + m2[c];
      t1[c] = m1[c] - m2[c] - m3[c];
    }
  }
};

template <int kTile>
inline __attribute__((always_inline)) void input_tiles(const InputProblem& pr, int64_t begin, int64_t end) {
  using T = Transform<kTile>;
  constexpr int kIn = T::kIn;
  alignas(64) float scratch[kIn * kIn * kChunk];  // [row i][column j][channel]
  const int64_t per_image = pr.tiles_h * pr.tiles_w, C = pr.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t p = pr.first + row;
    const int64_t n = p / per_image, ty = (p % per_image) / pr.tiles_w, tx = p % pr.tiles_w;
    const float* base[kIn][kIn];
    for (int64_t i = 0; i < kIn; ++i) {
      const int64_t y = kTile * ty - 1 + i;
      for (int64_t j = 0; j < kIn; ++j) {
        const int64_t x = kTile * tx - 1 + j;
        const bool inside = y >= 0 && y < pr.height && x >= 0 && x < pr.width;
        base[i][j] = inside ? pr.x + n * pr.stride_n + y * pr.stride_h + x * pr.stride_w : pr.zeros;
      }
    }
    float* out = pr.out + row * kIn * kIn * C;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t count = std::min(kChunk, C - c0);
      const float* d[kIn];
      float* t[kIn];
      for (int64_t j = 0; j < kIn; ++j) {  // columns: t[i][j] = sum_k B^T[i][k] d[k][j]
        for (int64_t k = 0; k < kIn; ++k) d[k] = base[k][j] + c0;
        for (int64_t i = 0; i < kIn; ++i) t[i] = scratch + (i * kIn + j) * kChunk;
        T::input(d, t, count);
      }
      for (int64_t i = 0; i < kIn; ++i) {  // rows: V[i][b] = sum_k t[i][k] B[k][b]
        for (int64_t k = 0; k < kIn; ++k) d[k] = scratch + (i * kIn + k) * kChunk;
        for (int64_t b = 0; b < kIn; ++b) t[b] = out + (i * kIn + b) * C + c0;
        T::input(d, t, count);
      }
    }
  }
}

template <int kTile>
inline __attribute__((always_inline)) void output_tiles(const OutputProblem& pr, int64_t begin, int64_t end) {
  using T = Transform<kTile>;
  constexpr int kIn = T::kIn;
  alignas(64) float scratch[kTile * kIn * kChunk];  // [output row i][column j][channel]
  alignas(64) float rows[kTile * kChunk];           // one output row of the tile, before the bias
  const int64_t per_image = pr.tiles_h * pr.tiles_w, K = pr.channels;
  const float floor = pr.relu ? 0.f : -__builtin_inff();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t p = pr.first + row;
    const int64_t n = p / per_image, ty = (p % per_image) / pr.tiles_w, tx = p % pr.tiles_w;
    const float* m = pr.m + row * kIn * kIn * K;
    for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
      const int64_t count = std::min(kChunk, K - c0);
      const float* s[kIn];
      float* t[kIn];
      for (int64_t j = 0; j < kIn; ++j) {  // columns: t[i][j] = sum_k A^T[i][k] m[k][j]
        for (int64_t k = 0; k < kIn; ++k) s[k] = m + (k * kIn + j) * K + c0;
        for (int64_t i = 0; i < kTile; ++i) t[i] = scratch + (i * kIn + j) * kChunk;
        T::output(s, t, count);
      }
      const float* bias = pr.bias + c0;
      for (int64_t i = 0; i < kTile && kTile * ty + i < pr.height; ++i) {  // rows, + bias, ReLU
        for (int64_t k = 0; k < kIn; ++k) s[k] = scratch + (i * kIn + k) * kChunk;
        for (int64_t b = 0; b < kTile; ++b) t[b] = rows + b * kChunk;
        T::output(s, t, count);
        float* line = pr.out + ((n * pr.height + kTile * ty + i) * pr.width) * K + c0;
        for (int64_t b = 0; b < kTile && kTile * tx + b < pr.width; ++b) {
          float* y = line + (kTile * tx + b) * K;
          const float* value = rows + b * kChunk;
          for (int64_t c = 0; c < count; ++c) y[c] = std::max(value[c] + bias[c], floor);
        }
      }
    }
  }
}

M2FP_WINOGRAD_CLONES void input_kernel(const InputProblem& problem, int64_t tile, int64_t begin, int64_t end) {
  if (tile == 4) {
    input_tiles<4>(problem, begin, end);
  } else {
    input_tiles<2>(problem, begin, end);
  }
}

M2FP_WINOGRAD_CLONES void output_kernel(const OutputProblem& problem, int64_t tile, int64_t begin, int64_t end) {
  if (tile == 4) {
    output_tiles<4>(problem, begin, end);
  } else {
    output_tiles<2>(problem, begin, end);
  }
}

void check_tile(const char* op, int64_t tile) {
  TORCH_CHECK(tile == 4 || tile == 2, op, ": tile must be 4 (F(4x4, 3x3)) or 2 (F(2x2, 3x3)), got ", tile);
}

at::Tensor winograd_input_cpu(const at::Tensor& x, int64_t tile, int64_t tiles_h, int64_t tiles_w, int64_t first,
                              int64_t count) {
  check_tile("m2fp::winograd_input", tile);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "m2fp::winograd_input: x must be a float32 (N, C, H, W) CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "m2fp::winograd_input: x must be channels-last in memory");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(tiles_h == (H + tile - 1) / tile && tiles_w == (W + tile - 1) / tile, "m2fp::winograd_input: ",
              tiles_h, "x", tiles_w, " tiles do not cover ", H, "x", W, " outputs in ", tile, "x", tile, " tiles");
  TORCH_CHECK(first >= 0 && count >= 0 && first + count <= N * tiles_h * tiles_w, "m2fp::winograd_input: tiles ",
              first, " .. ", first + count, " are not among the ", N * tiles_h * tiles_w, " tiles");
  at::Tensor out = at::empty({count, (tile + 2) * (tile + 2) * C}, x.options());
  if (out.numel() == 0) return out;
  const std::vector<float> zeros(static_cast<size_t>(C), 0.f);
  const InputProblem problem{x.data_ptr<float>(), zeros.data(), out.data_ptr<float>(), first, C, H, W,
                             tiles_h, tiles_w, x.stride(0), x.stride(2), x.stride(3)};
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) { input_kernel(problem, tile, begin, end); });
  return out;
}

void winograd_output_cpu(const at::Tensor& m, const at::Tensor& out, int64_t tile, int64_t first,
                         const at::Tensor& bias, bool relu) {
  check_tile("m2fp::winograd_output", tile);
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.device().is_cpu() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "m2fp::winograd_output: out must be a channels-last float32 (N, K, H, W) CPU tensor");
  const int64_t N = out.size(0), K = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t tiles_h = (H + tile - 1) / tile, tiles_w = (W + tile - 1) / tile;
  const int64_t positions = (tile + 2) * (tile + 2);
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat && m.device().is_cpu() && m.is_contiguous(),
              "m2fp::winograd_output: m must be a contiguous float32 (tiles, positions * K) CPU tensor");
  TORCH_CHECK(m.size(1) == positions * K && first >= 0 && first + m.size(0) <= N * tiles_h * tiles_w,
              "m2fp::winograd_output: m is ", m.sizes(), ", not (tiles, ", positions, " * ", K, ") for tiles from ",
              first, " among the ", N * tiles_h * tiles_w, " tiles of ", N, " maps of ", H, "x", W);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K && bias.scalar_type() == at::kFloat && bias.is_contiguous(),
              "m2fp::winograd_output: bias must be a contiguous float32 vector of ", K);
  if (m.numel() == 0) return;
  const OutputProblem problem{m.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<float>(), first, K, H,
                              W, tiles_h, tiles_w, relu};
  at::parallel_for(0, m.size(0), 8, [&](int64_t begin, int64_t end) { output_kernel(problem, tile, begin, end); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2fp, m) {
  m.def("winograd_input(Tensor x, int tile, int tiles_h, int tiles_w, int first, int count) -> Tensor");
  m.def("winograd_output(Tensor m, Tensor(a!) out, int tile, int first, Tensor bias, bool relu) -> ()");
}

TORCH_LIBRARY_IMPL(m2fp, CPU, m) {
  m.impl("winograd_input", &winograd_input_cpu);
  m.impl("winograd_output", &winograd_output_cpu);
}
