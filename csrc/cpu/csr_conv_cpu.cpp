// CPU kernels of the sparse convolution ops (csr_conv2d_forward,
// csr_conv2d_input_grad, csr_conv2d_weight_grad): direct sparse convolution, each
// nonzero adding a shifted window of the batch-innermost input into its output
// channel (csr_conv_kernels.inc), float32 through the ISA dispatch of the linear
// kernels (bit-identical across ISAs), float64 through the same body on a 16-lane
// double vector. The arguments are checked (csr_conv.cpp) before anything is
// allocated; the structure's content is checked here, on the host, in the pass that
// decodes it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../inline_bits.h"
#include "../sparsemom.h"
#include "cpu_isa.h"
#include "vec16.h"

namespace sparsemom {
namespace {

// One nonzero of the CSR weight, decoded: its input channel and kernel offset as
// the pixel offset (c * H + kh) * W + kw of the input, and the offset itself.
struct ConvTap {
  int64_t offset;
  int32_t channel, kh, kw;
  int32_t index;  // its position in CSR order (where its value is)
};

struct ConvGeometry {
  int64_t in_channels, out_channels, batch, in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

// Cache blocking: rows (output channels) per item and input channels per chunk.
struct ConvBlock {
  int64_t rows, channels;
  int64_t band = 0;       // the weight gradient's output rows per band
  bool packed = false;    // the forward copies each chunk's window (conv_forward_tile_packed)
};
constexpr int64_t kConvMaxBlockRows = 256;

template <typename T>
struct ConvForwardArgs {
  const int32_t* chunk_ptr;  // (O, chunks + 1): where each row's taps of each channel chunk start
  const ConvTap* taps;       // each row's sorted by (chunk, kernel offset, channel)
  const T* values;  // CSR order (a tap's value is values[tap.index])
  const T* bias;    // nullptr: no bias
  const T* x;       // (C, H, W, N) contiguous
  T* y;             // (O, OH, OW, N) contiguous
  ConvGeometry g;
  ConvBlock block;
};

template <typename T>
struct ConvInputGradArgs {
  const int32_t* col_ptr;  // (C * KH * KW + 1)
  const int32_t* row_idx;  // (nnz,) output channel of each CSC entry
  const int32_t* perm;     // CSC position -> CSR position
  const T* values;         // CSR order
  const T* grad_out;       // (O, OH, OW, N) contiguous
  T* grad_x;               // (C, H, W, N) contiguous
  ConvGeometry g;
};


template <typename T>
struct ConvWeightGradArgs {
  const int32_t* row_ptr;
  const ConvTap* taps;  // best sorted by channel within each row (any order is correct)
  const T* grad_out;    // (O, OH, OW, N) contiguous
  const T* x;           // (C, H, W, N) contiguous
  T* out;               // (nnz,)
  ConvGeometry g;
  ConvBlock block;
};

// Batch entries per register tile: 8 vectors (128 floats per pixel).
constexpr int kConvTileVectors = 8;

// Pixels per register block for a batch tile of `vectors` vectors: about 16 accumulators.
constexpr int conv_pixel_block(int vectors) { return vectors >= 5 ? 2 : vectors >= 3 ? 4 : 8; }

// The forward's blocking: a chunk's window (kh rows of P + kw - 1 pixels, stride 1, of
// each of its channels, one batch tile) takes at most 32 KiB of L1, but a chunk holds at
// least 24 taps per row on average: a row's visit to a chunk loads and stores its output
// tile, which the taps must outweigh (3x3 256 -> 256, batch 32: 24 rather than 8 taps
// made the forward 1.4x faster at density 0.01 and 1.35x at 0.05). A block's output
// tiles take at most 512 KiB of L2.
template <typename T>
ConvBlock forward_block(const ConvGeometry& g, int64_t nnz) {
  const int64_t lanes = std::clamp<int64_t>(g.batch, 1, 16 * kConvTileVectors);
  const int64_t pixels = conv_pixel_block(static_cast<int>((lanes + 15) / 16));
  const int64_t pixel_bytes = lanes * static_cast<int64_t>(sizeof(T));
  const int64_t window = (pixels - 1) * g.stride_w + g.kernel_w;  // input pixels of a block's row
  const int64_t for_l1 = 32 * 1024 / (g.kernel_h * window * pixel_bytes);
  const int64_t for_taps = nnz > 0 ? (24 * g.in_channels * g.out_channels + nnz - 1) / nnz : g.in_channels;
  const int64_t channels = std::clamp<int64_t>(std::max(for_l1, for_taps), 1, std::max<int64_t>(1, g.in_channels));
  const int64_t rows = std::clamp<int64_t>(512 * 1024 / (pixels * pixel_bytes), 1,
                                           std::max<int64_t>(1, g.out_channels));
  // Packing copies every input channel's window once per output row and pixel block, for
  // the nnz x P x vectors FMAs of all rows there: worth it when the copies are at most 1/16
  // of the FMAs. Against reading the input in place (AVX-512, one op alternating in one
  // process): 3x3 256 -> 256 16x16 batch 32 1.10x at density 0.05, 1.15x at 0.1 and 0.2,
  // 0.93x at 0.02 and 0.73x at 0.01 (copies 8% and 16% of the FMAs); 128 -> 128 32x32
  // batch 128 1.17x at 0.2; LeNet-5's conv2 1.21x at 0.2.
  const bool packed = nnz > 0 && 16 * g.in_channels * g.kernel_h * window <= nnz * pixels;
  return {rows, channels, 0, packed};
}

// The weight gradient's: bands of output rows of at most 32 KiB per channel (one batch
// tile), then a block's output-gradient bands and a chunk's input bands take about a
// quarter of a 2 MiB L2 each. 3x3, 256 -> 256, 16 x 16, batch 32: whole planes, blocks of
// 16 rows over chunks of 16 channels; 128 -> 128, 32 x 32, batch 128: bands of 2 rows,
// blocks of 16 rows, chunks of 8 channels.
template <typename T>
ConvBlock weight_grad_block(const ConvGeometry& g) {
  const int64_t lanes = std::clamp<int64_t>(g.batch, 1, 16 * kConvTileVectors);
  const int64_t row_bytes = std::max<int64_t>(1, g.out_w * lanes * static_cast<int64_t>(sizeof(T)));
  const int64_t band = std::clamp<int64_t>(32 * 1024 / row_bytes, 1, std::max<int64_t>(1, g.out_h));
  const int64_t pixels = 512 * 1024 / static_cast<int64_t>(sizeof(T) * lanes);
  const int64_t band_in_rows = (band - 1) * g.stride_h + g.kernel_h;
  const int64_t rows = std::clamp<int64_t>(pixels / std::max<int64_t>(1, band * g.out_w), 1, kConvMaxBlockRows);
  const int64_t channels = std::max<int64_t>(1, pixels / std::max<int64_t>(1, band_in_rows * g.in_w));
  return {rows, channels, band};
}

SPARSEMOM_FORCE_INLINE int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && (a < 0)); }
SPARSEMOM_FORCE_INLINE int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// float64 runs the portable body on 16 double lanes (the float vectors' arithmetic and tree).
namespace isa_default_f64 {
using V = vec16::isa_default::Lanes<double>;
#include "csr_conv_kernels.inc"
}  // namespace isa_default_f64

namespace isa_default {
using V = vec16::isa_default::V;
#include "csr_conv_kernels.inc"
}  // namespace isa_default

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
SPARSEMOM_BEGIN_TARGET("avx2,fma")
namespace isa_avx2 {
using V = vec16::isa_avx2::V;
#include "csr_conv_kernels.inc"
}  // namespace isa_avx2
SPARSEMOM_END_TARGET

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
SPARSEMOM_BEGIN_TARGET("avx512f,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
using V = vec16::isa_avx512::V;
#include "csr_conv_kernels.inc"
}  // namespace isa_avx512
SPARSEMOM_END_TARGET
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // SPARSEMOM_HAVE_X86_ISA_VARIANTS

// The kernel variant for T: float32 by the active ISA, float64 the one body.
template <typename Args>
using ItemsFn = void (*)(const Args&, int64_t, int64_t);

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
#define SPARSEMOM_CONV_PICK(name)                                                                     \
  template <typename T>                                                                               \
  auto pick_##name() {                                                                                \
    if constexpr (std::is_same_v<T, double>) {                                                        \
      return &isa_default_f64::name;                                                                  \
    } else {                                                                                          \
      return cpu::pick_for_active_isa(&isa_avx512::name, &isa_avx2::name, &isa_default::name);        \
    }                                                                                                 \
  }
#else
#define SPARSEMOM_CONV_PICK(name)                               \
  template <typename T>                                         \
  auto pick_##name() {                                          \
    if constexpr (std::is_same_v<T, double>) {                  \
      return &isa_default_f64::name;                            \
    } else {                                                    \
      return &isa_default::name;                                \
    }                                                           \
  }
#endif
SPARSEMOM_CONV_PICK(conv_forward_items)
SPARSEMOM_CONV_PICK(conv_input_grad_items)
SPARSEMOM_CONV_PICK(conv_weight_grad_items)
#undef SPARSEMOM_CONV_PICK

// Items per task: the items differ in cost (rows of different nnz), so more tasks
// than threads.
int64_t item_grain(int64_t items) {
  return std::max<int64_t>(1, items / (8 * std::max(1, at::get_num_threads())));
}

// `t` (n, c, h, w) as the (c, h, w, n) contiguous tensor the kernels read.
at::Tensor channels_first_batch_last(const at::Tensor& t) { return batch_innermost(t).permute({1, 2, 3, 0}); }

ConvGeometry geometry(int64_t in_channels, int64_t out_channels, int64_t batch, int64_t in_h, int64_t in_w, at::IntArrayRef kernel_size,
                      at::IntArrayRef stride, at::IntArrayRef padding) {
  return {in_channels,
          out_channels,
          batch,
          in_h,
          in_w,
          conv_output_size(in_h, kernel_size[0], stride[0], padding[0]),
          conv_output_size(in_w, kernel_size[1], stride[1], padding[1]),
          kernel_size[0],
          kernel_size[1],
          stride[0],
          stride[1],
          padding[0],
          padding[1]};
}

// The nonzeros of (row_ptr, col_idx) decoded for input planes of h x w, in CSR order,
// after checking row_ptr and that every column is in [0, channels * kh * kw).
std::vector<ConvTap> decode_taps(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t channels,
                                 int64_t in_h, int64_t in_w, at::IntArrayRef kernel_size) {
  const int64_t nnz = col_idx.numel(), n_rows = row_ptr.numel() - 1;
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr_row_ptr_host(rp.data_ptr<int32_t>(), n_rows, nnz);
  check_csr_col_idx_host(ci.data_ptr<int32_t>(), nnz, channels * kh * kw, "col_idx", "in_channels * kh * kw");
  std::vector<ConvTap> taps(static_cast<size_t>(nnz));
  const int32_t* cols = ci.data_ptr<int32_t>();
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t col = cols[k], c = col / (kh * kw), i = (col / kw) % kh, j = col % kw;
    taps[k] = {(c * in_h + i) * in_w + j, static_cast<int32_t>(c), static_cast<int32_t>(i), static_cast<int32_t>(j),
               static_cast<int32_t>(k)};
  }
  return taps;
}

// Each row's taps (in `row_order`, rows by `rows`) sorted by (channel chunk, kernel offset,
// their order) by a counting sort, and `chunk_ptr` (n_rows x (chunks + 1)) where each row's
// taps of each chunk start (the last entry of a row: its end).
std::vector<ConvTap> sort_forward_taps(const std::vector<ConvTap>& row_order, const int32_t* rows, int64_t n_rows,
                                       int64_t channels, at::IntArrayRef kernel_size, int64_t channels_per_chunk,
                                       std::vector<int32_t>& chunk_ptr) {
  const int64_t offsets = kernel_size[0] * kernel_size[1];
  const int64_t chunks = (channels + channels_per_chunk - 1) / channels_per_chunk;
  std::vector<ConvTap> taps(row_order.size());
  chunk_ptr.assign(static_cast<size_t>(n_rows * (chunks + 1)), 0);
  std::vector<int64_t> start(static_cast<size_t>(chunks * offsets + 1));
  auto bucket = [&](const ConvTap& t) { return (t.channel / channels_per_chunk) * offsets + t.kh * kernel_size[1] + t.kw; };
  for (int64_t r = 0; r < n_rows; ++r) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t k = rows[r]; k < rows[r + 1]; ++k) ++start[bucket(row_order[k]) + 1];
    for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
    for (int64_t c = 0; c <= chunks; ++c) chunk_ptr[r * (chunks + 1) + c] = static_cast<int32_t>(rows[r] + start[c * offsets]);
    for (int64_t k = rows[r]; k < rows[r + 1]; ++k) taps[rows[r] + start[bucket(row_order[k])]++] = row_order[k];
  }
  return taps;
}

// decode_taps, then sort_forward_taps.
std::vector<ConvTap> decode_forward_taps(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t channels,
                                         int64_t in_h, int64_t in_w, at::IntArrayRef kernel_size,
                                         int64_t channels_per_chunk, std::vector<int32_t>& chunk_ptr) {
  const std::vector<ConvTap> csr_order = decode_taps(row_ptr, col_idx, channels, in_h, in_w, kernel_size);
  const at::Tensor rp = row_ptr.contiguous();
  return sort_forward_taps(csr_order, rp.data_ptr<int32_t>(), row_ptr.numel() - 1, channels, kernel_size,
                           channels_per_chunk, chunk_ptr);
}

// The forward's items (output rows x blocks of rows) over the threads.
template <typename T>
void run_forward_items(const ConvForwardArgs<T>& a) {
  const auto fn = pick_conv_forward_items<T>();
  const int64_t items = a.g.out_h * ((a.g.out_channels + a.block.rows - 1) / a.block.rows);
  at::parallel_for(0, items, item_grain(items), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

at::Tensor csr_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& values,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding) {
  check_csr_conv2d_forward_args(x, values, bias, row_ptr, col_idx, kernel_size, stride, padding);
  const int64_t n = x.size(0), channels = x.size(1), out_channels = row_ptr.numel() - 1;
  const ConvGeometry g = geometry(channels, out_channels, n, x.size(2), x.size(3), kernel_size, stride, padding);
  at::Tensor y = at::empty({out_channels, g.out_h, g.out_w, n}, x.options());
  const ConvBlock block = x.scalar_type() == at::kDouble ? forward_block<double>(g, col_idx.numel())
                                                         : forward_block<float>(g, col_idx.numel());
  std::vector<int32_t> chunk_ptr;
  const std::vector<ConvTap> taps =
      decode_forward_taps(row_ptr, col_idx, channels, g.in_h, g.in_w, kernel_size, block.channels, chunk_ptr);
  if (y.numel() == 0) return y.permute({3, 0, 1, 2});
  const at::Tensor xb = channels_first_batch_last(x), v = values.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_conv2d_forward", [&] {
    run_forward_items(ConvForwardArgs<scalar_t>{chunk_ptr.data(), taps.data(), v.data_ptr<scalar_t>(),
                                                data_or_null<scalar_t>(b), xb.data_ptr<scalar_t>(),
                                                y.data_ptr<scalar_t>(), g, block});
  });
  return y.permute({3, 0, 1, 2});
}

// At stride 1 the input gradient is a forward convolution: of the output gradient with
// the kernel transposed and flipped (row c, column (o, kh - 1 - i, kw - 1 - j) holds weight
// (o; c, i, j)), padding k - 1 - p, where k - 1 >= p. The forward's kernel takes it where
// the input gradient's own would not keep its working set in L2: an input row reads kh rows
// of the output gradient of every channel, more than 4 MiB here. Against the own kernel at
// density 0.05, batch 128 (AVX-512, alternating in one process): 3 MiB or less, 0.87-1.13x
// (512 -> 512 4x4, 256 -> 256 8x8, 64 -> 64 32x32); 6 MiB, 1.5-1.65x (128 -> 128 32x32,
// 256 -> 256 16x16, 512 -> 512 8x8).
bool input_grad_as_forward(const ConvGeometry& g, int64_t element_size) {
  const int64_t lanes = std::min<int64_t>(g.batch, 16 * kConvTileVectors);
  const int64_t rows_bytes = g.kernel_h * g.out_channels * g.out_w * lanes * element_size;
  return g.stride_h == 1 && g.stride_w == 1 && g.pad_h <= g.kernel_h - 1 && g.pad_w <= g.kernel_w - 1 &&
         rows_bytes > 4 * 1024 * 1024;
}

template <typename T>
void input_grad_by_forward(const ConvGeometry& g, const int32_t* col_ptr, const int32_t* row_idx, const int32_t* perm,
                           int64_t nnz, const T* values, const T* grad_out, T* grad_x) {
  const ConvGeometry t{g.out_channels, g.in_channels, g.batch, g.out_h, g.out_w, g.in_h, g.in_w,
                       g.kernel_h, g.kernel_w, 1, 1, g.kernel_h - 1 - g.pad_h, g.kernel_w - 1 - g.pad_w};
  const int64_t offsets = g.kernel_h * g.kernel_w;
  std::vector<ConvTap> row_order(static_cast<size_t>(nnz));
  std::vector<int32_t> rows(static_cast<size_t>(g.in_channels + 1));
  for (int64_t c = 0; c <= g.in_channels; ++c) rows[c] = col_ptr[c * offsets];
  for (int64_t col = 0; col < g.in_channels * offsets; ++col) {
    const int32_t i = static_cast<int32_t>(g.kernel_h - 1 - (col / g.kernel_w) % g.kernel_h);
    const int32_t j = static_cast<int32_t>(g.kernel_w - 1 - col % g.kernel_w);
    for (int64_t e = col_ptr[col]; e < col_ptr[col + 1]; ++e) {
      const int64_t o = row_idx[e];
      row_order[e] = {(o * t.in_h + i) * t.in_w + j, static_cast<int32_t>(o), i, j, perm[e]};
    }
  }
  const ConvBlock block = forward_block<T>(t, nnz);
  std::vector<int32_t> chunk_ptr;
  const std::vector<ConvTap> taps =
      sort_forward_taps(row_order, rows.data(), t.out_channels, t.in_channels, {t.kernel_h, t.kernel_w},
                        block.channels, chunk_ptr);
  run_forward_items(ConvForwardArgs<T>{chunk_ptr.data(), taps.data(), values, nullptr, grad_out, grad_x, t, block});
}

at::Tensor csr_conv2d_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                                     const at::Tensor& row_idx, const at::Tensor& perm, at::IntArrayRef input_size,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_csr_conv2d_input_grad_args(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size, stride,
                                   padding);
  const int64_t n = grad_out.size(0), out_channels = grad_out.size(1);
  const int64_t channels = (col_ptr.numel() - 1) / (kernel_size[0] * kernel_size[1]);
  const ConvGeometry g = geometry(channels, out_channels, n, input_size[0], input_size[1], kernel_size, stride, padding);
  const int64_t nnz = row_idx.numel();
  const at::Tensor cp = col_ptr.contiguous(), ri = row_idx.contiguous();
  check_csr_row_ptr_host(cp.data_ptr<int32_t>(), col_ptr.numel() - 1, nnz, "col_ptr");
  check_csr_col_idx_host(ri.data_ptr<int32_t>(), nnz, out_channels, "row_idx", "out_channels");
  check_permutation_once(perm, "perm");
  at::Tensor grad_x = at::empty({channels, g.in_h, g.in_w, n}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x.permute({3, 0, 1, 2});
  const at::Tensor gb = channels_first_batch_last(grad_out), v = values.contiguous(), pm = perm.contiguous();
  if (input_grad_as_forward(g, grad_out.element_size())) {
    AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "csr_conv2d_input_grad", [&] {
      input_grad_by_forward<scalar_t>(g, cp.data_ptr<int32_t>(), ri.data_ptr<int32_t>(), pm.data_ptr<int32_t>(), nnz,
                                      v.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>());
    });
    return grad_x.permute({3, 0, 1, 2});
  }
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "csr_conv2d_input_grad", [&] {
    const ConvInputGradArgs<scalar_t> a{cp.data_ptr<int32_t>(), ri.data_ptr<int32_t>(), pm.data_ptr<int32_t>(),
                                        v.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                        g};
    const auto fn = pick_conv_input_grad_items<scalar_t>();
    const int64_t items = channels * g.in_h;
    at::parallel_for(0, items, item_grain(items), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  return grad_x.permute({3, 0, 1, 2});
}

at::Tensor csr_conv2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                                      const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding) {
  check_csr_conv2d_weight_grad_args(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding);
  const int64_t n = x.size(0), channels = x.size(1), out_channels = row_ptr.numel() - 1;
  const ConvGeometry g = geometry(channels, out_channels, n, x.size(2), x.size(3), kernel_size, stride, padding);
  const std::vector<ConvTap> taps = decode_taps(row_ptr, col_idx, channels, g.in_h, g.in_w, kernel_size);
  if (n == 0 || g.out_h * g.out_w == 0) return at::zeros({col_idx.numel()}, x.options());
  at::Tensor out = at::empty({col_idx.numel()}, x.options());
  const at::Tensor gb = channels_first_batch_last(grad_out), xb = channels_first_batch_last(x);
  const at::Tensor rp = row_ptr.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_conv2d_weight_grad", [&] {
    const ConvBlock block = weight_grad_block<scalar_t>(g);
    const ConvWeightGradArgs<scalar_t> a{rp.data_ptr<int32_t>(), taps.data(), gb.data_ptr<scalar_t>(),
                                         xb.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, block};
    const auto fn = pick_conv_weight_grad_items<scalar_t>();
    const int64_t blocks = (out_channels + block.rows - 1) / block.rows;
    at::parallel_for(0, blocks, item_grain(blocks), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) {
  m.impl("csr_conv2d_forward", &csr_conv2d_forward_cpu);
  m.impl("csr_conv2d_input_grad", &csr_conv2d_input_grad_cpu);
  m.impl("csr_conv2d_weight_grad", &csr_conv2d_weight_grad_cpu);
}

}  // namespace sparsemom
