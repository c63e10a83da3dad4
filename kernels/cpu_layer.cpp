// The small steps between a decode step's products, each one call instead of several torch ops (a norm, a cast, a
// cat, a scatter, a softmax and a top-k are each a few microseconds of dispatch for a few rows):
//   rms_norm, rope_, silu_mul, route (DeepSeek's router), write_latent (the new tokens into the latent cache)
// and DecodeLayer, a whole decoder layer of a decode step as one call: the steps above and the products of
// cpu_gemv.cpp and cpu_attention.cpp, in the order and with the roundings of the Python layer (models/deepseek.py
// DecoderLayer), so that the two give the same tokens. Between the products the Python layer makes about 40 calls
// into torch, each slow once the layer's weight stream has evicted the interpreter's working set.
#include "cpu_common.h"
#include "cpu_kernels.h"

#include <chrono>
#include <numeric>

namespace mla {

// DeepSeek's RMSNorm: x [M, D] normalised in float32, rounded to x's dtype, times the weight (in x's dtype).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "rms_norm: x [M, D], w [D] of x's dtype");
  x = x.contiguous();
  w = w.contiguous();
  auto y = torch::empty_like(x);
  const int64_t M = x.size(0), D = x.size(1);
  float_dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* X = x.data_ptr<T>();
    const T* Wt = w.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* xr = X + m * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) ss += to_f(xr[d]) * to_f(xr[d]);
        const float r = 1.f / std::sqrt(ss / float(D) + float(eps));
        for (int64_t d = 0; d < D; ++d) Y[m * D + d] = from_f<T>(to_f(Wt[d]) * to_f(from_f<T>(to_f(xr[d]) * r)));
      }
    });
  });
  return y;
}

// DeepSeek's router for a few tokens (kernels/reference.py route): x [T, D] (any float dtype), gate [E, D] (bf16 or
// fp32, read as float32: the products are float32, as the reference's are) -> (ids int64 [T, k], weights float32
// [T, k]). Methods: greedy, group_limited_greedy (groups ranked by their best expert), noaux_tc (bias added for the
// choice only; groups ranked by the sum of their best two). The weights are the chosen scores, normalised when norm,
// times scale.
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor gate, std::optional<torch::Tensor> bias,
                                 const Router& router) {
  const int64_t k = router.top_k, n_group = router.n_group, topk_group = router.topk_group;
  const TopkMethod method = router.method;
  const bool sigmoid = router.scoring == Scoring::sigmoid, norm = router.norm;
  const double scale = router.scale;
  const int64_t T = x.size(0), D = x.size(1), E = gate.size(0);
  TORCH_CHECK(x.dim() == 2 && gate.dim() == 2 && gate.size(1) == D && gate.is_contiguous() && k >= 1 && k <= E &&
                  (gate.scalar_type() == torch::kBFloat16 || gate.scalar_type() == torch::kFloat32),
              "route: x [T, D], gate bf16 / fp32 [E, D], 1 <= k <= E");
  TORCH_CHECK(method == TopkMethod::greedy ||
                  (n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group),
              "route: experts in n_group equal groups, 1 <= topk_group <= n_group");
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat32 && bias->numel() == E && bias->is_contiguous()),
              "route: bias float32 [E]");
  const std::vector<float> xf = values_f32(x);
  const bool g16 = gate.scalar_type() == torch::kBFloat16;
  const void* G = gate.data_ptr();
  auto ids = torch::empty({T, k}, torch::kInt64);
  auto wts = torch::empty({T, k}, torch::kFloat32);
  std::vector<float> score(E), choice(E), gs(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) score[e] = dot(xf.data() + t * D, static_cast<const char*>(G) + e * D * (g16 ? 2 : 4), g16, D);
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.f / (1.f + std::exp(-score[e]));
    } else {
      const float mx = *std::max_element(score.begin(), score.end());
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(score[e] - mx));
      for (int64_t e = 0; e < E; ++e) score[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e)
      choice[e] = score[e] + (method == TopkMethod::noaux_tc && bias ? bias->data_ptr<float>()[e] : 0.f);
    // the k (or topk_group) largest of v[0:n], best first, into order
    auto top = [&](const float* v, int64_t n, int64_t kk) {
      std::iota(order.begin(), order.begin() + n, 0);
      std::partial_sort(order.begin(), order.begin() + kk, order.begin() + n,
                        [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
    };
    if (method != TopkMethod::greedy && n_group > 1) {  // keep the experts of the topk_group best groups
      const int64_t per = E / n_group;
      for (int64_t g = 0; g < n_group; ++g) {
        top(choice.data() + g * per, per, std::min<int64_t>(2, per));
        gs[g] = method == TopkMethod::group_limited_greedy ? choice[g * per + order[0]]
                            : choice[g * per + order[0]] + (per > 1 ? choice[g * per + order[1]] : 0.f);
      }
      top(gs.data(), n_group, topk_group);
      std::vector<bool> keep(n_group, false);
      for (int64_t i = 0; i < topk_group; ++i) keep[order[i]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -INFINITY;
    }
    top(choice.data(), E, k);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      ids.data_ptr<int64_t>()[t * k + j] = order[j];
      wts.data_ptr<float>()[t * k + j] = (norm ? score[order[j]] / (sum + 1e-20f) : score[order[j]]) * float(scale);
    }
  }
  return {ids, wts};
}

// New tokens' [c_kv | k_pe] into the latent cache (kernels/reference.py write_latent): token t to flat slot
// slots[t]; c_kv [T, R], k_pe [T, dr] (views with a contiguous last dim). A float cache takes both converted to its
// dtype; a packed int8 cache (uint8 rows, kernels/cache_format.py) takes the latent quantized with one absmax scale
// per token, rounded half up as cache_format.quantize does, then the scale (float32) and k_pe in its own dtype.
void write_latent(torch::Tensor cache, torch::Tensor slots, torch::Tensor c_kv, torch::Tensor k_pe) {
  const int64_t T = c_kv.size(0), R = c_kv.size(1), DR = k_pe.size(1), W = cache.size(-1);
  const bool packed = cache.scalar_type() == torch::kByte;
  TORCH_CHECK(cache.is_contiguous() && W == (packed ? R + 4 + DR * k_pe.element_size() : R + DR) &&
                  k_pe.size(0) == T && slots.numel() == T && slots.scalar_type() == torch::kInt64,
              "write_latent: cache [..., R + dr] (or a packed int8 row), c_kv [T, R], k_pe [T, dr]");
  const std::vector<float> c = values_f32(c_kv), kp = values_f32(k_pe);
  const int64_t* S = slots.contiguous().data_ptr<int64_t>();
  const int64_t rows = cache.numel() / W;
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(S[t] >= 0 && S[t] < rows, "write_latent: slot out of range");
  if (packed) {
    uint8_t* out = cache.data_ptr<uint8_t>();
    for (int64_t t = 0; t < T; ++t) {
      const float* x = c.data() + t * R;
      uint8_t* row = out + S[t] * W;
      float amax = 0.f;
      for (int64_t i = 0; i < R; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float scale = amax / 127.f > 0.f ? amax / 127.f : 1.f;  // an all-zero row: any finite scale
      for (int64_t i = 0; i < R; ++i)
        row[i] = uint8_t(int8_t(std::min(127.f, std::max(-127.f, std::floor(x[i] / scale + 0.5f)))));
      std::memcpy(row + R, &scale, 4);
      float_dispatch(k_pe.scalar_type(), [&](auto tag) {
        using Tk = decltype(tag);
        Tk* pe = reinterpret_cast<Tk*>(row + R + 4);  // 4-byte aligned: R is a multiple of 4 (kv_lora_rank)
        for (int64_t i = 0; i < DR; ++i) pe[i] = Tk(kp[t * DR + i]);
      });
    }
    return;
  }
  float_dispatch(cache.scalar_type(), [&](auto tag) {
    using Tc = decltype(tag);
    Tc* out = cache.data_ptr<Tc>();
    for (int64_t t = 0; t < T; ++t) {
      Tc* row = out + S[t] * W;
      for (int64_t i = 0; i < R; ++i) row[i] = Tc(c[t * R + i]);
      for (int64_t i = 0; i < DR; ++i) row[R + i] = Tc(kp[t * DR + i]);
    }
  });
}

// RoPE in place on x [T, N, dr] (any strides, last dim contiguous): token t rotated by the angles of positions[t];
// cos / sin [P, dr / 2] float32. interleave: pairs (x0, x1), (x2, x3), ...; otherwise the two halves.
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, bool interleave) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && positions.dim() == 1 && positions.size(0) == x.size(0),
              "rope_: x [T, N, dr] with a contiguous last dim, positions [T]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32, "rope_ tables");
  auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t T = x.size(0), N = x.size(1), half = x.size(2) / 2, s0 = x.stride(0), s1 = x.stride(1);
  const int64_t* P = pos.data_ptr<int64_t>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float_dispatch(x.scalar_type(), [&](auto tag) {
    using Tp = decltype(tag);
    Tp* X = x.data_ptr<Tp>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* c = C + P[t] * half;
        const float* sn = S + P[t] * half;
        for (int64_t n = 0; n < N; ++n) {
          Tp* v = X + t * s0 + n * s1;
          for (int64_t i = 0; i < half; ++i) {
            Tp* a = interleave ? v + 2 * i : v + i;
            Tp* b = interleave ? v + 2 * i + 1 : v + half + i;
            const float x1 = to_f(*a), x2 = to_f(*b);
            *a = from_f<Tp>(x1 * c[i] - x2 * sn[i]);
            *b = from_f<Tp>(x2 * c[i] + x1 * sn[i]);
          }
        }
      }
    });
  });
}

// SwiGLU's middle: h [M, 2I] (gate | up) -> silu(gate) * up [M, I], in float32, returned in h's dtype.
torch::Tensor silu_mul(torch::Tensor h) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "silu_mul: h [M, 2I]");
  h = h.contiguous();
  const int64_t M = h.size(0), I = h.size(1) / 2;
  auto y = torch::empty({M, I}, h.options());
  float_dispatch(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* Hp = h.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t i = 0; i < I; ++i) {
          const float g = to_f(Hp[m * 2 * I + i]), u = to_f(Hp[m * 2 * I + I + i]);
          Y[m * I + i] = from_f<T>(g / (1.f + std::exp(-g)) * u);
        }
    });
  });
  return y;
}

#ifdef MLA_PHASE_TIMES
namespace {
std::vector<std::pair<std::string, double>> phase_totals;
std::chrono::steady_clock::time_point phase_last;
}  // namespace

void phase_mark(const char* name) {
  const auto now = std::chrono::steady_clock::now();
  auto it = std::find_if(phase_totals.begin(), phase_totals.end(), [&](const auto& p) { return p.first == name; });
  if (it == phase_totals.end()) it = phase_totals.insert(it, {name, 0.0});
  if (phase_last.time_since_epoch().count()) it->second += std::chrono::duration<double>(now - phase_last).count();
  phase_last = now;
}

std::vector<std::pair<std::string, double>> phase_times() {
  std::vector<std::pair<std::string, double>> out;
  out.swap(phase_totals);
  phase_last = {};
  return out;
}
#endif

bool has_avx512() {
#ifdef MLA_AVX512
  return true;
#else
  return false;
#endif
}

// ---- a whole decoder layer of a decode step ---------------------------------------------------------------------

namespace {

torch::Tensor linear(const torch::Tensor& x, const WeightRef& w) {
  auto out = torch::empty({x.size(0), w.tensor.size(-2)}, x.options());
  gemv(x, w, out);
  return out;
}

bool is_weight(const WeightRef& w) { return w.tensor.defined() && w.K > 0; }

// The residual: y = x + y in y's dtype (y contiguous, of x's shape and dtype), rounded as torch's add rounds it (the
// sum in float32, rounded once). A plain loop over a few rows: a torch add's dispatch cost more, once the layer's
// weight stream had evicted it.
torch::Tensor residual(torch::Tensor x, torch::Tensor y) {
  x = x.contiguous();
  TORCH_CHECK(y.is_contiguous() && x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(),
              "residual: y contiguous, of x's shape and dtype");
  float_dispatch(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* a = x.data_ptr<T>();
    T* b = y.data_ptr<T>();
    for (int64_t i = 0; i < y.numel(); ++i) b[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
  });
  return y;
}

}  // namespace

DecodeLayer::DecodeLayer(DecodeLayerWeights weights, CacheKind kind) : w_(std::move(weights)), kind_(kind) {
  const DecodeLayerWeights& w = w_;
  TORCH_CHECK(w.input_layernorm.defined() && w.post_attention_layernorm.defined() && w.kv_a_layernorm.defined() &&
                  w.w_uk.defined() && w.w_uv.defined(),
              "DecodeLayerWeights: input_layernorm, post_attention_layernorm, kv_a_layernorm, w_uk, w_uv are required");
  TORCH_CHECK(is_weight(w.q_proj) && is_weight(w.kv_a_proj_with_mqa) && is_weight(w.o_proj) && is_weight(w.w13) &&
                  is_weight(w.w2),
              "DecodeLayerWeights: q_proj, kv_a_proj_with_mqa, o_proj, w13, w2 are required");
  TORCH_CHECK(w.q_a_proj.has_value() == w.q_a_layernorm.has_value(),
              "DecodeLayerWeights: q_a_proj and q_a_layernorm together (q_lora_rank) or neither");
  TORCH_CHECK(w.gate.has_value() == w.router.has_value(), "DecodeLayerWeights: gate and router together or neither");
  TORCH_CHECK(w.shared_w13.has_value() == w.shared_w2.has_value(),
              "DecodeLayerWeights: shared_w13 and shared_w2 together or neither");
  TORCH_CHECK(w.num_heads > 0 && w.qk_nope_head_dim > 0 && w.qk_rope_head_dim > 0 && w.kv_lora_rank > 0,
              "DecodeLayerWeights: num_heads, qk_nope_head_dim, qk_rope_head_dim, kv_lora_rank must be set");
}

torch::Tensor DecodeLayer::forward(torch::Tensor x, torch::Tensor positions, torch::Tensor slot_mapping,
                                   torch::Tensor cos, torch::Tensor sin, torch::Tensor kv_cache,
                                   torch::Tensor block_tables, torch::Tensor cu_seqlens_q,
                                   torch::Tensor seq_lens) const {
  const DecodeLayerWeights& w = w_;
  const int64_t T = x.size(0), H = w.num_heads, dn = w.qk_nope_head_dim, dr = w.qk_rope_head_dim;
  const int64_t R = w.kv_lora_rank;
  const double eps = w.rms_norm_eps;
  MLA_PHASE("outside the layers");  // since the previous layer's end: Python, the LM head, sampling
  torch::Tensor h = rms_norm(x, w.input_layernorm, eps);
  MLA_PHASE("input norm");
  // the two products of h in one pass: q_a_proj (or q_proj, without a q_lora_rank) and kv_a_proj_with_mqa
  const WeightRef& wq = w.q_a_proj ? *w.q_a_proj : w.q_proj;
  torch::Tensor qf = torch::empty({T, wq.tensor.size(-2)}, x.options());
  torch::Tensor kv = torch::empty({T, w.kv_a_proj_with_mqa.tensor.size(-2)}, x.options());
  gemvs(h, {&wq, &w.kv_a_proj_with_mqa}, {qf, kv});
  if (w.q_a_proj) qf = linear(rms_norm(qf, *w.q_a_layernorm, eps), w.q_proj);
  MLA_PHASE("q_proj, kv_a_proj");
  qf = qf.view({T, H, dn + dr});
  torch::Tensor q_nope = qf.narrow(2, 0, dn), q_pe = qf.narrow(2, dn, dr);
  torch::Tensor c_kv = rms_norm(kv.narrow(1, 0, R), w.kv_a_layernorm, eps), k_pe = kv.narrow(1, R, dr);
  rope_(q_pe, positions, cos, sin, w.rope_interleave);
  rope_(k_pe.unsqueeze(1), positions, cos, sin, w.rope_interleave);
  write_latent(kv_cache, slot_mapping, c_kv, k_pe);
  MLA_PHASE("kv norm, rope, cache write");
  torch::Tensor att = mla_absorbed(q_nope, q_pe, w.w_uk, w.w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                                   w.softmax_scale, kind_);
  x = residual(x, linear(att.view({T, -1}), w.o_proj));
  MLA_PHASE("o_proj");
  h = rms_norm(x, w.post_attention_layernorm, eps);
  MLA_PHASE("post-attention norm");
  if (!w.gate) {
    x = residual(x, linear(silu_mul(linear(h, w.w13)), w.w2));
    MLA_PHASE("dense mlp");
    return x;
  }
  const auto r = route(h, *w.gate, w.e_score_correction_bias, *w.router);
  MLA_PHASE("router");
  x = residual(x, moe_decode(h, r[0], r[1], w.w13, w.w2, w.shared_w13, w.shared_w2));
  MLA_PHASE("moe sum");
  return x;
}

}  // namespace mla
