// The Python module of the CPU kernels: the entry points and the typed boundary of cpu_kernels.h, and nothing else.
// Structs are bound field by field under their C++ names, which are the Python dataclasses' (kernels/cpu.py
// DecodeLayerWeights, kernels.moe.Router), so that kernels/cpu.py converts a dataclass by its field names and a name
// missing on either side fails at that conversion, once, when the engine starts.
#include <pybind11/stl.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mla;
  py::class_<WeightRef>(m, "WeightRef")
      .def(py::init([](torch::Tensor tensor, std::optional<torch::Tensor> scales, int64_t K, bool int4) {
             return WeightRef{std::move(tensor), std::move(scales), K, int4};
           }),
           py::kw_only(), py::arg("tensor"), py::arg("scales"), py::arg("K"), py::arg("int4"))
      .def_readonly("tensor", &WeightRef::tensor)
      .def_readonly("scales", &WeightRef::scales)
      .def_readonly("K", &WeightRef::K)
      .def_readonly("int4", &WeightRef::int4);

  py::enum_<TopkMethod>(m, "TopkMethod")
      .value("greedy", TopkMethod::greedy)
      .value("group_limited_greedy", TopkMethod::group_limited_greedy)
      .value("noaux_tc", TopkMethod::noaux_tc);
  py::enum_<Scoring>(m, "Scoring").value("softmax", Scoring::softmax).value("sigmoid", Scoring::sigmoid);
  py::class_<Router>(m, "Router")
      .def(py::init<>())
      .def_readwrite("top_k", &Router::top_k)
      .def_readwrite("scoring", &Router::scoring)
      .def_readwrite("method", &Router::method)
      .def_readwrite("n_group", &Router::n_group)
      .def_readwrite("topk_group", &Router::topk_group)
      .def_readwrite("norm", &Router::norm)
      .def_readwrite("scale", &Router::scale);

  py::enum_<CacheKind>(m, "CacheKind")
      .value("FLOAT32", CacheKind::FLOAT32)
      .value("BFLOAT16", CacheKind::BFLOAT16)
      .value("INT8_BF16_ROPE", CacheKind::INT8_BF16_ROPE)
      .value("INT8_FP32_ROPE", CacheKind::INT8_FP32_ROPE);

  py::class_<DecodeLayerWeights>(m, "DecodeLayerWeights")
      .def(py::init<>())
      .def_readwrite("input_layernorm", &DecodeLayerWeights::input_layernorm)
      .def_readwrite("post_attention_layernorm", &DecodeLayerWeights::post_attention_layernorm)
      .def_readwrite("q_proj", &DecodeLayerWeights::q_proj)
      .def_readwrite("q_a_proj", &DecodeLayerWeights::q_a_proj)
      .def_readwrite("q_a_layernorm", &DecodeLayerWeights::q_a_layernorm)
      .def_readwrite("kv_a_proj_with_mqa", &DecodeLayerWeights::kv_a_proj_with_mqa)
      .def_readwrite("kv_a_layernorm", &DecodeLayerWeights::kv_a_layernorm)
      .def_readwrite("w_uk", &DecodeLayerWeights::w_uk)
      .def_readwrite("w_uv", &DecodeLayerWeights::w_uv)
      .def_readwrite("o_proj", &DecodeLayerWeights::o_proj)
      .def_readwrite("w13", &DecodeLayerWeights::w13)
      .def_readwrite("w2", &DecodeLayerWeights::w2)
      .def_readwrite("gate", &DecodeLayerWeights::gate)
      .def_readwrite("e_score_correction_bias", &DecodeLayerWeights::e_score_correction_bias)
      .def_readwrite("router", &DecodeLayerWeights::router)
      .def_readwrite("shared_w13", &DecodeLayerWeights::shared_w13)
      .def_readwrite("shared_w2", &DecodeLayerWeights::shared_w2)
      .def_readwrite("num_heads", &DecodeLayerWeights::num_heads)
      .def_readwrite("qk_nope_head_dim", &DecodeLayerWeights::qk_nope_head_dim)
      .def_readwrite("qk_rope_head_dim", &DecodeLayerWeights::qk_rope_head_dim)
      .def_readwrite("kv_lora_rank", &DecodeLayerWeights::kv_lora_rank)
      .def_readwrite("rms_norm_eps", &DecodeLayerWeights::rms_norm_eps)
      .def_readwrite("softmax_scale", &DecodeLayerWeights::softmax_scale)
      .def_readwrite("rope_interleave", &DecodeLayerWeights::rope_interleave);
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<DecodeLayerWeights, CacheKind>(), py::arg("weights"), py::arg("kind"))
      .def("forward", &DecodeLayer::forward, py::arg("x"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("cos"), py::arg("sin"), py::arg("kv_cache"), py::arg("block_tables"), py::arg("cu_seqlens_q"),
           py::arg("seq_lens"));

  m.def("quantize_rows", &quantize_rows);
  m.def("gemv", &gemv);
  m.def("stream_sum", &stream_sum);
  m.def("moe_decode", &moe_decode);
  m.def("dequantize", &dequantize);
  m.def("quantize_tokens", &quantize_tokens);
  m.def("requantize_rows", &requantize_rows);
  m.def("scale_int32", &scale_int32);
  m.def("moe_prompt", &moe_prompt);
  m.def("mla_decode", &mla_decode);
  m.def("mla_absorbed", &mla_absorbed);
  m.def("rms_norm", &rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_mul", &silu_mul);
  m.def("route", &route);
  m.def("write_latent", &write_latent);
  m.def("has_avx512", &has_avx512);
#ifdef MLA_PHASE_TIMES
  m.def("phase_times", &phase_times);
#endif
}
