// sparselm's CPU sparse kernels: CSR with 16-bit column indices and fp32, bf16 or int8 (per-row scale) values,
// multiplied by fp32 or bf16 activations. Row-parallel (at::parallel_for); one SpMM for many tokens and one SpMV for
// a single token, both computing in fp32. Three code paths from one kernel text (sparse_body.inc): portable (the
// baseline ISA), AVX2+FMA and AVX-512F, chosen at run time from the CPU's features unless forced.
//
// Ops (torch.ops.sparselm_kernels.*):
//   mm_out(rowptr int32[N+1], cols int16[nnz], values f32|bf16|i8[nnz], scales f32[N] (empty: none),
//          x f32|bf16[T,K] (token-major rows, or a transposed view of a feature-major [K,T]), out like x [N,T], path)
//   mm(same but out; x [..., K]) -> Tensor [..., N]: a view of a new [N,T] (contiguous when T is 1)
//   best_path() -> int ; supports(path) -> bool
// The SpMM reads the activations feature-major in fp32: token-major or bf16 ones are transposed and widened here,
// in one pass into a scratch buffer (torch's transposing copy of a [T,1536] matrix took as long as the product).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

enum Path : int64_t { AUTO = 0, PORTABLE = 1, AVX2 = 2, AVX512 = 3 };

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float scalar_of(float v) { return v; }
inline float scalar_of(uint16_t v) { return bf16_to_f32(v); }
inline float scalar_of(int8_t v) { return float(v); }

template <typename X> X out_of(float a);
template <> inline float out_of<float>(float a) { return a; }
template <> inline uint16_t out_of<uint16_t>(float a) { return f32_to_bf16(a); }

}  // namespace

namespace portable {
#define W 4
#include "sparse_body.inc"
#undef W
}  // namespace portable

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSELM_X86 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define W 8
#include "sparse_body.inc"
#undef W
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
#define W 16
#include "sparse_body.inc"
#undef W
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

bool supports(int64_t path) {
  if (path == PORTABLE) return true;
#ifdef SPARSELM_X86
  __builtin_cpu_init();
  if (path == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
  return false;
}

int64_t best_path() {
  for (int64_t path : {AVX512, AVX2}) {
    if (supports(path)) return path;
  }
  return PORTABLE;
}

int64_t resolve(int64_t path) {
  if (path == AUTO) return best_path();
  TORCH_CHECK(path >= PORTABLE && path <= AVX512, "unknown kernel path ", path);
  TORCH_CHECK(supports(path), "kernel path ", path, " needs CPU features this CPU lacks");
  return path;
}

struct Csr {
  const int32_t* rowptr;
  const uint16_t* cols;
  const void* values;
  const float* scales;
  int64_t rows;
  int64_t nnz;
};

Csr check_csr(const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& scales,
              int64_t in_features) {
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.dim() == 1 && rowptr.is_contiguous(), "rowptr: int32 [N+1]");
  TORCH_CHECK(cols.scalar_type() == at::kShort && cols.is_contiguous(), "cols: contiguous int16");
  TORCH_CHECK(values.is_contiguous() && values.numel() == cols.numel(), "values: contiguous, one per column index");
  TORCH_CHECK(in_features <= 65536, "16-bit column indices address at most 65536 input features");
  const int64_t rows = rowptr.numel() - 1;
  const bool has_scales = scales.numel() > 0;
  TORCH_CHECK(!has_scales || (scales.scalar_type() == at::kFloat && scales.numel() == rows && scales.is_contiguous()),
              "scales: float32 [N] or empty");
  TORCH_CHECK(values.scalar_type() != at::kChar || has_scales, "int8 values need per-row scales");
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  TORCH_CHECK(rows >= 0 && rp[0] == 0 && rp[rows] == values.numel(), "rowptr must run from 0 to nnz");
  return {rp, reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>()), values.data_ptr(),
          has_scales ? scales.data_ptr<float>() : nullptr, rows, values.numel()};
}

template <typename V, typename Y>
void spmm_typed(const Csr& w, const float* xt, Y* yt, int64_t T, int64_t path) {
  const V* vals = static_cast<const V*>(w.values);
  const int64_t per_row = w.rows ? (w.nnz * T) / w.rows + 1 : 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / per_row);
  at::parallel_for(0, w.rows, grain, [&](int64_t begin, int64_t end) {
#ifdef SPARSELM_X86
    if (path == AVX512) return avx512::spmm_rows<V, Y>(w.rowptr, w.cols, vals, w.scales, xt, yt, T, begin, end);
    if (path == AVX2) return avx2::spmm_rows<V, Y>(w.rowptr, w.cols, vals, w.scales, xt, yt, T, begin, end);
#endif
    portable::spmm_rows<V, Y>(w.rowptr, w.cols, vals, w.scales, xt, yt, T, begin, end);
  });
}

template <typename X>
void transpose_with(const X* x, float* xt, int64_t T, int64_t K, int64_t begin, int64_t end, int64_t path) {
#ifdef SPARSELM_X86
  if (path == AVX512) return avx512::transpose_blocks(x, xt, T, K, begin, end);
  if (path == AVX2) return avx2::transpose_blocks(x, xt, T, K, begin, end);
#endif
  portable::transpose_blocks(x, xt, T, K, begin, end);
}

// The activations x [T, K] as fp32 feature-major [K, T]: x's own memory when it is that already, else `scratch`
// filled by widening (bf16 feature-major) or transposing (token-major rows, either dtype).
const float* feature_major_fp32(const at::Tensor& x, std::unique_ptr<float[]>& scratch, int64_t path) {
  const int64_t T = x.size(0), K = x.size(1);
  const bool feature_major = x.stride(0) == 1 && x.stride(1) == T;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (feature_major && !bf16) return x.data_ptr<float>();
  scratch.reset(new float[K * T]);  // uninitialised: every element is written below
  float* dst = scratch.get();
  const void* src = x.data_ptr();
  if (feature_major) {
    const uint16_t* xb = static_cast<const uint16_t*>(src);
    at::parallel_for(0, K * T, 1 << 15, [&](int64_t begin, int64_t end) {
#ifdef SPARSELM_X86
      if (path == AVX512) return avx512::widen(xb, dst, begin, end);
      if (path == AVX2) return avx2::widen(xb, dst, begin, end);
#endif
      portable::widen(xb, dst, begin, end);
    });
    return dst;
  }
  const int64_t blocks = (K + 7) / 8;
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 12) / T), [&](int64_t begin, int64_t end) {
    if (bf16) return transpose_with<uint16_t>(static_cast<const uint16_t*>(src), dst, T, K, begin, end, path);
    transpose_with<float>(static_cast<const float*>(src), dst, T, K, begin, end, path);
  });
  return dst;
}

// x [1, K] as K contiguous fp32 values: x's own memory, or `scratch` with the bf16 values widened.
const float* vector_fp32(const at::Tensor& x, std::unique_ptr<float[]>& scratch) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  scratch.reset(new float[x.numel()]);
  for (int64_t i = 0; i < x.numel(); ++i) scratch[i] = bf16_to_f32(xb[i]);
  return scratch.get();
}

template <typename V, typename X>
void spmv_typed(const Csr& w, const float* x, X* y, int64_t path) {
  const V* vals = static_cast<const V*>(w.values);
  const int64_t grain = std::max<int64_t>(1, 16384 / (w.rows ? w.nnz / w.rows + 1 : 1));
  at::parallel_for(0, w.rows, grain, [&](int64_t begin, int64_t end) {
#ifdef SPARSELM_X86
    if (path == AVX512) return avx512::spmv_rows<V, X>(w.rowptr, w.cols, vals, w.scales, x, y, begin, end);
    if (path == AVX2) return avx2::spmv_rows<V, X>(w.rowptr, w.cols, vals, w.scales, x, y, begin, end);
#endif
    portable::spmv_rows<V, X>(w.rowptr, w.cols, vals, w.scales, x, y, begin, end);
  });
}

// Calls fn.template operator()<V>() with V the C++ type of the stored values.
template <typename Fn>
void by_values(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(uint16_t{});
    case at::kChar: return fn(int8_t{});
    default: TORCH_CHECK(false, "values must be float32, bfloat16 or int8, got ", type);
  }
}

void mm_out(const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& scales,
            const at::Tensor& x_in, const at::Tensor& out, int64_t path) {
  TORCH_CHECK(x_in.dim() == 2, "x: [T, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16");
  const int64_t T = x_in.size(0), K = x_in.size(1);
  const bool known_layout = (x_in.stride(0) == 1 && x_in.stride(1) == T) || (x_in.stride(1) == 1 && x_in.stride(0) == K);
  const at::Tensor x = known_layout || T == 1 ? x_in : x_in.contiguous();
  const Csr w = check_csr(rowptr, cols, values, scales, K);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == w.rows && out.size(1) == T, "out: [N, T]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x must share a dtype");
  path = resolve(path);
  std::unique_ptr<float[]> scratch;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (T == 1) {
    const at::Tensor row = x.stride(1) == 1 ? x : x.contiguous();
    const float* xf = vector_fp32(row, scratch);
    return by_values(values.scalar_type(), [&](auto v) {
      using V = decltype(v);
      if (bf16) return spmv_typed<V, uint16_t>(w, xf, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), path);
      spmv_typed<V, float>(w, xf, out.data_ptr<float>(), path);
    });
  }
  const float* xf = feature_major_fp32(x, scratch, path);
  by_values(values.scalar_type(), [&](auto v) {
    using V = decltype(v);
    if (bf16) return spmm_typed<V, uint16_t>(w, xf, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), T, path);
    spmm_typed<V, float>(w, xf, out.data_ptr<float>(), T, path);
  });
}

at::Tensor mm(const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& scales,
              const at::Tensor& x, int64_t path) {
  TORCH_CHECK(x.dim() >= 1, "x: [..., K]");
  const at::Tensor x2d = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});  // a view for either layout
  at::Tensor out = at::empty({rowptr.numel() - 1, x2d.size(0)}, x.options());
  mm_out(rowptr, cols, values, scales, x2d, out, path);
  if (x.dim() == 2) return out.t();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(0);
  return out.t().view(shape);
}

}  // namespace

TORCH_LIBRARY(sparselm_kernels, m) {
  m.def("mm_out(Tensor rowptr, Tensor cols, Tensor values, Tensor scales, Tensor x, Tensor(a!) out, int path) -> ()",
        &mm_out);
  m.def("mm(Tensor rowptr, Tensor cols, Tensor values, Tensor scales, Tensor x, int path) -> Tensor", &mm);
  m.def("best_path() -> int", &best_path);
  m.def("supports(int path) -> bool", [](int64_t path) { return supports(path); });
}
