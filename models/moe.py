"""DeepSeek MoE: router (greedy, group-limited greedy, noaux_tc), routed experts grouped by expert, shared experts."""
import torch
import torch.nn.functional as F

import kernels
from kernels import WeightFormat

from .config import ModelConfig
from .layers import fused_rows, silu_mlp


class MoE:
    def __init__(self, cfg: ModelConfig, fmt: WeightFormat):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg, self.backend = cfg, fmt.backend
        self.gate = fmt.tensor(E, D)  # the router stays in the model dtype (it runs in float32)
        self.e_score_correction_bias = torch.zeros(E, dtype=torch.float32, device=fmt.device)
        self.w13 = fmt.linear(2 * I, D, experts=E)  # per expert [gate_proj; up_proj]
        self.w2 = fmt.linear(D, I, experts=E)  # per expert down_proj
        Is = I * cfg.n_shared_experts
        self.shared_w13 = fmt.linear(2 * Is, D) if Is else None
        self.shared_w2 = fmt.linear(D, Is) if Is else None

    def weights(self) -> dict:
        cfg, I = self.cfg, self.cfg.moe_intermediate_size
        w = {"gate.weight": self.gate}
        if cfg.topk_method == "noaux_tc":
            w["gate.e_score_correction_bias"] = self.e_score_correction_bias
        for e in range(cfg.n_routed_experts):
            w[f"experts.{e}.gate_proj.weight"], w[f"experts.{e}.up_proj.weight"] = fused_rows(self.w13[e], I)
            w[f"experts.{e}.down_proj.weight"] = self.w2[e]
        if self.shared_w13 is not None:
            gate, up = fused_rows(self.shared_w13, I * cfg.n_shared_experts)
            w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"] = gate, up
            w["shared_experts.down_proj.weight"] = self.shared_w2
        return w

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] (float32), as DeepSeek's gate computes them."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.float())  # [T, E]
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.view(x.shape[0], cfg.n_group, -1)
            # V2 ranks groups by their best expert, V3 (noaux_tc) by the sum of its best two
            group_score = grouped.amax(-1) if cfg.topk_method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(cfg.topk_group, -1)[1], True)
            choice = choice.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, -1)[1]
        weights = scores.gather(1, ids)
        if cfg.arch == "deepseek_v2" and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # V2: normalised weights are not rescaled
        else:
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * cfg.routed_scaling_factor
        return ids, weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = kernels.moe_experts(x, ids, weights, self.w13, self.w2, backend=self.backend)
        if self.shared_w13 is not None:
            out = out + silu_mlp(x, self.shared_w13, self.shared_w2)
        return out
