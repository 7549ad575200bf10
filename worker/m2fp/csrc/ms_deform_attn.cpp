// Multi-scale deformable attention, CPU forward: the op `m2fp::ms_deform_attn`.
//
// Same semantics as `worker.m2fp.deformable_attention.multi_scale_deformable_attention_reference`
// (F.grid_sample, bilinear, padding zeros, align_corners=False, summed with the attention weights):
//
//   value               (B, S, M, D)        float32 or bfloat16, S = sum_l H_l * W_l, row-major per level
//   spatial_shapes      [H_0, W_0, H_1, W_1, ...]
//   sampling_locations  (B, Q, M, L, P, 2)  normalised (x, y); any float dtype (read as float32)
//   attention_weights   (B, Q, M, L, P)     any float dtype (read as float32)
//   -> output           (B, Q, M * D)       value's dtype; accumulated in float32
//
// Work is split over the B * Q * M (batch, query, head) items with at::parallel_for, so batch 1
// uses every intra-op thread. Each item reads, per level and point, four corner rows of D
// contiguous channels (value is channels-last per head) and accumulates them in a float32 row of D,
// in one branch-free pass (corners outside the map weigh 0 at a clamped address): the inner loop
// runs over the head dimension and is left to the compiler's auto-vectoriser. Each item first
// asks for the next item's corner rows (`prefetch_item`).
//
// Instruction set: the binary is built for the generic x86-64 baseline, and the kernels are
// compiled a second and third time for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) through
// GCC's `target_clones`; the loader picks the best clone for the CPU it runs on (ifunc). So a
// build runs on any x86-64 machine, is fast on AVX2 ones, and needs no -march=native.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define M2FP_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define M2FP_ISA_DISPATCH "target_clones(x86-64-v4, x86-64-v3, default)"
#else
#define M2FP_TARGET_CLONES
#define M2FP_ISA_DISPATCH "none (compiler baseline)"
#endif

namespace {

constexpr int64_t kMaxHeadDim = 1024;  // the per-item float32 accumulator lives on the stack

struct Problem {
  const void* value;         // (B, S, M, D)
  const float* locations;    // (B, Q, M, L, P, 2)
  const float* weights;      // (B, Q, M, L, P)
  void* output;              // (B, Q, M, D)
  int64_t num_values;        // S
  int64_t num_queries;       // Q
  int64_t num_heads;         // M
  int64_t head_dim;          // D
  int64_t num_levels;        // L
  int64_t num_points;        // P
  std::vector<int64_t> heights, widths, starts;  // per level
};

inline float to_float(float value) { return value; }
inline float to_float(uint16_t bfloat16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bfloat16_bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void store(float* out, const float* accumulator, int64_t count) {
  for (int64_t channel = 0; channel < count; ++channel) out[channel] = accumulator[channel];
}
inline void store(uint16_t* out, const float* accumulator, int64_t count) {
  for (int64_t channel = 0; channel < count; ++channel) {
    out[channel] = c10::BFloat16(accumulator[channel]).x;  // round to nearest even
  }
}


// accumulator[0:D] += the four weighted corner rows, in one pass over the channels
template <typename storage_t, int kHeadDim>
inline __attribute__((always_inline)) void axpy4(float* __restrict accumulator, int64_t head_dim,
                                                 const storage_t* __restrict row_a, float weight_a,
                                                 const storage_t* __restrict row_b, float weight_b,
                                                 const storage_t* __restrict row_c, float weight_c,
                                                 const storage_t* __restrict row_d, float weight_d) {
  const int64_t count = kHeadDim > 0 ? kHeadDim : head_dim;
  for (int64_t channel = 0; channel < count; ++channel) {
    accumulator[channel] += weight_a * to_float(row_a[channel]) + weight_b * to_float(row_b[channel]) +
                            weight_c * to_float(row_c[channel]) + weight_d * to_float(row_d[channel]);
  }
}

// Prefetch hints for one item's corner rows: the rows the next item will read are asked for
// while this one computes, so that its loads find them in cache (the values of the three levels,
// 11 MB at 640x864, are read in an order no hardware prefetcher follows). Only an address inside
// the level is ever formed (clamped; NaN or far-off locations give corner 0), and a prefetch
// never faults or changes a result. Measured inside the forward at 640x864 (golden weights,
// 2 threads, 7 interleaved forwards): the op's time per forward went 88.6 -> 51.2 ms (medians).
template <typename storage_t, int kHeadDim>
inline __attribute__((always_inline)) void prefetch_item(const Problem& problem, int64_t item) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t pixel_bytes = problem.num_heads * head_dim * static_cast<int64_t>(sizeof(storage_t));
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(storage_t));
  const int64_t batch = item / (problem.num_queries * problem.num_heads), head = item % problem.num_heads;
  const float* locations = problem.locations + item * problem.num_levels * problem.num_points * 2;
  const char* item_base = static_cast<const char*>(problem.value) + batch * problem.num_values * pixel_bytes +
                          head * row_bytes;
  for (int64_t level = 0; level < problem.num_levels; ++level) {
    const int64_t height = problem.heights[level], width = problem.widths[level];
    if (height < 2 || width < 2) continue;
    const float last_column = static_cast<float>(width - 2), last_row = static_cast<float>(height - 2);
    const char* level_base = item_base + problem.starts[level] * pixel_bytes;
    for (int64_t point = 0; point < problem.num_points; ++point, locations += 2) {
      float x = locations[0] * static_cast<float>(width) - 0.5f;  // as in attend_items
      float y = locations[1] * static_cast<float>(height) - 0.5f;
      x = x >= 0.0f ? (x <= last_column ? x : last_column) : 0.0f;  // NaN -> 0
      y = y >= 0.0f ? (y <= last_row ? y : last_row) : 0.0f;
      const char* north = level_base + (static_cast<int64_t>(y) * width + static_cast<int64_t>(x)) * pixel_bytes;
      const char* south = north + width * pixel_bytes;
      for (int64_t offset = 0; offset < row_bytes; offset += 64) {
        __builtin_prefetch(north + offset);
        __builtin_prefetch(north + pixel_bytes + offset);
        __builtin_prefetch(south + offset);
        __builtin_prefetch(south + pixel_bytes + offset);
      }
    }
  }
}

// Items [begin, end) of the flattened (batch, query, head) index; storage_t is float or the bits of bfloat16.
template <typename storage_t, int kHeadDim>
inline __attribute__((always_inline)) void attend_items(const Problem& problem, int64_t begin, int64_t end) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t num_heads = problem.num_heads;
  const int64_t items_per_batch = problem.num_queries * num_heads;
  const int64_t pixel_stride = num_heads * head_dim;  // between neighbouring positions of one head
  const int64_t samples_per_item = problem.num_levels * problem.num_points;
  const auto* value = static_cast<const storage_t*>(problem.value);
  auto* output = static_cast<storage_t*>(problem.output);

  float accumulator[kHeadDim > 0 ? kHeadDim : kMaxHeadDim];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t batch = item / items_per_batch;
    const int64_t head = item % num_heads;
    const float* locations = problem.locations + item * samples_per_item * 2;
    const float* weights = problem.weights + item * samples_per_item;
    const storage_t* value_head = value + batch * problem.num_values * pixel_stride + head * head_dim;
    for (int64_t channel = 0; channel < head_dim; ++channel) accumulator[channel] = 0.0f;
    if (item + 1 < end) prefetch_item<storage_t, kHeadDim>(problem, item + 1);

    for (int64_t level = 0; level < problem.num_levels; ++level) {
      const int64_t height = problem.heights[level], width = problem.widths[level];
      const float half_width = static_cast<float>(width) / 2, half_height = static_cast<float>(height) / 2;
      const float float_width = static_cast<float>(width), float_height = static_cast<float>(height);
      const storage_t* value_level = value_head + problem.starts[level] * pixel_stride;
      for (int64_t point = 0; point < problem.num_points; ++point) {
        const int64_t sample = level * problem.num_points + point;
        const float weight = weights[sample];
        // As the reference: grid = 2 * location - 1, then grid_sample's unnormalisation for
        // align_corners=False: pixel = (grid + 1) * size / 2 - 0.5 (pixel centres at integers).
        const float grid_x = 2.0f * locations[2 * sample] - 1.0f;
        const float grid_y = 2.0f * locations[2 * sample + 1] - 1.0f;
        const float x = (grid_x + 1.0f) * half_width - 0.5f;
        const float y = (grid_y + 1.0f) * half_height - 0.5f;
        // Entirely outside (or NaN): all four corners are padding zeros. Also keeps the casts below in range.
        if (!(x > -1.0f && x < float_width && y > -1.0f && y < float_height)) continue;
        const float x_west = std::floor(x), y_north = std::floor(y);
        const int64_t column = static_cast<int64_t>(x_west), row = static_cast<int64_t>(y_north);
        const float to_east = x - x_west, to_west = (x_west + 1.0f) - x;
        const float to_south = y - y_north, to_north = (y_north + 1.0f) - y;
        // Corners outside the map get weight 0 and a clamped (valid) address: one branch-free pass.
        const bool has_west = column >= 0, has_east = column + 1 < width;
        const bool has_north = row >= 0, has_south = row + 1 < height;
        const int64_t west = has_west ? column : 0, east = has_east ? column + 1 : width - 1;
        const int64_t north = has_north ? row : 0, south = has_south ? row + 1 : height - 1;
        const float north_weight = has_north ? weight * to_north : 0.0f;
        const float south_weight = has_south ? weight * to_south : 0.0f;
        const float west_part = has_west ? to_west : 0.0f, east_part = has_east ? to_east : 0.0f;
        axpy4<storage_t, kHeadDim>(accumulator, head_dim,
                                   value_level + (north * width + west) * pixel_stride, north_weight * west_part,
                                   value_level + (north * width + east) * pixel_stride, north_weight * east_part,
                                   value_level + (south * width + west) * pixel_stride, south_weight * west_part,
                                   value_level + (south * width + east) * pixel_stride, south_weight * east_part);
      }
    }
    store(output + item * head_dim, accumulator, head_dim);
  }
}

// One non-template entry point per (dtype, head_dim) so that target_clones applies to plain functions.
#define M2FP_KERNEL(name, storage_t, kHeadDim)                                              \
  M2FP_TARGET_CLONES void name(const Problem& problem, int64_t begin, int64_t end) {        \
    attend_items<storage_t, kHeadDim>(problem, begin, end);                                 \
  }
M2FP_KERNEL(attend_float_d32, float, 32)
M2FP_KERNEL(attend_float_d16, float, 16)
M2FP_KERNEL(attend_float_d64, float, 64)
M2FP_KERNEL(attend_float_any, float, 0)
M2FP_KERNEL(attend_bfloat16_d32, uint16_t, 32)
M2FP_KERNEL(attend_bfloat16_d16, uint16_t, 16)
M2FP_KERNEL(attend_bfloat16_d64, uint16_t, 64)
M2FP_KERNEL(attend_bfloat16_any, uint16_t, 0)
#undef M2FP_KERNEL

using Kernel = void (*)(const Problem&, int64_t, int64_t);

Kernel pick_kernel(bool bfloat16, int64_t head_dim) {
  switch (head_dim) {
    case 32: return bfloat16 ? attend_bfloat16_d32 : attend_float_d32;
    case 16: return bfloat16 ? attend_bfloat16_d16 : attend_float_d16;
    case 64: return bfloat16 ? attend_bfloat16_d64 : attend_float_d64;
    default: return bfloat16 ? attend_bfloat16_any : attend_float_any;
  }
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                              const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.device().is_cpu() && sampling_locations.device().is_cpu() &&
                  attention_weights.device().is_cpu(),
              "m2fp::ms_deform_attn: all tensors must be on the CPU");
  TORCH_CHECK(value.dim() == 4, "m2fp::ms_deform_attn: value must be (batch, values, heads, head_dim), got ",
              value.sizes());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kBFloat16,
              "m2fp::ms_deform_attn: value must be float32 or bfloat16, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "m2fp::ms_deform_attn: sampling_locations must be (batch, queries, heads, levels, points, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(sampling_locations.is_floating_point() && attention_weights.is_floating_point(),
              "m2fp::ms_deform_attn: sampling_locations and attention_weights must be floating point");
  const int64_t batch = value.size(0), num_values = value.size(1), num_heads = value.size(2),
                head_dim = value.size(3);
  const int64_t num_queries = sampling_locations.size(1), num_levels = sampling_locations.size(3),
                num_points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == batch && sampling_locations.size(2) == num_heads,
              "m2fp::ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " do not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "m2fp::ms_deform_attn: attention_weights must be ", sampling_locations.sizes().slice(0, 5), ", got ",
              attention_weights.sizes());
  TORCH_CHECK(static_cast<int64_t>(spatial_shapes.size()) == 2 * num_levels,
              "m2fp::ms_deform_attn: spatial_shapes must hold (H, W) of each of the ", num_levels, " levels, got ",
              spatial_shapes);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "m2fp::ms_deform_attn: head_dim must be 1..",
              kMaxHeadDim, ", got ", head_dim);

  Problem problem;
  int64_t start = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
    TORCH_CHECK(height >= 1 && width >= 1, "m2fp::ms_deform_attn: level ", level, " has size ", height, "x", width);
    problem.heights.push_back(height);
    problem.widths.push_back(width);
    problem.starts.push_back(start);
    start += height * width;
  }
  TORCH_CHECK(start == num_values, "m2fp::ms_deform_attn: spatial_shapes ", spatial_shapes, " sum to ", start,
              " positions but value has ", num_values);

  const at::Tensor value_contiguous = value.contiguous();
  const at::Tensor locations = sampling_locations.to(at::kFloat).contiguous();
  const at::Tensor weights = attention_weights.to(at::kFloat).contiguous();
  at::Tensor output = at::empty({batch, num_queries, num_heads * head_dim}, value.options());
  if (output.numel() == 0) return output;

  problem.value = value_contiguous.data_ptr();
  problem.locations = locations.data_ptr<float>();
  problem.weights = weights.data_ptr<float>();
  problem.output = output.data_ptr();
  problem.num_values = num_values;
  problem.num_queries = num_queries;
  problem.num_heads = num_heads;
  problem.head_dim = head_dim;
  problem.num_levels = num_levels;
  problem.num_points = num_points;

  const Kernel kernel = pick_kernel(value.scalar_type() == at::kBFloat16, head_dim);
  // ~L*P*4*D multiply-adds per item: 64 items are ~100k flops, well above the threading overhead.
  at::parallel_for(0, batch * num_queries * num_heads, 64,
                   [&](int64_t begin, int64_t end) { kernel(problem, begin, end); });
  return output;
}

std::string build_info() {
  std::string info = "isa_dispatch=" M2FP_ISA_DISPATCH;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  __builtin_cpu_init();
  info += __builtin_cpu_supports("x86-64-v4")   ? "; clone=x86-64-v4"
          : __builtin_cpu_supports("x86-64-v3") ? "; clone=x86-64-v3"
                                                : "; clone=default";
#endif
#ifdef _OPENMP
  info += "; openmp=" + std::to_string(_OPENMP);
#else
  info += "; openmp=none (single-threaded)";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(m2fp, m) {
  m.def("ms_deform_attn(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(m2fp, CPU, m) { m.impl("ms_deform_attn", &ms_deform_attn_cpu); }
