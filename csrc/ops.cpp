// Operator schemas.
//
// Two layers of operators:
//   mmkernels::<op>(..., str backend)   public ops; their kernel is the Python backend router
//                                        (mmkernels/ops), with autograd and fake registered once.
//   mmkernels::native_<op>(...)         the C++ kernels, registered per dispatch key (CPU, CUDA)
//                                        so the tensor's device picks the kernel.
//
// cross_attention returns, besides out, the softmax statistics its backward recomputes the
// probabilities from (mmkernels/backends/base.py stats_shape): for half inputs the log-sum-exp of
// each query row, (B, Hq, Lq) float32; for float32/float64 inputs the row max and the log of the
// row sum apart, (B, Hq, Lq, 2) float64, in the backend's own score units. A row that sees no key
// (a padded query row too) has a max of +inf. kv_start/kv_end are (B, Lq) per-row key ranges; seed is the int64 Philox key
// of attention dropout (used when dropout_p > 0). concat_weighted_fusion
// works on (rows, D_m) views and returns the (rows, M) modality weights for the backward; an empty
// `values` list means the features are the values. decision_fusion works on (rows, C) views and
// takes weights already normalised to sum 1 (acc dtype). linear_fusion's activation is an index
// into mmkernels/ops/linear_fusion.py ACTIVATIONS; it returns the pre-activation for the backward.
// gated_fusion returns tanh(x_a W_a^T + b_a), tanh(x_b W_b^T + b_b) and the gate z for the backward.
#include <torch/library.h>

#define MMKERNELS_ATTENTION_VISIBILITY                                                            \
  "Tensor? kv_lengths, Tensor? key_padding_mask, Tensor? q_lengths, Tensor? kv_start, Tensor? kv_end, " \
  "bool causal, float dropout_p, Tensor? seed, float scale"
#define MMKERNELS_CROSS_ATTENTION_ARGS "Tensor q, Tensor k, Tensor v, " MMKERNELS_ATTENTION_VISIBILITY
#define MMKERNELS_CROSS_ATTENTION_BACKWARD_ARGS \
  "Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " MMKERNELS_ATTENTION_VISIBILITY
#define MMKERNELS_FUSION_ARGS "Tensor[] features, Tensor weight, Tensor? bias, Tensor[] values, bool concat"
#define MMKERNELS_FUSION_BACKWARD_ARGS \
  "Tensor grad_out, Tensor[] features, Tensor weight, Tensor[] values, Tensor gate, bool concat"

#define MMKERNELS_DECISION_FUSION_ARGS "Tensor[] logits, Tensor weights, bool prob"
#define MMKERNELS_DECISION_FUSION_BACKWARD_ARGS "Tensor grad_out, Tensor[] logits, Tensor weights, bool prob"
#define MMKERNELS_LINEAR_FUSION_ARGS "Tensor[] features, Tensor[] weights, Tensor? bias, int activation"
#define MMKERNELS_LINEAR_FUSION_BACKWARD_ARGS \
  "Tensor grad_out, Tensor[] features, Tensor[] weights, Tensor pre, int activation"

#define MMKERNELS_GATED_FUSION_ARGS \
  "Tensor x_a, Tensor x_b, Tensor weight_a, Tensor weight_b, Tensor weight_z, Tensor? bias_a, Tensor? bias_b, Tensor? bias_z"
#define MMKERNELS_GATED_FUSION_BACKWARD_ARGS \
  "Tensor grad_out, Tensor x_a, Tensor x_b, Tensor weight_a, Tensor weight_b, Tensor weight_z, Tensor h_a, Tensor h_b, Tensor z"

#define MMKERNELS_CROSS_ATTENTION_RET " -> (Tensor out, Tensor lse)"
#define MMKERNELS_CROSS_ATTENTION_BACKWARD_RET " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)"
#define MMKERNELS_FUSION_RET " -> (Tensor out, Tensor gate)"
#define MMKERNELS_DECISION_FUSION_RET " -> Tensor"
#define MMKERNELS_DECISION_FUSION_BACKWARD_RET " -> (Tensor[] grad_logits, Tensor grad_weights)"
#define MMKERNELS_GATED_FUSION_RET " -> (Tensor out, Tensor h_a, Tensor h_b, Tensor z)"
#define MMKERNELS_GATED_FUSION_BACKWARD_RET \
  " -> (Tensor grad_x_a, Tensor grad_x_b, Tensor grad_weight_a, Tensor grad_weight_b, Tensor grad_weight_z, " \
  "Tensor grad_bias_a, Tensor grad_bias_b, Tensor grad_bias_z)"
#define MMKERNELS_LINEAR_FUSION_RET " -> (Tensor out, Tensor pre)"
#define MMKERNELS_LINEAR_FUSION_BACKWARD_RET " -> (Tensor[] grad_features, Tensor[] grad_weights, Tensor grad_bias)"
#define MMKERNELS_FUSION_BACKWARD_RET \
  " -> (Tensor[] grad_features, Tensor grad_weight, Tensor grad_bias, Tensor[] grad_values)"

TORCH_LIBRARY(mmkernels, m) {
  m.def("cross_attention(" MMKERNELS_CROSS_ATTENTION_ARGS ", str backend)" MMKERNELS_CROSS_ATTENTION_RET);
  m.def("cross_attention_backward(" MMKERNELS_CROSS_ATTENTION_BACKWARD_ARGS
        ", str backend)" MMKERNELS_CROSS_ATTENTION_BACKWARD_RET);
  m.def("concat_weighted_fusion(" MMKERNELS_FUSION_ARGS ", str backend)" MMKERNELS_FUSION_RET);
  m.def("concat_weighted_fusion_backward(" MMKERNELS_FUSION_BACKWARD_ARGS
        ", str backend)" MMKERNELS_FUSION_BACKWARD_RET);

  m.def("decision_fusion(" MMKERNELS_DECISION_FUSION_ARGS ", str backend)" MMKERNELS_DECISION_FUSION_RET);
  m.def("decision_fusion_backward(" MMKERNELS_DECISION_FUSION_BACKWARD_ARGS
        ", str backend)" MMKERNELS_DECISION_FUSION_BACKWARD_RET);
  m.def("linear_fusion(" MMKERNELS_LINEAR_FUSION_ARGS ", str backend)" MMKERNELS_LINEAR_FUSION_RET);
  m.def("linear_fusion_backward(" MMKERNELS_LINEAR_FUSION_BACKWARD_ARGS
        ", str backend)" MMKERNELS_LINEAR_FUSION_BACKWARD_RET);
  // co_attention has no native_ twin: its CPU "kernel" is two native_cross_attention calls.
  m.def(
      "co_attention(Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, Tensor? lengths_a, "
      "Tensor? lengths_b, Tensor? kv_start_a, Tensor? kv_end_a, Tensor? kv_start_b, Tensor? kv_end_b, float scale, "
      "str backend) -> (Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b)");
  m.def(
      "co_attention_backward(Tensor grad_a, Tensor grad_b, Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, "
      "Tensor v_b, Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, Tensor? lengths_a, Tensor? lengths_b, "
      "Tensor? kv_start_a, Tensor? kv_end_a, Tensor? kv_start_b, Tensor? kv_end_b, "
      "float scale, str backend) -> (Tensor grad_q_a, Tensor grad_k_a, Tensor grad_v_a, Tensor grad_q_b, "
      "Tensor grad_k_b, Tensor grad_v_b)");
  // y = x + tanh(gate) * row_mask * (h @ weight^T + bias): the gated cross-attention output
  // projection with its epilogue. Returns the projection too, for the gate's gradient.
  m.def(
      "gated_residual_linear(Tensor x, Tensor h, Tensor weight, Tensor? bias, Tensor gate, Tensor? row_mask, str backend) "
      "-> (Tensor out, Tensor proj)");
  m.def(
      "gated_residual_linear_backward(Tensor grad_out, Tensor h, Tensor weight, Tensor gate, Tensor? row_mask, Tensor proj, "
      "str backend) -> (Tensor grad_x, Tensor grad_h, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate)");
  m.def(
      "native_gated_residual_linear(Tensor x, Tensor h, Tensor weight, Tensor? bias, Tensor gate, Tensor? row_mask) "
      "-> (Tensor out, Tensor proj)");
  m.def(
      "native_gated_residual_linear_backward(Tensor grad_out, Tensor h, Tensor weight, Tensor gate, Tensor? row_mask, "
      "Tensor proj) -> (Tensor grad_x, Tensor grad_h, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate)");
  m.def("gated_fusion(" MMKERNELS_GATED_FUSION_ARGS ", str backend)" MMKERNELS_GATED_FUSION_RET);
  m.def("gated_fusion_backward(" MMKERNELS_GATED_FUSION_BACKWARD_ARGS ", str backend)" MMKERNELS_GATED_FUSION_BACKWARD_RET);

  m.def("native_cross_attention(" MMKERNELS_CROSS_ATTENTION_ARGS ")" MMKERNELS_CROSS_ATTENTION_RET);
  m.def("native_cross_attention_backward(" MMKERNELS_CROSS_ATTENTION_BACKWARD_ARGS
        ")" MMKERNELS_CROSS_ATTENTION_BACKWARD_RET);
  m.def("native_concat_weighted_fusion(" MMKERNELS_FUSION_ARGS ")" MMKERNELS_FUSION_RET);
  m.def("native_concat_weighted_fusion_backward(" MMKERNELS_FUSION_BACKWARD_ARGS
        ")" MMKERNELS_FUSION_BACKWARD_RET);
  m.def("native_decision_fusion(" MMKERNELS_DECISION_FUSION_ARGS ")" MMKERNELS_DECISION_FUSION_RET);
  m.def("native_decision_fusion_backward(" MMKERNELS_DECISION_FUSION_BACKWARD_ARGS
        ")" MMKERNELS_DECISION_FUSION_BACKWARD_RET);
  m.def("native_linear_fusion(" MMKERNELS_LINEAR_FUSION_ARGS ")" MMKERNELS_LINEAR_FUSION_RET);
  m.def("native_gated_fusion(" MMKERNELS_GATED_FUSION_ARGS ")" MMKERNELS_GATED_FUSION_RET);
  m.def("native_gated_fusion_backward(" MMKERNELS_GATED_FUSION_BACKWARD_ARGS ")" MMKERNELS_GATED_FUSION_BACKWARD_RET);
  m.def("native_linear_fusion_backward(" MMKERNELS_LINEAR_FUSION_BACKWARD_ARGS
        ")" MMKERNELS_LINEAR_FUSION_BACKWARD_RET);
}
