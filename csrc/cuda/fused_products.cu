// Fused weighted products on CUDA, the statistics' backward for few positions (opt-in,
// GRADVAR_EXT_FUSED_BACKWARD_CUDA=1: passes its tests on an H100, 2.5-2.9x slower there than
// chunked bmm). Per sample n:
//   h_n[r, k]   = W[r, k] * sum_t A[n, t, r] B[n, t, k] - C[r, k]      (C optional)
//   out[n, t, k] = sum_r Z[n, t, r] h_n[r, k]
// A, Z: [N, T, R]; B, out: [N, T, K]; W, C: [R, K]; any strides, T <= kMaxT. With A = grad_output,
// B = input this is weighted_gradient_product's G_n (W * g_n - C); with the roles of A and B
// swapped and W, C transposed, the product towards grad_output. h_n lives in shared memory one
// [kTileR, kTileK] tile at a time: no per-sample gradient in global memory, no atomics (a block
// owns sample n's [T, kTileK] output tile and walks all of R), deterministic.
// Work: 2 T R K per sample (h and the product); memory: the output only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../outer_product_stats.h"

namespace gradvar {
namespace {

constexpr int kMaxT = 32, kTileR = 32, kTileK = 64, kThreads = 256;
constexpr int kOutPerThread = kMaxT * kTileK / kThreads;  // 8
constexpr int kHPerThread = kTileR * kTileK / kThreads;   // 8

struct Strided3 {  // a [N, T, F] tensor with element strides
  const void* data;
  int64_t s_n, s_t, s_f;
};

template <typename scalar_t>
__device__ scalar_t load(const Strided3& x, int64_t n, int64_t t, int64_t f) {
  return static_cast<const scalar_t*>(x.data)[n * x.s_n + t * x.s_t + f * x.s_f];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_weighted_product_kernel(Strided3 Z, Strided3 A, Strided3 B, const scalar_t* __restrict__ W, int64_t w_r,
                                  int64_t w_k, const scalar_t* __restrict__ C, int64_t c_r, int64_t c_k,
                                  scalar_t* __restrict__ out, int64_t o_n, int64_t o_t, int64_t o_k, int64_t T,
                                  int64_t R, int64_t K) {
  __shared__ scalar_t b_tile[kMaxT][kTileK];      // B[n, :, k0 + k]
  __shared__ scalar_t a_tile[kMaxT][kTileR];      // A[n, :, r0 + r]
  __shared__ scalar_t z_tile[kMaxT][kTileR];      // Z[n, :, r0 + r]
  __shared__ scalar_t h_tile[kTileR][kTileK];      // h_n[r0 + r, k0 + k] (48 KiB in all for double)
  const int64_t n = blockIdx.y, k0 = int64_t(blockIdx.x) * kTileK;
  for (int e = threadIdx.x; e < kMaxT * kTileK; e += kThreads) {
    const int t = e / kTileK, k = e % kTileK;
    b_tile[t][k] = (t < T && k0 + k < K) ? load<scalar_t>(B, n, t, k0 + k) : scalar_t(0);
  }
  scalar_t acc[kOutPerThread] = {};
  for (int64_t r0 = 0; r0 < R; r0 += kTileR) {
    __syncthreads();  // the previous tile's h and Z are read
    for (int e = threadIdx.x; e < kMaxT * kTileR; e += kThreads) {
      const int t = e / kTileR, r = e % kTileR;
      const bool valid = t < T && r0 + r < R;
      a_tile[t][r] = valid ? load<scalar_t>(A, n, t, r0 + r) : scalar_t(0);
      z_tile[t][r] = valid ? load<scalar_t>(Z, n, t, r0 + r) : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kHPerThread; ++j) {  // a warp shares r: a_tile reads broadcast
      const int e = threadIdx.x + j * kThreads, r = e / kTileK, k = e % kTileK;
      scalar_t h = 0;
      for (int t = 0; t < T; ++t) h += a_tile[t][r] * b_tile[t][k];
      if (r0 + r < R && k0 + k < K) {
        h = W[(r0 + r) * w_r + (k0 + k) * w_k] * h - (C != nullptr ? C[(r0 + r) * c_r + (k0 + k) * c_k] : scalar_t(0));
      } else {
        h = 0;
      }
      h_tile[r][k] = h;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j) {  // a warp shares t: z_tile reads broadcast
      const int e = threadIdx.x + j * kThreads, t = e / kTileK, k = e % kTileK;
      scalar_t sum = 0;
#pragma unroll 8
      for (int r = 0; r < kTileR; ++r) sum += z_tile[t][r] * h_tile[r][k];
      acc[j] += sum;
    }
  }
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) {
    const int e = threadIdx.x + j * kThreads, t = e / kTileK, k = e % kTileK;
    if (t < T && k0 + k < K) out[n * o_n + t * o_t + (k0 + k) * o_k] = acc[j];
  }
}

Strided3 strided(const at::Tensor& t) { return Strided3{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

int64_t fused_products_max_positions() { return kMaxT; }

void fused_weighted_product_cuda(at::Tensor& out, const at::Tensor& Z, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& W, const at::Tensor& C) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t N = B.size(0), T = B.size(1), K = B.size(2), R = A.size(2);
  TORCH_CHECK(T <= kMaxT, "gradvar: the fused CUDA products take at most ", kMaxT, " positions, got ", T);
  TORCH_CHECK(N <= 65535, "gradvar: the fused CUDA products take at most 65535 samples per call, got ", N);
  if (N == 0 || T == 0 || K == 0) {
    out.zero_();
    return;
  }
  const dim3 grid(static_cast<unsigned>((K + kTileK - 1) / kTileK), static_cast<unsigned>(N));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "fused_weighted_product_cuda", [&] {
    fused_weighted_product_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        strided(Z), strided(A), strided(B), W.const_data_ptr<scalar_t>(), W.stride(0), W.stride(1),
        C.defined() ? C.const_data_ptr<scalar_t>() : nullptr, C.defined() ? C.stride(0) : 0,
        C.defined() ? C.stride(1) : 0, out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2),
        T, R, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradvar
