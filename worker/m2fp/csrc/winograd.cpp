// Winograd F(4x4, 3x3) transforms for 3x3, stride-1, padding-1 convolutions, CPU, float32:
// the ops `m2fp::winograd_input` and `m2fp::winograd_output` (worker/m2fp/winograd.py owns the
// weight transform, the product between the two ops and when the route applies).
//
// A 3x3 convolution over a channels-last (N, C, H, W) map is computed per tile of 4x4 outputs
// from the 6x6 input patch around it (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016; interpolation points 0, +-1, +-2, infinity):
//
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A      per input channel pair, summed over the channels,
//
// so the 36 positions of a transformed tile are 36 independent (tiles x C) @ (C x K) products:
// 36 multiply-adds per 16 outputs and channel pair instead of 144.
//
//   winograd_input(x, tiles_h, tiles_w, first, count)
//       x (N, C, H, W) float32, channels-last in memory; tiles are numbered p = (n, ty, tx)
//       row-major over N x tiles_h x tiles_w, tile (ty, tx) reading rows 4ty-1 .. 4ty+4 and
//       columns 4tx-1 .. 4tx+4 of x, zero outside (padding 1, the right/bottom remainder)
//     -> V (count, 36 * C): row r the transformed tile first + r, columns [36][C]
//   winograd_output(m, out, first, bias, relu)
//       m (count, 36 * K) float32 row-major: the products of tiles first .. first + count
//     -> writes those tiles' 4x4 outputs into out (N, K, H, W) float32 channels-last:
//        A^T m A per tile, + bias[k], then max(0, .) if relu
//
// A convolution runs in bands of tiles (winograd.py), so that the transformed tiles and their
// products stay a few MB: the whole map at once made the stem's 159 MB of products and their
// inputs fresh memory on every image.
//
// Work is split over the tiles with at::parallel_for. Per tile, the channels go in chunks of 64:
// a column pass over the six rows of the patch, then a row pass, through a 9 KB scratch that stays
// in L1; the inner loops run over the chunk's channels, contiguous in the channels-last layout, and
// are left to the compiler's auto-vectoriser. Like the other ops, the kernels are compiled for the
// x86-64 baseline and again for x86-64-v3 and x86-64-v4 (`target_clones`).
//
// Accuracy: float32 throughout; the transforms' constants (at most 8 and 5) multiply the rounding
// error of a direct convolution by about 25 (max 6e-6 of the output's largest value at 256
// channels, measured against float64), which tests/model/test_winograd.py bounds.

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

constexpr int64_t kChunk = 64;  // channels per pass: 36 x 64 floats of scratch

struct InputProblem {
  const float* x;
  const float* zeros;  // C zeros: what a position outside the map reads
  float* out;          // (count, 36, C): row r is tile first + r
  int64_t first;
  int64_t channels, height, width, tiles_h, tiles_w;
  int64_t stride_n, stride_h, stride_w;  // of x, in floats; the channel stride is 1
};

struct OutputProblem {
  const float* m;     // (count, 36, K): row r is tile first + r
  const float* bias;  // K
  float* out;         // (N, H, W, K)
  int64_t first;
  int64_t channels, height, width, tiles_h, tiles_w;
  bool relu;
};

// B^T applied to six rows d0..d5 (of `count` channels each), written to t[0..5] (stride kChunk)
inline __attribute__((always_inline)) void input_columns(const float* const* d, float* t, int64_t count) {
  const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
  for (int64_t c = 0; c < count; ++c) {
    t[0 * 6 * kChunk + c] = 4.f * d0[c] - 5.f * d2[c] + d4[c];
    t[1 * 6 * kChunk + c] = -4.f * (d1[c] + d2[c]) + d3[c] + d4[c];
    t[2 * 6 * kChunk + c] = 4.f * (d1[c] - d2[c]) - d3[c] + d4[c];
    t[3 * 6 * kChunk + c] = 2.f * (d3[c] - d1[c]) - d2[c] + d4[c];
    t[4 * 6 * kChunk + c] = 2.f * (d1[c] - d3[c]) - d2[c] + d4[c];
    t[5 * 6 * kChunk + c] = 4.f * d1[c] - 5.f * d3[c] + d5[c];
  }
}

M2FP_WINOGRAD_CLONES void input_tiles(const InputProblem& pr, int64_t begin, int64_t end) {
  alignas(64) float scratch[6 * 6 * kChunk];  // [row i][column j][channel]
  const int64_t per_image = pr.tiles_h * pr.tiles_w, C = pr.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t p = pr.first + row;
    const int64_t n = p / per_image, ty = (p % per_image) / pr.tiles_w, tx = p % pr.tiles_w;
    const float* base[6][6];
    for (int64_t i = 0; i < 6; ++i) {
      const int64_t y = 4 * ty - 1 + i;
      for (int64_t j = 0; j < 6; ++j) {
        const int64_t x = 4 * tx - 1 + j;
        const bool inside = y >= 0 && y < pr.height && x >= 0 && x < pr.width;
        base[i][j] = inside ? pr.x + n * pr.stride_n + y * pr.stride_h + x * pr.stride_w : pr.zeros;
      }
    }
    float* out = pr.out + row * 36 * C;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t count = std::min(kChunk, C - c0);
      for (int64_t j = 0; j < 6; ++j) {  // column pass: t[i][j] = sum_k B^T[i][k] d[k][j]
        const float* d[6];
        for (int64_t k = 0; k < 6; ++k) d[k] = base[k][j] + c0;
        input_columns(d, scratch + j * kChunk, count);
      }
      for (int64_t i = 0; i < 6; ++i) {  // row pass: V[i][b] = sum_k t[i][k] B[k][b]
        const float* s = scratch + i * 6 * kChunk;
        const float *s0 = s, *s1 = s + kChunk, *s2 = s + 2 * kChunk;
        const float *s3 = s + 3 * kChunk, *s4 = s + 4 * kChunk, *s5 = s + 5 * kChunk;
        float* v = out + i * 6 * C + c0;
        for (int64_t c = 0; c < count; ++c) {
          v[0 * C + c] = 4.f * s0[c] - 5.f * s2[c] + s4[c];
          v[1 * C + c] = -4.f * (s1[c] + s2[c]) + s3[c] + s4[c];
          v[2 * C + c] = 4.f * (s1[c] - s2[c]) - s3[c] + s4[c];
          v[3 * C + c] = 2.f * (s3[c] - s1[c]) - s2[c] + s4[c];
          v[4 * C + c] = 2.f * (s1[c] - s3[c]) - s2[c] + s4[c];
          v[5 * C + c] = 4.f * s1[c] - 5.f * s3[c] + s5[c];
        }
      }
    }
  }
}

// A^T applied to six rows m0..m5 (stride 6 * K apart in the tile), written to t[0..3]
inline __attribute__((always_inline)) void output_columns(const float* m, int64_t stride, float* t, int64_t count) {
  const float *m0 = m, *m1 = m + stride, *m2 = m + 2 * stride;
  const float *m3 = m + 3 * stride, *m4 = m + 4 * stride, *m5 = m + 5 * stride;
  for (int64_t c = 0; c < count; ++c) {
    const float plus12 = m1[c] + m2[c], minus12 = m1[c] - m2[c];
    const float plus34 = m3[c] + m4[c], minus34 = m3[c] - m4[c];
    t[0 * 6 * kChunk + c] = m0[c] + plus12 + plus34;
    t[1 * 6 * kChunk + c] = minus12 + 2.f * minus34;
    t[2 * 6 * kChunk + c] = plus12 + 4.f * plus34;
    t[3 * 6 * kChunk + c] = minus12 + 8.f * minus34 + m5[c];
  }
}

M2FP_WINOGRAD_CLONES void output_tiles(const OutputProblem& pr, int64_t begin, int64_t end) {
  alignas(64) float scratch[4 * 6 * kChunk];  // [output row i][column j][channel]
  alignas(64) float sink[kChunk];            // where the columns beyond the map's width go
  const int64_t per_image = pr.tiles_h * pr.tiles_w, K = pr.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t p = pr.first + row;
    const int64_t n = p / per_image, ty = (p % per_image) / pr.tiles_w, tx = p % pr.tiles_w;
    const float* m = pr.m + row * 36 * K;
    for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
      const int64_t count = std::min(kChunk, K - c0);
      for (int64_t j = 0; j < 6; ++j) output_columns(m + j * K + c0, 6 * K, scratch + j * kChunk, count);
      const float* bias = pr.bias + c0;
      for (int64_t i = 0; i < 4 && 4 * ty + i < pr.height; ++i) {
        const float* s = scratch + i * 6 * kChunk;
        const float *s0 = s, *s1 = s + kChunk, *s2 = s + 2 * kChunk;
        const float *s3 = s + 3 * kChunk, *s4 = s + 4 * kChunk, *s5 = s + 5 * kChunk;
        float* row = pr.out + ((n * pr.height + 4 * ty + i) * pr.width) * K + c0;
        float* y[4];
        for (int64_t b = 0; b < 4; ++b) y[b] = 4 * tx + b < pr.width ? row + (4 * tx + b) * K : sink;
        float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
        const float floor = pr.relu ? 0.f : -__builtin_inff();
        for (int64_t c = 0; c < count; ++c) {
          const float plus12 = s1[c] + s2[c], minus12 = s1[c] - s2[c];
          const float plus34 = s3[c] + s4[c], minus34 = s3[c] - s4[c];
          y0[c] = std::max(s0[c] + plus12 + plus34 + bias[c], floor);
          y1[c] = std::max(minus12 + 2.f * minus34 + bias[c], floor);
          y2[c] = std::max(plus12 + 4.f * plus34 + bias[c], floor);
          y3[c] = std::max(minus12 + 8.f * minus34 + s5[c] + bias[c], floor);
        }
      }
    }
  }
}

at::Tensor winograd_input_cpu(const at::Tensor& x, int64_t tiles_h, int64_t tiles_w, int64_t first,
                              int64_t count) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "m2fp::winograd_input: x must be a float32 (N, C, H, W) CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "m2fp::winograd_input: x must be channels-last in memory");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(tiles_h == (H + 3) / 4 && tiles_w == (W + 3) / 4, "m2fp::winograd_input: ", tiles_h, "x",
              tiles_w, " tiles do not cover ", H, "x", W, " outputs in 4x4 tiles");
  TORCH_CHECK(first >= 0 && count >= 0 && first + count <= N * tiles_h * tiles_w, "m2fp::winograd_input: tiles ",
              first, " .. ", first + count, " are not among the ", N * tiles_h * tiles_w, " tiles");
  at::Tensor out = at::empty({count, 36 * C}, x.options());
  if (out.numel() == 0) return out;
  const std::vector<float> zeros(static_cast<size_t>(C), 0.f);
  const InputProblem problem{x.data_ptr<float>(), zeros.data(), out.data_ptr<float>(), first, C, H, W,
                             tiles_h, tiles_w, x.stride(0), x.stride(2), x.stride(3)};
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) { input_tiles(problem, begin, end); });
  return out;
}

void winograd_output_cpu(const at::Tensor& m, const at::Tensor& out, int64_t first, const at::Tensor& bias,
                         bool relu) {
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.device().is_cpu() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "m2fp::winograd_output: out must be a channels-last float32 (N, K, H, W) CPU tensor");
  const int64_t N = out.size(0), K = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t tiles_h = (H + 3) / 4, tiles_w = (W + 3) / 4;
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat && m.device().is_cpu() && m.is_contiguous(),
              "m2fp::winograd_output: m must be a contiguous float32 (tiles, 36 * K) CPU tensor");
  TORCH_CHECK(m.size(1) == 36 * K && first >= 0 && first + m.size(0) <= N * tiles_h * tiles_w,
              "m2fp::winograd_output: m is ", m.sizes(), ", not (tiles, 36 * ", K, ") for tiles from ", first,
              " among the ", N * tiles_h * tiles_w, " tiles of ", N, " maps of ", H, "x", W);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K && bias.scalar_type() == at::kFloat && bias.is_contiguous(),
              "m2fp::winograd_output: bias must be a contiguous float32 vector of ", K);
  if (m.numel() == 0) return;
  const OutputProblem problem{m.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<float>(), first, K, H,
                              W, tiles_h, tiles_w, relu};
  at::parallel_for(0, m.size(0), 8, [&](int64_t begin, int64_t end) { output_tiles(problem, begin, end); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2fp, m) {
  m.def("winograd_input(Tensor x, int tiles_h, int tiles_w, int first, int count) -> Tensor");
  m.def("winograd_output(Tensor m, Tensor(a!) out, int first, Tensor bias, bool relu) -> ()");
}

TORCH_LIBRARY_IMPL(m2fp, CPU, m) {
  m.impl("winograd_input", &winograd_input_cpu);
  m.impl("winograd_output", &winograd_output_cpu);
}
