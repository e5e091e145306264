"""Every operator's schema, in one place: csrc/schemas.h is generated from this file
(tools/gen_headers.py) and csrc/ops.cpp defines what it lists, so Python and C++ cannot disagree.

Two layers of operators per op:
  mmkernels::<op>(..., str backend)  the public op; its kernel is the Python backend router
                                      (mmkernels/ops/registration.py), with autograd and fake.
  mmkernels::native_<op>(...)        the C++ kernels, registered per dispatch key (CPU, CUDA), so
                                      the tensors' device picks the kernel (ops without a native
                                      twin have none).
and the same two for <op>_backward, which takes the output gradients first.

What the outputs mean:
- cross_attention returns, besides out, the softmax statistics its backward recomputes the
  probabilities from (mmkernels/backends/base.py stats_shape): for half inputs the log-sum-exp of
  each query row, (B, Hq, Lq) float32; for float32/float64 inputs the row max and the log of the
  row sum apart, (B, Hq, Lq, 2) float64, in the backend's own score units. A row that sees no key
  (a padded query row too) has a max of +inf. kv_start/kv_end are (B, Lq) per-row key ranges;
  seed is the int64 Philox key of attention dropout (used when dropout_p > 0).
- concat_weighted_fusion works on (rows, D_m) views and returns the (rows, M) modality weights
  for the backward; an empty `values` list means the features are the values.
- decision_fusion works on (rows, C) views and takes weights already normalised to sum 1.
- linear_fusion's activation is an index into mmkernels/limits.py ACTIVATIONS; it returns the
  pre-activation for the backward.
- gated_fusion returns tanh(x_a W_a^T + b_a), tanh(x_b W_b^T + b_b) and the gate z.
- gated_residual_linear: y = x + tanh(gate) * row_mask * (h @ weight^T + bias), and the
  projection, for the gate's gradient.
- co_attention has no native twin: its CPU kernel is two native_cross_attention calls.

Plain data with no imports, so the generator needs neither torch nor a built extension.
"""

_VISIBILITY = ("Tensor? kv_lengths, Tensor? key_padding_mask, Tensor? q_lengths, Tensor? kv_start, Tensor? kv_end, "
               "bool causal, float dropout_p, Tensor? seed, float scale")
_CO_VISIBILITY = "Tensor? lengths_a, Tensor? lengths_b, Tensor? kv_start_a, Tensor? kv_end_a, Tensor? kv_start_b, Tensor? kv_end_b, float scale"

# name -> (forward args, forward returns, backward args, backward returns, has a native_ twin)
SCHEMAS = {
    "cross_attention": (
        f"Tensor q, Tensor k, Tensor v, {_VISIBILITY}",
        "(Tensor out, Tensor lse)",
        f"Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VISIBILITY}",
        "(Tensor grad_q, Tensor grad_k, Tensor grad_v)",
        True,
    ),
    "co_attention": (
        f"Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, {_CO_VISIBILITY}",
        "(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b)",
        "Tensor grad_a, Tensor grad_b, Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, "
        f"Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, {_CO_VISIBILITY}",
        "(Tensor grad_q_a, Tensor grad_k_a, Tensor grad_v_a, Tensor grad_q_b, Tensor grad_k_b, Tensor grad_v_b)",
        False,
    ),
    "concat_weighted_fusion": (
        "Tensor[] features, Tensor weight, Tensor? bias, Tensor[] values, bool concat",
        "(Tensor out, Tensor gate)",
        "Tensor grad_out, Tensor[] features, Tensor weight, Tensor[] values, Tensor gate, bool concat",
        "(Tensor[] grad_features, Tensor grad_weight, Tensor grad_bias, Tensor[] grad_values)",
        True,
    ),
    "decision_fusion": (
        "Tensor[] logits, Tensor weights, bool prob",
        "Tensor",
        "Tensor grad_out, Tensor[] logits, Tensor weights, bool prob",
        "(Tensor[] grad_logits, Tensor grad_weights)",
        True,
    ),
    "linear_fusion": (
        "Tensor[] features, Tensor[] weights, Tensor? bias, int activation",
        "(Tensor out, Tensor pre)",
        "Tensor grad_out, Tensor[] features, Tensor[] weights, Tensor pre, int activation",
        "(Tensor[] grad_features, Tensor[] grad_weights, Tensor grad_bias)",
        True,
    ),
    "gated_fusion": (
        "Tensor x_a, Tensor x_b, Tensor weight_a, Tensor weight_b, Tensor weight_z, Tensor? bias_a, Tensor? bias_b, "
        "Tensor? bias_z",
        "(Tensor out, Tensor h_a, Tensor h_b, Tensor z)",
        "Tensor grad_out, Tensor x_a, Tensor x_b, Tensor weight_a, Tensor weight_b, Tensor weight_z, Tensor h_a, "
        "Tensor h_b, Tensor z",
        "(Tensor grad_x_a, Tensor grad_x_b, Tensor grad_weight_a, Tensor grad_weight_b, Tensor grad_weight_z, "
        "Tensor grad_bias_a, Tensor grad_bias_b, Tensor grad_bias_z)",
        True,
    ),
    "gated_residual_linear": (
        "Tensor x, Tensor h, Tensor weight, Tensor? bias, Tensor gate, Tensor? row_mask",
        "(Tensor out, Tensor proj)",
        "Tensor grad_out, Tensor h, Tensor weight, Tensor gate, Tensor? row_mask, Tensor proj",
        "(Tensor grad_x, Tensor grad_h, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate)",
        True,
    ),
}


def definitions() -> list[str]:
    """Every schema string torch.library gets, public ops first."""
    public, native = [], []
    for name, (args, returns, bwd_args, bwd_returns, has_native) in SCHEMAS.items():
        public += [f"{name}({args}, str backend) -> {returns}", f"{name}_backward({bwd_args}, str backend) -> {bwd_returns}"]
        if has_native:
            native += [f"native_{name}({args}) -> {returns}", f"native_{name}_backward({bwd_args}) -> {bwd_returns}"]
    return public + native
