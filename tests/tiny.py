"""Tiny DeepSeek checkpoints written by transformers at test time, and a tokenizer built with `tokenizers`."""

import torch

WORDS = ("the a of to and in is it for on that with as was by this are be from or at an not have which one "
         "function returns value list string file object data type name error default class module path "
         "number time set key argument").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def v2_lite_attention(**over):
    """DeepSeek-V2-Lite attention dims (16 heads, 512 + 64 latent, 128 nope, 128 v), q_lora_rank null, greedy routing."""
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=512,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(over)
    return "v2", cfg


def v2_qlora(**over):
    """q_lora_rank set, group-limited greedy routing, normalised top-k, YaRN with mscale != mscale_all_dim."""
    cfg = dict(vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
               first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               norm_topk_prob=False, routed_scaling_factor=1.5, max_position_embeddings=512,
               rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(over)
    return "v2", cfg


def v3_noaux(**over):
    """DeepSeek-V3 style: sigmoid scores, noaux_tc with a correction bias, grouped, normalised and scaled."""
    cfg = dict(vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
               first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
               max_position_embeddings=512, rope_interleave=True,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(over)
    return "v3", cfg


def make_tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyz.,!?'0123456789":
        vocab.setdefault(c, len(vocab))
    vocab["<unk>"] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_checkpoint(path: str, spec, seed: int = 0, shard_size: str | None = "200KB", tokenizer: bool = True,
                    dtype=torch.float32):
    """Writes a random-weight checkpoint with transformers' save_pretrained (the published tensor names)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
    kind, cfg = spec
    torch.manual_seed(seed)
    if kind == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**cfg))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
        # a non-zero correction bias, so that noaux_tc's use of it is tested
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    with torch.no_grad():  # larger weights than the default init, so that routing and attention are far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model = model.to(dtype).eval()
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        make_tokenizer(path, cfg["vocab_size"])
    return model


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
