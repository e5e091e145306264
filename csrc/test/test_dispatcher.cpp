// Calls mmkernels::native_cross_attention through the dispatcher and compares it with
// at::scaled_dot_product_attention given the equivalent boolean mask.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  using Index = const std::optional<at::Tensor>&;
  // q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, Index,
                                                       Index, Index, Index, Index, bool, double, Index, double);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mmkernels::native_cross_attention", "")
                .typed<Signature>();
  at::manual_seed(0);
  const auto q = at::randn({2, 4, 37, 64});
  const auto k = at::randn({2, 4, 129, 64});
  const auto v = at::randn({2, 4, 129, 64});
  const auto lengths = at::tensor({129, 50}, at::kLong);
  const double scale = 0.125;
  auto [out, lse] = op.call(q, k, v, lengths, std::nullopt, std::nullopt, std::nullopt, std::nullopt, false, 0.0,
                            std::nullopt, scale);

  const auto visible = (at::arange(129).view({1, 129}) < lengths.view({2, 1})).view({2, 1, 1, 129});
  const auto expected = at::scaled_dot_product_attention(q, k, v, visible, 0.0, false, scale);
  const double err = (out - expected).abs().max().item<double>();
  std::cout << "mmkernels::native_cross_attention vs SDPA: max abs error " << err << std::endl;
  return err < 1e-5 ? 0 : 1;
}
