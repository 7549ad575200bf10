// float32 matrix products on Intel AMX as three bf16 products ("bf16x3"), fp32 accumulation: the ops
// `m2fp::amx_available`, `amx_pack`, `amx_linear`, `amx_linear_into` and `amx_conv3x3`
// (worker/m2fp/amx.py owns where they run: the linears, the backbone's 1x1 and direct 3x3
// convolutions and the F(2x2) Winograd products).
//
// AMX's TDPBF16PS multiplies bf16 pairs and accumulates into fp32 tiles at ~16x the rate of
// AVX-512 fp32 FMAs. A float32 operand x is split into hi = bf16(x) (round to nearest even) and
// lo = bf16(x - hi); then
//
//   x . w  ~=  hi_x . hi_w  +  lo_x . hi_w  +  hi_x . lo_w          (lo_x . lo_w, ~2^-18, dropped)
//
// all accumulated in the same fp32 tile. The relative error per product is ~2^-17 (lo's own
// rounding and the dropped term): 2.3-4e-6 of the output's largest value at K = 256-2048
// against float64, where oneDNN's fp32 is 5-9e-7 and Winograd F(4x4) 6e-6
// (tests/model/test_amx_gemm.py). Three AMX products still cost less than one fp32 product on
// AVX-512: 1.24-2.3x oneDNN's fp32 rate on the network's shapes (docs/BENCHMARKS.md run K).
//
//   amx_available() -> bool
//       this CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID) and Linux granted this process
//       the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM); asked once.
//   amx_pack(w) -> packed
//       w (N, K) float32, the weight of out = x @ w.T -> (2, ceil(N/16), ceil(K/32), 512) int16:
//       [0] the hi and [1] the lo halves, each as AMX B tiles (16 K-pairs x 16 columns x 2),
//       zero padded. Done once per weight, when the model is prepared.
//   amx_linear(x, packed, n, bias, residual, relu) -> out
//       x (M, K) float32 with unit column stride (any row stride); out (M, n) float32 =
//       x @ w.T [+ bias[n]] [+ residual (M, n)], then max(0, .) if relu.
//   amx_linear_into(x, packed, n, bias, relu, out)
//       the same (no residual) written into out (M, n), unit column stride, any row stride: a
//       column slice of a larger matrix (the Winograd products, one tile position at a time).
//   amx_conv3x3(x, packed, n, stride, bias, relu) -> out
//       a 3x3 convolution, stride 1 or 2, as one product with K = 9 C: x the zero-padded NHWC map
//       (B, H + 2, W + 2, C), C a multiple of 32, packed from the (n, 3, 3, C) weight as (n, 9 C);
//       out (B * Ho * Wo, n), each row an output pixel. The packer gathers each row's nine taps
//       from x directly (an implicit im2col: no 9x copy of the map).
//
// The rows of A go in bands of at most 4 MB of packed tiles (a whole 3x3 stem map would be 318 MB,
// faulted in anew on every call): per band, x is split and packed as A tiles (16 rows x 32 K) in
// parallel over row blocks, then the products run per 32 x 32 output block (2 x 2 accumulator
// tiles, four operand tiles reloaded between the three products), the blocks split over threads
// row-major so that one thread's blocks share their rows and stream the packed weight from L2.
// (Packing each thread's rows just before it multiplies them was measured too: 10-40 % slower on
// N <= 1024.) The tile configuration is per thread, loaded at the start of each parallel chunk
// and released at its end.
//
// Everything that executes AMX or AVX-512 instructions carries its own target attribute and runs
// only after amx_available(); the library still builds and loads on any x86-64 CPU.

// GCC 12's AVX-512 headers build some results from _mm512_undefined_*(), which -Wall reports as
// "may be used uninitialized" inside the intrinsics themselves.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define M2FP_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kTileK = 32;       // bf16 per A tile row (64 bytes)
constexpr int64_t kTileElems = 512;  // one 16 x 64-byte tile of bf16

#if defined(__x86_64__)

bool cpu_has_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1, avx512f = (ebx >> 16) & 1;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx512_bf16 = (eax >> 5) & 1;
  return tile && bf16 && avx512f && avx512_bf16;
}

bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok =
      cpu_has_amx() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

M2FP_AMX_TARGET void load_tile_config() {
  TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// hi = bf16(x), lo = bf16(x - hi) for 16 floats.
M2FP_AMX_TARGET inline void split16(const float* x, uint16_t* hi, uint16_t* lo) {
  const __m512 v = _mm512_loadu_ps(x);
  const __m256bh h = _mm512_cvtneps_pbh(v);
  const __m512 h32 = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
  const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, h32));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), reinterpret_cast<__m256i>(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), reinterpret_cast<__m256i>(l));
}

struct Operands {
  const float* x;
  int64_t m, k, ldx;
  // A 3x3 convolution (amx_conv3x3) instead of rows of x: x is the zero-padded NHWC map
  // (B, hp, wp, channels), row `row` of A the output pixel (b, oy, ox) of a (ho, wo) grid and
  // column t * channels + c its tap t = 3 * dy + dx: x[b, oy * stride + dy, ox * stride + dx, c].
  bool conv;
  int64_t channels, stride, ho, wo, hp, wp;
  int64_t row_offset;  // the band's first row: A's row r is row row_offset + r of the whole product
  int64_t row_blocks, k_blocks, column_blocks;  // of 16 rows, 32 K, 16 columns (the band's rows)
  uint16_t *a_hi, *a_lo;
  const uint16_t *b_hi, *b_lo;
  const float* bias;
  const float* residual;
  int64_t ldr;
  float* out;
  int64_t n, ldo;
  bool relu;
};

// Where A's row `row` has its columns k0 .. k0 + 31 (contiguous in x).
inline const float* source_row(const Operands& p, int64_t band_row, int64_t k0) {
  const int64_t row = p.row_offset + band_row;
  if (!p.conv) return p.x + row * p.ldx + k0;
  const int64_t tap = k0 / p.channels, channel = k0 % p.channels;
  const int64_t image = row / (p.ho * p.wo), pixel = row % (p.ho * p.wo);
  const int64_t y = (pixel / p.wo) * p.stride + tap / 3, x = (pixel % p.wo) * p.stride + tap % 3;
  return p.x + ((image * p.hp + y) * p.wp + x) * p.channels + channel;
}

// Rows [16 * first, 16 * last) of A as tiles [row block][K block][16][32], hi and lo.
M2FP_AMX_TARGET void pack_rows(const Operands& p, int64_t first, int64_t last) {
  alignas(64) float padded[kTileK];
  for (int64_t block = first; block < last; ++block) {
    for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
      uint16_t* hi = p.a_hi + (block * p.k_blocks + kb) * kTileElems;
      uint16_t* lo = p.a_lo + (block * p.k_blocks + kb) * kTileElems;
      const int64_t k0 = kb * kTileK;
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t row = block * 16 + r;
        const float* source = padded;
        if (row < p.m && k0 + kTileK <= p.k) {
          source = source_row(p, row, k0);
        } else {
          const float* values = row < p.m ? source_row(p, row, k0) : nullptr;
          for (int64_t j = 0; j < kTileK; ++j) padded[j] = values && k0 + j < p.k ? values[j] : 0.f;
        }
        split16(source, hi + r * kTileK, lo + r * kTileK);
        split16(source + 16, hi + r * kTileK + 16, lo + r * kTileK + 16);
      }
    }
  }
}

// out block rows [row0, row0 + rows) x columns [col0, col0 + cols) from the 32 x 32 accumulators.
M2FP_AMX_TARGET void write_block(const Operands& p, const float (*c)[32], int64_t row0,
                                 int64_t col0) {
  const int64_t rows = std::min<int64_t>(32, p.m - row0), cols = std::min<int64_t>(32, p.n - col0);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t half = 0; half < 32 && half < cols; half += 16) {
    const int64_t width = std::min<int64_t>(16, cols - half);
    const __mmask16 mask = width == 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
    const __m512 bias =
        p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + col0 + half) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(&c[r][half]), bias);
      if (p.residual)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.residual + (row0 + r) * p.ldr + col0 + half));
      if (p.relu) v = _mm512_max_ps(v, zero);
      _mm512_mask_storeu_ps(p.out + (row0 + r) * p.ldo + col0 + half, mask, v);
    }
  }
}

// Accumulators 0-3 (the 2 x 2 output tiles) += A tiles 4, 5 times B tiles 6, 7.
M2FP_AMX_TARGET inline void products_2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Output blocks [first, last) of 32 x 32, numbered row-major over (row pairs, column pairs).
M2FP_AMX_TARGET void product_blocks(const Operands& p, int64_t first, int64_t last) {
  load_tile_config();
  alignas(64) float c[32][32];
  const int64_t column_pairs = (p.column_blocks + 1) / 2;
  for (int64_t index = first; index < last; ++index) {
    const int64_t i = index / column_pairs, j = index % column_pairs;
    const int64_t m0 = 2 * i, m1 = std::min(2 * i + 1, p.row_blocks - 1);
    const int64_t n0 = 2 * j, n1 = std::min(2 * j + 1, p.column_blocks - 1);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
      const int64_t a0 = (m0 * p.k_blocks + kb) * kTileElems, a1 = (m1 * p.k_blocks + kb) * kTileElems;
      const int64_t b0 = (n0 * p.k_blocks + kb) * kTileElems, b1 = (n1 * p.k_blocks + kb) * kTileElems;
      _tile_loadd(4, p.a_lo + a0, 64);  // the small terms first
      _tile_loadd(5, p.a_lo + a1, 64);
      _tile_loadd(6, p.b_hi + b0, 64);
      _tile_loadd(7, p.b_hi + b1, 64);
      products_2x2();
      _tile_loadd(4, p.a_hi + a0, 64);
      _tile_loadd(5, p.a_hi + a1, 64);
      _tile_loadd(6, p.b_lo + b0, 64);
      _tile_loadd(7, p.b_lo + b1, 64);
      products_2x2();
      _tile_loadd(6, p.b_hi + b0, 64);
      _tile_loadd(7, p.b_hi + b1, 64);
      products_2x2();
    }
    _tile_stored(0, &c[0][0], 128);
    _tile_stored(1, &c[0][16], 128);
    _tile_stored(2, &c[16][0], 128);
    _tile_stored(3, &c[16][16], 128);
    write_block(p, c, i * 32, j * 32);
  }
  _tile_release();
}

#else  // not x86-64: never available

bool amx_permitted() { return false; }

#endif

bool amx_available_cpu() { return amx_permitted(); }

at::Tensor amx_pack_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "amx_pack: weight must be a 2-D float32 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t column_blocks = (n + 15) / 16, k_blocks = (k + kTileK - 1) / kTileK;
  at::Tensor packed = at::zeros({2, column_blocks, k_blocks, kTileElems}, w.options().dtype(at::kShort));
  auto* hi = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
  uint16_t* lo = hi + column_blocks * k_blocks * kTileElems;
  const float* source = w.data_ptr<float>();
  for (int64_t column = 0; column < n; ++column) {
    for (int64_t depth = 0; depth < k; ++depth) {
      const float value = source[column * k + depth];
      const c10::BFloat16 high(value);  // round to nearest even
      const c10::BFloat16 low(value - static_cast<float>(high));
      // B tile (column block, K block): row = K pair, then 16 columns x 2 of the pair.
      const int64_t at = ((column / 16) * k_blocks + depth / kTileK) * kTileElems +
                         ((depth % kTileK) / 2) * 32 + (column % 16) * 2 + depth % 2;
      hi[at] = high.x;
      lo[at] = low.x;
    }
  }
  return packed;
}

// `packed` holds an (n, k) weight from amx_pack; `bias`, if any, n floats.
void check_weight(const char* op, const at::Tensor& packed, int64_t n, int64_t k,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == 2 && packed.scalar_type() == at::kShort &&
                  packed.size(1) == (n + 15) / 16 && packed.size(2) == (k + kTileK - 1) / kTileK &&
                  packed.size(3) == kTileElems && packed.is_contiguous(),
              op, ": packed does not hold a (", n, ", ", k, ") weight from amx_pack");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                op, ": bias must be a contiguous float32 tensor of ", n);
}

void check_operands(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(amx_permitted(), "amx_linear: this CPU or process cannot run AMX");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(1) == 1,
              "amx_linear: x must be a 2-D float32 CPU tensor with unit column stride");
  const int64_t m = x.size(0), k = x.size(1);
  check_weight("amx_linear", packed, n, k, bias);
  if (residual.has_value())
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->dim() == 2 &&
                    residual->size(0) == m && residual->size(1) == n && residual->stride(1) == 1,
                "amx_linear: residual must be an (M, n) float32 tensor with unit column stride");
}

// Rows of A per band: the band's packed A (hi and lo, 4 bytes per element) within kBandBytes,
// so that it stays in cache and its buffer is reused (a whole 3x3 stem map would be 318 MB).
constexpr int64_t kBandBytes = 4 << 20;

int64_t band_rows(int64_t k_blocks) {
  const int64_t rows = kBandBytes / (k_blocks * kTileK * 4);
  return std::max<int64_t>(32, rows / 32 * 32);
}

// The products of `p` (m rows), band after band: pack the band's rows, multiply them.
void execute(Operands p) {
#if defined(__x86_64__)
  const int64_t m = p.m, band = std::min(band_rows(p.k_blocks), (m + 31) / 32 * 32);
  at::Tensor a = at::empty({2, band / 16, p.k_blocks, kTileElems}, at::TensorOptions().dtype(at::kShort));
  auto* a_hi = reinterpret_cast<uint16_t*>(a.data_ptr<int16_t>());
  p.a_hi = a_hi;
  p.a_lo = a_hi + (band / 16) * p.k_blocks * kTileElems;
  const float* residual = p.residual;
  float* out = p.out;
  for (int64_t first = 0; first < m; first += band) {
    Operands q = p;
    q.m = std::min(band, m - first);
    q.row_blocks = ((q.m + 31) / 32) * 2;
    q.row_offset = first;
    q.out = out + first * p.ldo;
    q.residual = residual ? residual + first * p.ldr : nullptr;
    at::parallel_for(0, q.row_blocks, 4, [&](int64_t begin, int64_t end) { pack_rows(q, begin, end); });
    const int64_t blocks = (q.row_blocks / 2) * ((q.column_blocks + 1) / 2);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) { product_blocks(q, begin, end); });
  }
#endif
}

// out (M, n), unit column stride, any row stride: x @ w.T [+ bias] [+ residual], ReLU if asked.
void run(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1);
  if (m == 0 || n == 0) return;
  const auto* b_hi = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const int64_t k_blocks = packed.size(2), column_blocks = packed.size(1);
  Operands p{x.data_ptr<float>(), m, k, x.stride(0), false, 0, 0, 0, 0, 0, 0, 0,
             0, k_blocks, column_blocks, nullptr, nullptr,
             b_hi, b_hi + column_blocks * k_blocks * kTileElems,
             bias.has_value() ? bias->data_ptr<float>() : nullptr,
             residual.has_value() ? residual->data_ptr<float>() : nullptr,
             residual.has_value() ? residual->stride(0) : 0,
             out.data_ptr<float>(), n, out.stride(0), relu};
  execute(p);
}

// out (B * ho * wo, n) of a 3x3 convolution (stride 1 or 2) over the zero-padded NHWC map x.
at::Tensor amx_conv3x3_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                           int64_t stride, const std::optional<at::Tensor>& bias, bool relu) {
  TORCH_CHECK(amx_permitted(), "amx_conv3x3: this CPU or process cannot run AMX");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "amx_conv3x3: x must be a contiguous (B, H + 2, W + 2, C) float32 CPU tensor");
  TORCH_CHECK(stride == 1 || stride == 2, "amx_conv3x3: stride must be 1 or 2");
  const int64_t batch = x.size(0), hp = x.size(1), wp = x.size(2), channels = x.size(3);
  TORCH_CHECK(channels % kTileK == 0 && hp >= 3 && wp >= 3,
              "amx_conv3x3: C must be a multiple of 32 and the padded map at least 3x3");
  const int64_t ho = (hp - 3) / stride + 1, wo = (wp - 3) / stride + 1, k = 9 * channels;
  const int64_t m = batch * ho * wo;
  check_weight("amx_conv3x3", packed, n, k, bias);  // k = 9 C, a multiple of 32
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const auto* b_hi = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const int64_t k_blocks = k / kTileK, column_blocks = packed.size(1);
  Operands p{x.data_ptr<float>(), m, k, 0, true, channels, stride, ho, wo, hp, wp, 0,
             0, k_blocks, column_blocks, nullptr, nullptr,
             b_hi, b_hi + column_blocks * k_blocks * kTileElems,
             bias.has_value() ? bias->data_ptr<float>() : nullptr, nullptr, 0,
             out.data_ptr<float>(), n, n, relu};
  execute(p);
  return out;
}

at::Tensor amx_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu) {
  check_operands(x, packed, n, bias, residual);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  run(x, packed, n, bias, residual, relu, out);
  return out;
}

void amx_linear_into_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias, bool relu, at::Tensor out) {
  check_operands(x, packed, n, bias, std::nullopt);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == n && out.stride(1) == 1,
              "amx_linear_into: out must be an (M, n) float32 tensor with unit column stride");
  run(x, packed, n, bias, std::nullopt, relu, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2fp, m) {
  m.def("amx_available() -> bool", &amx_available_cpu);
  m.def("amx_pack(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor packed, int n, Tensor? bias, Tensor? residual, bool relu) -> Tensor");
  m.def("amx_linear_into(Tensor x, Tensor packed, int n, Tensor? bias, bool relu, Tensor(a!) out) -> ()");
  m.def("amx_conv3x3(Tensor x, Tensor packed, int n, int stride, Tensor? bias, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2fp, CPU, m) {
  m.impl("amx_pack", &amx_pack_cpu);
  m.impl("amx_linear", &amx_linear_cpu);
  m.impl("amx_linear_into", &amx_linear_into_cpu);
  m.impl("amx_conv3x3", &amx_conv3x3_cpu);
}
