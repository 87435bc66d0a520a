// Shared declarations and argument checks of the heatmap -> coordinates op (see heatmap_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace faceptor {

// Coordinates and stats are fp32 for fp32/fp16/bf16 logits and fp64 for fp64 logits.
inline at::ScalarType coords_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_logits(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "faceptor::heatmap_to_coords: logits must be [B, K, H, W], got ", x.dim(), " dims");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "faceptor::heatmap_to_coords: logits must be float32/float64/float16/bfloat16, got ", t);
  TORCH_CHECK(x.numel() > 0, "faceptor::heatmap_to_coords: logits must be non-empty, got shape ", x.sizes());
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
  const auto acc = coords_dtype(x.scalar_type());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == 2,
              "faceptor::heatmap_to_coords_bwd: grad must be [B, K, 2], got ", grad.sizes());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == x.size(0) && stats.size(1) == x.size(1) && stats.size(2) == 3,
              "faceptor::heatmap_to_coords_bwd: stats must be [B, K, 3], got ", stats.sizes());
  TORCH_CHECK(grad.scalar_type() == acc && stats.scalar_type() == acc,
              "faceptor::heatmap_to_coords_bwd: grad and stats must be ", acc);
  TORCH_CHECK(grad.device() == x.device() && stats.device() == x.device(),
              "faceptor::heatmap_to_coords_bwd: all tensors must be on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> heatmap_fwd_cpu(const at::Tensor& logits);
at::Tensor heatmap_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats);

}  // namespace faceptor
