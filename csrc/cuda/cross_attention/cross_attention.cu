// CUDA cross-attention: checks the tensors, fills attention::Params and launches the
// tensor-core kernels of csrc/cuda/attention on the current stream.
//
// Supported here: float16 and bfloat16, head dims 64 and 128, every row 16-byte aligned (the
// kernels move data with 16-byte cp.async). The Python dispatch (mmkernels/backends/native.py)
// says so before it gets here; these checks guard direct calls of the native op.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <limits>

#include "../../common.h"
#include "../../limits.h"
#include "../../philox.h"
#include "params.h"

namespace mmkernels {
namespace {

using attention::Operand;
using attention::Params;

// The head dims run() instantiates; mmkernels/limits.py tells Python the same.
static_assert(std::size(limits::kCudaAttentionHeadDims) == 2 && limits::kCudaAttentionHeadDims[0] == 64 &&
                  limits::kCudaAttentionHeadDims[1] == 128,
              "CUDA_ATTENTION_HEAD_DIMS in mmkernels/limits.py must match the head dims run() instantiates");

void check_supported(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the cuda cross_attention kernel takes float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "the cuda cross_attention kernel takes head dims 64 and 128, got ",
              q.size(3));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, "the cuda cross_attention kernel takes at most 65535 batches and heads, got B=",
              q.size(0), ", H=", q.size(1));
}

bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

Operand operand(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type(), name, " must be ", q.scalar_type(),
              " on ", q.device(), " like q, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(3) == q.size(3), name, " must be (B, H, L, D=", q.size(3), "), got ", t.sizes());
  check_last_dim_contiguous(t, name);
  TORCH_CHECK(rows_aligned(t), name, " must have a 16-byte aligned start and batch/head/row strides that are multiples of 8 ",
              "elements for the cuda backend, got strides ", t.strides());
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Fills everything but the outputs. The int64 copies of the lengths and ranges must outlive the
// launch; so must the seed.
Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_len,
                   const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& q_len, const at::Tensor& start,
                   const at::Tensor& end, bool causal, double dropout_p, const c10::optional<at::Tensor>& seed,
                   double scale) {
  Params p;
  p.q = operand(q, q, "q");
  p.k = operand(k, q, "k");
  p.v = operand(v, q, "v");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "k and v must be (B, Hkv, Lk, D) with Hq % Hkv == 0, got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int>::max() && k.size(2) <= std::numeric_limits<int>::max(),
              "sequence lengths must fit in int32, got Lq=", q.size(2), ", Lk=", k.size(2));
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.kv_lengths = kv_len.defined() ? kv_len.data_ptr<int64_t>() : nullptr;
  p.q_lengths = q_len.defined() ? q_len.data_ptr<int64_t>() : nullptr;
  p.kv_start = start.defined() ? start.data_ptr<int64_t>() : nullptr;
  p.kv_end = end.defined() ? end.data_ptr<int64_t>() : nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    p.mask = m.data_ptr<bool>();
    p.mask_sb = m.stride(0);
    p.mask_sk = m.stride(1);
  }
  if (dropout_p > 0) {
    TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device() == q.device(),
                "seed must be an int64 tensor with one element on q's device when dropout_p > 0");
    p.seed = seed->data_ptr<int64_t>();
    p.dropout_threshold = dropout_threshold(dropout_p);
    p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return p;
}

// Everything the kernels index, checked: a malformed direct call of the native op raises.
void check_visibility(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& kv_lengths,
                      const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
                      const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& kv_end) {
  TORCH_CHECK(k.dim() == 4, "k must be 4-D (B, H, L, D), got shape ", k.sizes());
  const int64_t B = q.size(0), Lq = q.size(2);
  check_index(kv_lengths, "kv_lengths", q, {B});
  check_index(q_lengths, "q_lengths", q, {B});
  check_index(kv_start, "kv_start", q, {B, Lq});
  check_index(kv_end, "kv_end", q, {B, Lq});
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B &&
                    m.size(1) == k.size(2),
                "key_padding_mask must be bool (B, Lk) on q's device, got ", m.scalar_type(), " ", m.sizes(), " on ",
                m.device());
  }
}

int choose_kv_splits(const Params& p) {
  const int64_t q_blocks = int64_t(p.B) * p.Hq * ((p.Lq + attention::kForwardBlockM - 1) / attention::kForwardBlockM);
  return attention::kv_splits_for(q_blocks, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, p.Lk);
}

int choose_dkdv_splits(const Params& p, int head_dim) {
  const limits::CudaAttentionTile tile = limits::cuda_attention_tile(limits::kCudaDkDv, head_dim);
  const int64_t key_ctas = int64_t(p.B) * p.Hkv * ((p.Lk + tile.block_n - 1) / tile.block_n);
  const int64_t steps = int64_t(p.Hq / p.Hkv) * ((p.Lq + tile.block_m - 1) / tile.block_m);
  return attention::dkdv_splits_for(key_ctas, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, steps);
}

// The GPU must run this binary's kernels: sm_80 or newer (mma.sync with bf16), and every kernel's
// shared memory within what one block may use there (sm_86 and sm_89 allow less than sm_80).
void check_device(const at::Tensor& q, bool backward) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "the cuda cross_attention kernels need sm_80 or newer, got sm_", props->major,
              props->minor, " (", props->name, ")");
  int needed = 0;
  for (const auto kernel : backward ? std::initializer_list<limits::CudaAttentionKernel>{limits::kCudaDkDv, limits::kCudaDq}
                                    : std::initializer_list<limits::CudaAttentionKernel>{limits::kCudaForward}) {
    needed = std::max(needed, limits::cuda_attention_tile(kernel, static_cast<int>(q.size(3))).shared_bytes);
  }
  TORCH_CHECK(static_cast<size_t>(needed) <= props->sharedMemPerBlockOptin, "the cuda cross_attention kernels at head dim ",
              q.size(3), " need ", needed, " bytes of shared memory per block; ", props->name, " allows ",
              props->sharedMemPerBlockOptin);
}

template <int D>
void run_head_dim(bool backward, at::ScalarType dtype, const Params& p, cudaStream_t stream) {
  if (dtype == at::kHalf) {
    backward ? attention::run_backward<__half, D>(p, stream) : attention::run_forward<__half, D>(p, stream);
  } else {
    backward ? attention::run_backward<__nv_bfloat16, D>(p, stream)
             : attention::run_forward<__nv_bfloat16, D>(p, stream);
  }
}

void run(bool backward, const at::Tensor& q, const Params& p) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.size(3) == 64) {
    run_head_dim<64>(backward, q.scalar_type(), p, stream);
  } else {
    run_head_dim<128>(backward, q.scalar_type(), p, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& kv_lengths,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& kv_end, bool causal, double dropout_p,
    const c10::optional<at::Tensor>& seed, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (B, H, L, D), got shape ", q.sizes());
  check_supported(q);
  check_visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end);
  const c10::cuda::CUDAGuard guard(q.device());
  check_device(q, false);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.numel() == 0) {  // nothing to attend to: 0 and +inf
    return {out.zero_(), lse.fill_(std::numeric_limits<float>::infinity())};
  }
  const at::Tensor kv_len = index_as_int64(kv_lengths), q_len = index_as_int64(q_lengths);
  const at::Tensor start = index_as_int64(kv_start), end = index_as_int64(kv_end);
  Params p = make_params(q, k, v, kv_len, key_padding_mask, q_len, start, end, causal, dropout_p, seed, scale);
  p.out = operand(out, q, "out");
  p.lse = lse.data_ptr<float>();
  p.kv_splits = choose_kv_splits(p);
  at::Tensor partial_out, partial_lse;  // the splits' results, merged by the combine kernel
  if (p.kv_splits > 1) {
    partial_out = at::empty({p.kv_splits, p.B, p.Hq, p.Lq, q.size(3)}, lse.options());
    partial_lse = at::empty({p.kv_splits, p.B, p.Hq, p.Lq}, lse.options());
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  run(false, q, p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& kv_lengths,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& kv_end, bool causal, double dropout_p,
    const c10::optional<at::Tensor>& seed, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (B, H, L, D), got shape ", q.sizes());
  check_supported(q);
  check_visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end);
  const c10::cuda::CUDAGuard guard(q.device());
  check_device(q, true);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};

  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == q.sizes().slice(0, 3),
              "lse must be the contiguous float32 (B, Hq, Lq) log-sum-exp of the forward on q's device, got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  // Autograd hands over the gradient in whatever layout it made; copying a misaligned one is
  // cheaper than refusing it, and the gradients of q, k and v stay in their inputs' layouts.
  const at::Tensor dout = grad_out.stride(3) == 1 && rows_aligned(grad_out)
                              ? grad_out
                              : at::empty_like(grad_out, at::MemoryFormat::Contiguous).copy_(grad_out);
  const at::Tensor kv_len = index_as_int64(kv_lengths), q_len = index_as_int64(q_lengths);
  const at::Tensor start = index_as_int64(kv_start), end = index_as_int64(kv_end);
  at::Tensor delta = at::empty_like(lse);
  Params p = make_params(q, k, v, kv_len, key_padding_mask, q_len, start, end, causal, dropout_p, seed, scale);
  p.out = operand(out, q, "out");
  p.dout = operand(dout, q, "grad_out");
  p.dq = operand(grad_q, q, "grad_q");
  p.dk = operand(grad_k, q, "grad_k");
  p.dv = operand(grad_v, q, "grad_v");
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // read only in the backward
  p.delta = delta.data_ptr<float>();
  p.dkdv_splits = choose_dkdv_splits(p, static_cast<int>(q.size(3)));
  at::Tensor partial_dk, partial_dv;  // the splits' shares of dK and dV, summed by the reduce kernel
  if (p.dkdv_splits > 1) {
    partial_dk = at::empty({p.dkdv_splits, p.B, p.Hkv, p.Lk, q.size(3)}, lse.options());
    partial_dv = at::empty_like(partial_dk);
    p.partial_dk = partial_dk.data_ptr<float>();
    p.partial_dv = partial_dv.data_ptr<float>();
  }
  run(true, q, p);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("native_cross_attention", &cross_attention_cuda);
  m.impl("native_cross_attention_backward", &cross_attention_backward_cuda);
}

}  // namespace mmkernels
