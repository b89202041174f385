// The single list of every zaya op schema, and the Python module that exposes the GPU launchers.
//
// Implementations are registered from Python (zaya_kernels/ops/): the reference, the Triton kernels and the
// HIP/CUDA launchers below all sit behind one backend selector there, so the schemas here are the contract.
#include <torch/extension.h>
#include <torch/library.h>

#include "launchers.h"

TORCH_LIBRARY(zaya, m) {
  // ---- residual scaling + RMSNorm family (zaya_kernels/ops/residual_rmsnorm.py) ----
  // new_residual = (branch + hidden_bias) * hidden_scale + (residual + residual_bias) * residual_scale  (fp32)
  // normed = norm_weight * rmsnorm(new_residual rounded to branch.dtype)                      (branch.dtype)
  // With residual = None: the model-input form, new_residual = (branch + hidden_bias) * hidden_scale.
  m.def(
      "residual_scale_rmsnorm(Tensor branch, Tensor? residual, Tensor hidden_scale, Tensor hidden_bias, "
      "Tensor? residual_scale, Tensor? residual_bias, Tensor norm_weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "residual_scale_rmsnorm_backward(Tensor grad_normed, Tensor? grad_new_residual, Tensor branch, "
      "Tensor? residual, Tensor hidden_scale, Tensor hidden_bias, Tensor? residual_scale, Tensor? residual_bias, "
      "Tensor norm_weight, Tensor new_residual, float eps) -> (Tensor, Tensor?, Tensor, Tensor, Tensor?, Tensor?, Tensor)");
  // out = weight * rmsnorm(x rounded to out_dtype), in out_dtype (default x.dtype): the final norm.
  m.def("rmsnorm(Tensor x, Tensor weight, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def("rmsnorm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");

  // ---- router family (zaya_kernels/ops/router.py; DESIGN.md 1.3, 1.5) ----
  // r = x down_w^T + down_b (+ gamma * r_prev); logits = out_w gelu(fc2 gelu(fc1 norm_w*rmsnorm(r))); p = softmax
  // expert_index = argmax(p + balance_bias) (int32, ties to the lowest index, E = skip), routing_weight = p[e*] (fp32),
  // r in x.dtype, logits fp32 [T, E+1] only with return_logits.
  m.def(
      "zaya_router(Tensor x, Tensor? r_prev, Tensor? gamma, Tensor down_w, Tensor down_b, Tensor norm_w, "
      "Tensor fc1_w, Tensor fc1_b, Tensor fc2_w, Tensor fc2_b, Tensor out_w, Tensor balance_bias, float eps, "
      "bool return_logits=False) -> (Tensor expert_index, Tensor routing_weight, Tensor r, Tensor? logits)");
  m.def(
      "zaya_router_backward(Tensor grad_weight, Tensor? grad_r, Tensor? grad_logits, Tensor expert_index, Tensor x, "
      "Tensor? r_prev, Tensor? gamma, Tensor down_w, Tensor down_b, Tensor norm_w, Tensor fc1_w, Tensor fc1_b, "
      "Tensor fc2_w, Tensor fc2_b, Tensor out_w, float eps) -> (Tensor, Tensor?, Tensor?, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  // In place: balance_bias [E+1] fp32, state [2, E+1] fp32, step [1] int64. controller 0 = AdamW on the load error,
  // 1 = PID. counts [E+1] are this step's tokens per class (already summed over ranks). -> (loads, error) fp32.
  m.def(
      "router_balance_update(Tensor counts, Tensor(a!) balance_bias, Tensor(b!) state, Tensor(c!) step, int controller, "
      "bool include_skip, float lr, float beta1, float beta2, float adam_eps, float kp, float ki, float kd) "
      "-> (Tensor loads, Tensor error)");

  // ---- top-1 MoE family (zaya_kernels/ops/moe.py; DESIGN.md 1.4) ----
  // Dispatch of expert_index int32 [T] (values 0..E, E = skip) into tiles of block_m rows, all int32:
  // counts [E+1], offsets [E+2] (exclusive prefix sum), sorted_token_ids [T] (stable, skip last), inverse [T],
  // tile_expert [cdiv(T, block_m) + E] (class of each row tile, -1 unused), tile_start [same] (first sorted row).
  m.def(
      "moe_dispatch(Tensor expert_index, int num_experts, int block_m) -> (Tensor counts, Tensor offsets, "
      "Tensor sorted_token_ids, Tensor inverse, Tensor tile_expert, Tensor tile_start)");
  // y [T, H] = w * down[e] (SiLU(gate_up[e, :I] x) * gate_up[e, I:] x) per token; skipped: 0 (skip_mode 0) or w x (1).
  m.def(
      "moe_experts(Tensor x, Tensor gate_up, Tensor down, Tensor routing_weight, Tensor sorted_token_ids, "
      "Tensor offsets, Tensor tile_expert, Tensor tile_start, int block_m, int skip_mode) -> Tensor");
  // The same y for a few tokens without a dispatch (decode): expert_index int32 [T] read by the kernels themselves.
  m.def(
      "moe_experts_by_token(Tensor x, Tensor gate_up, Tensor down, Tensor expert_index, Tensor routing_weight, "
      "int skip_mode) -> Tensor");
  m.def(
      "moe_experts_backward(Tensor grad_y, Tensor x, Tensor gate_up, Tensor down, Tensor routing_weight, "
      "Tensor sorted_token_ids, Tensor offsets, Tensor tile_expert, Tensor tile_start, int block_m, int skip_mode) "
      "-> (Tensor grad_x, Tensor grad_gate_up, Tensor grad_down, Tensor grad_routing_weight)");
  // Expert parallelism's row gather and scatter-back around the all-to-all; sorted_token_ids int32 [T] is the
  // dispatch's permutation (routed tokens first). rows [num_rows, H] = x[sorted_token_ids[:num_rows]] (x [T, H]).
  m.def("moe_permute_rows(Tensor x, Tensor sorted_token_ids, int num_rows) -> Tensor");
  // y [T, H]: y[sorted_token_ids[i]] = rows[i] (i < N, rows [N, H]); the other tokens: 0 (skip_mode 0) or
  // w x (skip_mode 1: x [T, H], routing_weight [T]).
  m.def(
      "moe_unpermute_rows(Tensor rows, Tensor sorted_token_ids, Tensor? x, Tensor? routing_weight, int skip_mode) "
      "-> Tensor");
  m.def(
      "moe_unpermute_rows_backward(Tensor grad_y, Tensor sorted_token_ids, Tensor? x, Tensor? routing_weight, "
      "int num_rows, int skip_mode) -> (Tensor grad_rows, Tensor? grad_x, Tensor? grad_routing_weight)");

  // ---- CCA projection family (zaya_kernels/ops/cca.py; DESIGN.md 1.1 steps 3-8) ----
  // From X = qk = [Q0 | K0] [T, C], C = (n_q + n_kv) D: depthwise causal conv (conv0 [C, k0]) then grouped conv
  // (conv1 [C, D, k1], one group per head), mean coupling, value shift, sqrt(D) L2 norm (keys times temperature
  // [n_kv]), NeoX RoPE on the first rotary_dim dims. Packed varlen (cu_seqlens int32 [B+1]), optional initial
  // states per sequence (conv [B, C, k0+k1-2], value [B, n_kv D/2], has_initial_state [B]).
  // -> q [T, n_q, D], k [T, n_kv, D], v [T, n_kv, D] in qk.dtype; final states fp32 [B, C, k0+k1-2], [B, n_kv D/2].
  m.def(
      "cca_prepare(Tensor qk, Tensor v_current, Tensor v_delayed, Tensor conv0_weight, Tensor conv0_bias, "
      "Tensor conv1_weight, Tensor conv1_bias, Tensor temperature, Tensor positions, Tensor cu_seqlens, "
      "int num_q_heads, int num_kv_heads, int rotary_dim, float rope_theta, Tensor? initial_conv_state=None, "
      "Tensor? initial_value_state=None, Tensor? has_initial_state=None) "
      "-> (Tensor q, Tensor k, Tensor v, Tensor final_conv_state, Tensor final_value_state)");
  // Gradients to (qk, v_current, v_delayed, conv0_weight, conv0_bias, conv1_weight, conv1_bias, temperature).
  m.def(
      "cca_prepare_backward(Tensor? grad_q, Tensor? grad_k, Tensor? grad_v, Tensor? grad_final_conv_state, "
      "Tensor? grad_final_value_state, Tensor qk, Tensor v_current, Tensor v_delayed, Tensor conv0_weight, "
      "Tensor conv0_bias, Tensor conv1_weight, Tensor conv1_bias, Tensor temperature, Tensor positions, "
      "Tensor cu_seqlens, int num_q_heads, int num_kv_heads, int rotary_dim, float rope_theta, "
      "Tensor? initial_conv_state=None, Tensor? initial_value_state=None, Tensor? has_initial_state=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // cca_prepare that also writes k and v into a paged KV cache [num_blocks, block_size, n_kv, D] (qk.dtype, last
  // dim contiguous) at slot_mapping [T] (int64 / int32; slot = block * block_size + offset; negative: not written).
  // A separate op because torch.library refuses autograd on a schema with mutable arguments: no autograd.
  m.def(
      "cca_prepare_paged(Tensor qk, Tensor v_current, Tensor v_delayed, Tensor conv0_weight, Tensor conv0_bias, "
      "Tensor conv1_weight, Tensor conv1_bias, Tensor temperature, Tensor positions, Tensor cu_seqlens, "
      "int num_q_heads, int num_kv_heads, int rotary_dim, float rope_theta, Tensor slot_mapping, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? initial_conv_state=None, Tensor? initial_value_state=None, "
      "Tensor? has_initial_state=None) "
      "-> (Tensor q, Tensor k, Tensor v, Tensor final_conv_state, Tensor final_value_state)");
  // Decode: one token per row [B, C]; conv_state [slots, C, k0+k1-2] and value_state [slots, n_kv D/2] of slot
  // state_indices[b] are read and updated in place (negative index: padded row, zero output, states untouched).
  // Optionally k and v also go into a paged KV cache at slot_mapping [B] (as cca_prepare_paged; padded rows and
  // negative slots write nothing).
  m.def(
      "cca_prepare_decode(Tensor qk, Tensor v_current, Tensor v_delayed, Tensor conv0_weight, Tensor conv0_bias, "
      "Tensor conv1_weight, Tensor conv1_bias, Tensor temperature, Tensor positions, Tensor(a!) conv_state, "
      "Tensor(b!) value_state, Tensor state_indices, int num_q_heads, int num_kv_heads, int rotary_dim, "
      "float rope_theta, Tensor? slot_mapping=None, Tensor(c!)? k_cache=None, Tensor(d!)? v_cache=None) "
      "-> (Tensor q, Tensor k, Tensor v)");

  // ---- CCA attention family (zaya_kernels/ops/attention.py; DESIGN.md 1.1 step 9) ----
  // Packed varlen GQA (q head h uses kv head h // (Hq/Hkv)): q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1].
  // out [T, Hq, D], lse [Hq, T] fp32. softmax_scale None = 1/sqrt(D); window > 0: sliding window (needs causal).
  m.def(
      "cca_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float? softmax_scale=None, "
      "bool causal=True, int window=-1) -> (Tensor out, Tensor lse)");
  m.def(
      "cca_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, int max_seqlen, float? softmax_scale=None, bool causal=True, int window=-1) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // The newest token(s) per sequence: q [B, Hq, D] or [B, Q, Hq, D] (speculative decoding; out shaped like q);
  // caches [B, S_max, Hkv, D] or paged [num_blocks, block_size, Hkv, D]
  // with block_table int32 [B, max_blocks]; seq_lens int32 [B]. max_seqlen: optional bound of seq_lens (split sizing).
  // seq_starts int32 [B]: the first cache position each sequence sees (left padding: its pad count; None = 0).
  m.def(
      "cca_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? block_table=None, "
      "float? softmax_scale=None, int window=-1, int? max_seqlen=None, Tensor? seq_starts=None) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "zaya_kernels compiled extension: op schemas (torch.ops.zaya) and GPU launchers";
#if defined(ZAYA_WITH_GPU)
#if defined(USE_ROCM)
  m.attr("gpu_build") = "rocm";
#else
  m.attr("gpu_build") = "cuda";
#endif
  zaya::bind_gpu_launchers(m);
#else
  m.attr("gpu_build") = "none";
#endif
}
