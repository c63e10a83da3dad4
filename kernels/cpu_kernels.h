// The typed boundary between kernels/cpu.py and the C++ CPU kernels: the structs and enums cpu_bindings.cpp exposes
// to Python, and the entry points each kernel file defines. What crosses is named: a weight is a WeightRef, the
// router's settings a Router with enums for its choices, the latent cache's format a CacheKind, a decoder layer's
// weights one DecodeLayerWeights with the field names of the Python dataclass of the same name (kernels/cpu.py),
// converted from it once when the engine starts.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace mla {

// One weight as the products read it: a float tensor [(G,) N, K] (bf16 or fp32; scales empty), or a QuantWeight's
// qweight and scales (kernels/weights.py: int8 [(G,) N, K] with scales [(G,) N]; int4 [(G,) N, Kp / 2] with scales
// [(G,) N, Kp / 128]). K: the length of a row of the float weight it stands for.
struct WeightRef {
  torch::Tensor tensor;
  std::optional<torch::Tensor> scales;
  int64_t K = 0;
  bool int4 = false;
};

// How the router ranks experts and groups (kernels/reference.py TOPK_METHODS, SCORING_FUNCS).
enum class TopkMethod { greedy, group_limited_greedy, noaux_tc };
enum class Scoring { softmax, sigmoid };

// kernels.moe.Router: DeepSeek's gate settings as the model resolves them.
struct Router {
  int64_t top_k = 1;
  Scoring scoring = Scoring::softmax;
  TopkMethod method = TopkMethod::greedy;
  int64_t n_group = 1, topk_group = 1;
  bool norm = false;  // the top-k weights normalised to sum to 1
  double scale = 1.0;  // routed_scaling_factor
};

// The latent cache's row layout (kernels/cache_format.py): float32 or bfloat16 [c_kv | k_pe]; or int8 c_kv, its
// float32 scale, then k_pe in the model dtype (bfloat16 or float32).
enum class CacheKind { FLOAT32, BFLOAT16, INT8_BF16_ROPE, INT8_FP32_ROPE };

// A decoder layer (models/deepseek.py DecoderLayer) by the checkpoint's names, as kernels/cpu.py DecodeLayerWeights.
// Norms, W_UK [H, nope, R], W_UV [H, v, R] and the router's gate are model-dtype tensors; the linears WeightRefs.
struct DecodeLayerWeights {
  torch::Tensor input_layernorm, post_attention_layernorm;
  WeightRef q_proj;  // q_b_proj when q_lora_rank is set
  std::optional<WeightRef> q_a_proj;
  std::optional<torch::Tensor> q_a_layernorm;
  WeightRef kv_a_proj_with_mqa;
  torch::Tensor kv_a_layernorm, w_uk, w_uv;
  WeightRef o_proj;
  WeightRef w13, w2;  // [gate_proj; up_proj] and down_proj: the dense MLP's, or the routed experts' stacked
  std::optional<torch::Tensor> gate, e_score_correction_bias;  // the router (MoE layers only)
  std::optional<Router> router;
  std::optional<WeightRef> shared_w13, shared_w2;
  int64_t num_heads = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, kv_lora_rank = 0;
  double rms_norm_eps = 0.0, softmax_scale = 0.0;
  bool rope_interleave = false;
};

// cpu_gemv.cpp: few-row products, one weight or a MoE layer's experts, and their read loop alone (stream_sum); the
// prefill GEMM's dequantization.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool interleave);
void gemv(torch::Tensor x, const WeightRef& w, torch::Tensor out);
void gemvs(torch::Tensor x, const std::vector<const WeightRef*>& ws, std::vector<torch::Tensor> outs);
double stream_sum(torch::Tensor x);
torch::Tensor moe_decode(torch::Tensor x, torch::Tensor ids, torch::Tensor topw, const WeightRef& w13,
                         const WeightRef& w2, const std::optional<WeightRef>& s13, const std::optional<WeightRef>& s2);
void dequantize(const WeightRef& w, torch::Tensor out);

// cpu_int8_gemm.cpp: the int8 x int8 products of a prompt: one linear's operands and epilogue; a MoE layer's routed
// experts.
std::vector<torch::Tensor> quantize_tokens(torch::Tensor x);
void requantize_rows(const WeightRef& w, torch::Tensor out, torch::Tensor scales_out);
void scale_int32(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, torch::Tensor out);
torch::Tensor moe_prompt(torch::Tensor x, torch::Tensor ids, torch::Tensor topw, const WeightRef& w13,
                         const WeightRef& w2);

// cpu_attention.cpp: the absorbed attention over the paged latent cache.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor cache, torch::Tensor block_tables,
                         torch::Tensor cu_seqlens_q, torch::Tensor seq_lens, double scale, CacheKind kind);
torch::Tensor mla_absorbed(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor w_uk, torch::Tensor w_uv,
                           torch::Tensor cache, torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                           torch::Tensor seq_lens, double scale, CacheKind kind);

// cpu_layer.cpp: the small steps between the products, and the whole decoder layer.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, bool interleave);
torch::Tensor silu_mul(torch::Tensor h);
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor gate, std::optional<torch::Tensor> bias,
                                 const Router& router);
void write_latent(torch::Tensor cache, torch::Tensor slots, torch::Tensor c_kv, torch::Tensor k_pe);
bool has_avx512();

// Where a decode step's wall time goes (bench/phase_times_cpu.py): in a build with -DMLA_PHASE_TIMES, MLA_PHASE(name)
// adds the time since the previous mark to name's total, and phase_times() returns the totals in the order first
// marked, then starts over. In every other build it is no code.
#ifdef MLA_PHASE_TIMES
void phase_mark(const char* name);
std::vector<std::pair<std::string, double>> phase_times();
#define MLA_PHASE(name) ::mla::phase_mark(name)
#else
#define MLA_PHASE(name) ((void)0)
#endif

// A decoder layer of a decode step in one call, over weights checked once, reading and writing a cache of one kind.
class DecodeLayer {
 public:
  DecodeLayer(DecodeLayerWeights weights, CacheKind kind);
  // x [T, D] -> the layer's output [T, D]; the new tokens' latent rows are written to kv_cache.
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor slot_mapping, torch::Tensor cos,
                        torch::Tensor sin, torch::Tensor kv_cache, torch::Tensor block_tables,
                        torch::Tensor cu_seqlens_q, torch::Tensor seq_lens) const;

 private:
  DecodeLayerWeights w_;
  CacheKind kind_;
};

}  // namespace mla
