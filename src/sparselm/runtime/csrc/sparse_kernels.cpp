// sparselm's CPU sparse kernels: CSR with 16-bit column indices and a bitmap (one bit per weight, the kept values
// packed per row), each with fp32, bf16 or int8 (per-row scale) values, multiplied by fp32 or bf16
// activations. Row-parallel (at::parallel_for); one SpMM for many tokens and one SpMV for a single token, both
// accumulating in fp32. Four code paths from one kernel text (sparse_body.inc): portable (the baseline ISA),
// AVX2+FMA, AVX-512F, and AVX-512 with bf16 dot products (VDPBF16PS), chosen at run time from the CPU's features
// unless forced.
//
// Ops (torch.ops.sparselm_kernels.*):
//   mm_out(rowptr int32[N+1], cols int16[nnz], values f32|bf16|i8[nnz], scales f32[N] (empty: none),
//          x f32|bf16[T,K] (token-major rows, or a transposed view of a feature-major [K,T]), out like x [N,T], path)
//   mm(same but out; x [..., K]) -> Tensor [..., N]: a view of a new [N,T] (contiguous when T is 1)
//   bitmap_mm_out / bitmap_mm(masks int32[N, ceil(K/32)], offsets int32[N+1], values f32|bf16|i8 (then 64 bytes
//          of padding), scales, x, ...): the same
//   best_path() -> int ; supports(path) -> bool
// The SpMM reads the activations feature-major: token-major ones are transposed here, in one pass into a scratch
// buffer (torch's transposing copy of a [T,1536] matrix took as long as the product) — widened to fp32, except bf16
// activations times bf16 values on the bf16 dot-product path, which stay bf16 and are multiplied in pairs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

enum Path : int64_t { AUTO = 0, PORTABLE = 1, AVX2 = 2, AVX512 = 3, AVX512BF16 = 4 };

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
#pragma GCC target("avx512f,fma,popcnt")
namespace avx512 {
#define W 16
#include "sparse_body.inc"
#undef W
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vbmi2,avx512bf16,fma,popcnt")
namespace avx512bf16 {  // the AVX-512F kernels, and bf16 values · bf16 activations with VDPBF16PS
#define W 16
#define SPARSELM_BF16_DOT 1
#include "sparse_body.inc"
#undef SPARSELM_BF16_DOT
#undef W
}  // namespace avx512bf16
#pragma GCC pop_options
#endif

namespace {

bool supports(int64_t path) {
  if (path == PORTABLE) return true;
#ifdef SPARSELM_X86
  __builtin_cpu_init();
  if (path == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (path == AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (path == AVX512BF16) {
    return supports(AVX512) && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("avx512bf16");
  }
#endif
  return false;
}

int64_t best_path() {
  for (int64_t path : {AVX512BF16, AVX512, AVX2}) {
    if (supports(path)) return path;
  }
  return PORTABLE;
}

int64_t resolve(int64_t path) {
  if (path == AUTO) return best_path();
  TORCH_CHECK(path >= PORTABLE && path <= AVX512BF16, "unknown kernel path ", path);
  TORCH_CHECK(supports(path), "kernel path ", path, " needs CPU features this CPU lacks");
  return path;
}

// Calls fn(ops) with the kernels of the chosen code path (each path's namespace has an `Ops`).
template <typename Fn>
void on_path(int64_t path, Fn&& fn) {
#ifdef SPARSELM_X86
  if (path == AVX512BF16) return fn(avx512bf16::Ops{});
  if (path == AVX512) return fn(avx512::Ops{});
  if (path == AVX2) return fn(avx2::Ops{});
#endif
  fn(portable::Ops{});
}

// Calls fn(v) with v a value of the C++ type of the stored values.
template <typename Fn>
void by_values(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(uint16_t{});
    case at::kChar: return fn(int8_t{});
    default: TORCH_CHECK(false, "values must be float32, bfloat16 or int8, got ", type);
  }
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
  on_path(path, [&](auto ops) {
    using Ops = decltype(ops);
    if (feature_major) {
      const uint16_t* xb = static_cast<const uint16_t*>(src);
      return at::parallel_for(0, K * T, 1 << 15, [&](int64_t b, int64_t e) { Ops::widen_bf16(xb, dst, b, e); });
    }
    at::parallel_for(0, (K + 7) / 8, std::max<int64_t>(1, (1 << 12) / T), [&](int64_t b, int64_t e) {
      if (bf16) return Ops::transpose(static_cast<const uint16_t*>(src), dst, T, K, T, b, e);
      Ops::transpose(static_cast<const float*>(src), dst, T, K, T, b, e);
    });
  });
  return dst;
}

// One token's K activations as `length` fp32 values (zeros past K): x's own memory when that is what it holds,
// else `scratch`.
const float* vector_fp32(const at::Tensor& x, int64_t length, std::unique_ptr<float[]>& scratch, int64_t path) {
  const int64_t K = x.numel();
  if (x.scalar_type() == at::kFloat && length == K) return x.data_ptr<float>();
  scratch.reset(new float[length]);
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(scratch.get(), x.data_ptr<float>(), K * sizeof(float));
  } else {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    on_path(path, [&](auto ops) { decltype(ops)::widen_bf16(xb, scratch.get(), 0, K); });
  }
  std::fill(scratch.get() + K, scratch.get() + length, 0.0f);
  return scratch.get();
}

// One token's bf16 activations as `length` values (zeros past K): x's own memory or `scratch`.
const uint16_t* vector_bf16(const at::Tensor& x, int64_t length, std::unique_ptr<uint16_t[]>& scratch) {
  const int64_t K = x.numel();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  if (length == K) return xb;
  scratch.reset(new uint16_t[length]);
  std::memcpy(scratch.get(), xb, K * sizeof(uint16_t));
  std::fill(scratch.get() + K, scratch.get() + length, uint16_t{0});
  return scratch.get();
}

// bf16 activations x [T, K] (token-major, or a view of feature-major [K, T]) as feature-major bf16 [K + 1, Tp] for
// the bf16 dot-product SpMM: tokens T..Tp and row K are zeros.
template <typename Ops>
std::unique_ptr<uint16_t[]> feature_major_bf16(const at::Tensor& x, int64_t Tp) {
  const int64_t T = x.size(0), K = x.size(1);
  const bool feature_major = x.stride(0) == 1 && x.stride(1) == T;
  std::unique_ptr<uint16_t[]> xt(new uint16_t[(K + 1) * Tp]);  // uninitialised: every element is written below
  uint16_t* dst = xt.get();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, (K + 7) / 8, std::max<int64_t>(1, (1 << 12) / T), [&](int64_t b, int64_t e) {
    const int64_t k_end = std::min(K, 8 * e);
    if (feature_major) {
      for (int64_t k = 8 * b; k < k_end; ++k) std::memcpy(dst + k * Tp, src + k * T, T * sizeof(uint16_t));
    } else {
      Ops::transpose(src, dst, T, K, Tp, b, e);
    }
    for (int64_t k = 8 * b; k < k_end; ++k) std::fill(dst + k * Tp + T, dst + (k + 1) * Tp, uint16_t{0});
  });
  std::fill(dst + K * Tp, dst + (K + 1) * Tp, uint16_t{0});
  return xt;
}

// The shape of one sparse weight, checked against its activations and output.
struct Shape {
  int64_t rows;
  int64_t nnz;
  int64_t padded_k;  // how many activations the one-token kernel may read (K, or K rounded up to whole blocks)
};

// out [N, T] = W · xᵀ for activations x_in [T, K] (token-major, or a transposed view of feature-major [K, T]).
// rows_of(ops, v) makes W's row visitor of the path's `ops` for stored values of v's type.
template <typename RowsOf>
void product(const at::Tensor& x_in, const at::Tensor& out, at::ScalarType value_type, const Shape& w,
             int64_t path, RowsOf&& rows_of) {
  TORCH_CHECK(x_in.dim() == 2, "x: [T, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16");
  const int64_t T = x_in.size(0), K = x_in.size(1);
  const bool feature_major = x_in.stride(0) == 1 && x_in.stride(1) == T;
  const bool token_major = x_in.stride(1) == 1 && x_in.stride(0) == K;
  const at::Tensor x = feature_major || token_major ? x_in : x_in.contiguous();
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == w.rows && out.size(1) == T, "out: [N, T]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x must share a dtype");
  path = resolve(path);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t per_row = (w.nnz * T) / std::max<int64_t>(w.rows, 1) + 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / per_row);
  if (bf16 && T > 1 && value_type == at::kBFloat16 && path == AVX512BF16) {  // bf16 · bf16 in pairs (VDPBF16PS)
    on_path(path, [&](auto ops) {
      using Ops = decltype(ops);
      if constexpr (Ops::bf16_dot) {
        const int64_t Tp = (T + 31) / 32 * 32;
        const auto xt = feature_major_bf16<Ops>(x, Tp);
        const auto rows = rows_of(ops, uint16_t{});
        uint16_t* y = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
        at::parallel_for(0, w.rows, grain, [&](int64_t begin, int64_t end) {
          Ops::spmm_bf16(rows, xt.get(), Tp, K, y, T, begin, end);
        });
      }
    });
    return;
  }
  std::unique_ptr<float[]> scratch;
  std::unique_ptr<uint16_t[]> scratch_bf16;
  const float* xf = T == 1 ? vector_fp32(x, w.padded_k, scratch, path) : feature_major_fp32(x, scratch, path);
  const uint16_t* xb = T == 1 && bf16 && path == AVX512BF16 ? vector_bf16(x, w.padded_k, scratch_bf16) : nullptr;
  by_values(value_type, [&](auto v) {
    on_path(path, [&](auto ops) {
      using Ops = decltype(ops);
      const auto rows = rows_of(ops, v);
      at::parallel_for(0, w.rows, grain, [&](int64_t begin, int64_t end) {
        if (bf16) {
          uint16_t* y = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
          return T == 1 ? Ops::spmv(rows, xf, xb, y, begin, end) : Ops::spmm(rows, xf, y, T, begin, end);
        }
        float* y = out.data_ptr<float>();
        T == 1 ? Ops::spmv(rows, xf, xb, y, begin, end) : Ops::spmm(rows, xf, y, T, begin, end);
      });
    });
  });
}

// The per-row scales of int8 values (null when `scales` is empty), checked.
const float* row_scales(const at::Tensor& scales, const at::Tensor& values, int64_t rows) {
  const bool has_scales = scales.numel() > 0;
  TORCH_CHECK(!has_scales || (scales.scalar_type() == at::kFloat && scales.numel() == rows && scales.is_contiguous()),
              "scales: float32 [N] or empty");
  TORCH_CHECK(values.scalar_type() != at::kChar || has_scales, "int8 values need per-row scales");
  return has_scales ? scales.data_ptr<float>() : nullptr;
}

void mm_out(const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& scales,
            const at::Tensor& x, const at::Tensor& out, int64_t path) {
  TORCH_CHECK(x.dim() == 2, "x: [T, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.dim() == 1 && rowptr.is_contiguous(), "rowptr: int32 [N+1]");
  TORCH_CHECK(cols.scalar_type() == at::kShort && cols.is_contiguous(), "cols: contiguous int16");
  TORCH_CHECK(values.is_contiguous() && values.numel() == cols.numel(), "values: contiguous, one per column index");
  TORCH_CHECK(K <= 65536, "16-bit column indices address at most 65536 input features");
  const int64_t rows = rowptr.numel() - 1;
  const float* sp = row_scales(scales, values, rows);
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  TORCH_CHECK(rows >= 0 && rp[0] == 0 && rp[rows] == values.numel(), "rowptr must run from 0 to nnz");
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const void* vp = values.data_ptr();
  product(x, out, values.scalar_type(), {rows, values.numel(), K}, path, [&](auto ops, auto v) {
    using V = decltype(v);
    return typename decltype(ops)::template Csr<V>{rp, cp, static_cast<const V*>(vp), sp};
  });
}

void bitmap_mm_out(const at::Tensor& masks, const at::Tensor& offsets, const at::Tensor& values,
                   const at::Tensor& scales, const at::Tensor& x, const at::Tensor& out, int64_t path) {
  TORCH_CHECK(x.dim() == 2, "x: [T, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(masks.scalar_type() == at::kInt && masks.dim() == 2 && masks.is_contiguous(), "masks: int32 [N, B]");
  const int64_t rows = masks.size(0), blocks = masks.size(1);
  TORCH_CHECK(blocks == (K + 31) / 32, "masks: one 32-bit word per 32 input features");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.numel() == rows + 1 &&
              offsets.is_contiguous(), "offsets: int32 [N+1]");
  const auto type = values.scalar_type();
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1 &&
              (type == at::kFloat || type == at::kBFloat16 || type == at::kChar),
              "values: contiguous float32, bfloat16 or int8 [nnz + padding]");
  const float* sp = row_scales(scales, values, rows);
  const int32_t* op = offsets.data_ptr<int32_t>();
  TORCH_CHECK(op[0] == 0 && (values.numel() - op[rows]) * values.element_size() >= 64,
              "values: every row's values, then 64 bytes of padding");
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const void* vp = values.data_ptr();
  product(x, out, values.scalar_type(), {rows, op[rows], 32 * blocks}, path, [&](auto ops, auto v) {
    using V = decltype(v);
    return typename decltype(ops)::template Bitmap<V>{mp, blocks, op, static_cast<const V*>(vp), sp};
  });
}

// A new [N, T] output for x [..., K], the product written by `fill`, returned as [..., N] (a view).
template <typename Fill>
at::Tensor functional(int64_t rows, const at::Tensor& x, Fill&& fill) {
  TORCH_CHECK(x.dim() >= 1, "x: [..., K]");
  const at::Tensor x2d = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});  // a view for either layout
  at::Tensor out = at::empty({rows, x2d.size(0)}, x.options());
  fill(x2d, out);
  if (x.dim() == 2) return out.t();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return out.t().view(shape);
}

at::Tensor mm(const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& scales,
              const at::Tensor& x, int64_t path) {
  return functional(rowptr.numel() - 1, x, [&](const at::Tensor& x2d, const at::Tensor& out) {
    mm_out(rowptr, cols, values, scales, x2d, out, path);
  });
}

at::Tensor bitmap_mm(const at::Tensor& masks, const at::Tensor& offsets, const at::Tensor& values,
                     const at::Tensor& scales, const at::Tensor& x, int64_t path) {
  return functional(masks.size(0), x, [&](const at::Tensor& x2d, const at::Tensor& out) {
    bitmap_mm_out(masks, offsets, values, scales, x2d, out, path);
  });
}

}  // namespace

TORCH_LIBRARY(sparselm_kernels, m) {
  m.def("mm_out(Tensor rowptr, Tensor cols, Tensor values, Tensor scales, Tensor x, Tensor(a!) out, int path) -> ()",
        &mm_out);
  m.def("mm(Tensor rowptr, Tensor cols, Tensor values, Tensor scales, Tensor x, int path) -> Tensor", &mm);
  m.def("bitmap_mm_out(Tensor masks, Tensor offsets, Tensor values, Tensor scales, Tensor x, Tensor(a!) out, "
        "int path) -> ()", &bitmap_mm_out);
  m.def("bitmap_mm(Tensor masks, Tensor offsets, Tensor values, Tensor scales, Tensor x, int path) -> Tensor",
        &bitmap_mm);
  m.def("best_path() -> int", &best_path);
  m.def("supports(int path) -> bool", [](int64_t path) { return supports(path); });
}
