"""DeepSeek MoE: router (greedy, group-limited greedy, noaux_tc), routed experts grouped by expert, shared experts."""
import torch

from kernels import Router, WeightFormat

from .config import ModelConfig
from .layers import DenseMLP, fused_rows
from .parallel import Parallel


class MoE:
    def __init__(self, cfg: ModelConfig, fmt: WeightFormat, par: Parallel = Parallel()):
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.e0, e1 = par.span(cfg.n_routed_experts, "n_routed_experts")  # this rank's whole experts
        E = e1 - self.e0
        self.cfg, self.par = cfg, par
        self.gate = fmt.tensor(cfg.n_routed_experts, D)  # the router: every rank routes every token (its scores in float32)
        self.e_score_correction_bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32, device=fmt.device)
        self.w13 = fmt.linear(2 * I, D, experts=E)  # per expert [gate_proj; up_proj]
        self.w2 = fmt.linear(D, I, experts=E)  # per expert down_proj
        # V2 does not rescale weights it normalised (with more than one expert per token); V3 always rescales
        v2_norm = cfg.arch == "deepseek_v2" and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
        self.router = Router(top_k=cfg.num_experts_per_tok, scoring=cfg.scoring_func, method=cfg.topk_method,
                             n_group=cfg.n_group, topk_group=cfg.topk_group, norm=cfg.norm_topk_prob,
                             scale=1.0 if v2_norm else cfg.routed_scaling_factor)
        Is = I * cfg.n_shared_experts
        self.shared = DenseMLP(cfg, fmt, par, Is, "moe_intermediate_size * n_shared_experts") if Is else None

    def weights(self) -> dict:
        cfg, I = self.cfg, self.cfg.moe_intermediate_size
        w = {"gate.weight": self.gate}
        if cfg.topk_method == "noaux_tc":
            w["gate.e_score_correction_bias"] = self.e_score_correction_bias
        for e in range(cfg.n_routed_experts):
            local = e - self.e0
            mine = 0 <= local < len(self.w13)
            gate, up = fused_rows(self.w13[local], I) if mine else (None, None)  # None: another rank's expert
            w[f"experts.{e}.gate_proj.weight"], w[f"experts.{e}.up_proj.weight"] = gate, up
            w[f"experts.{e}.down_proj.weight"] = self.w2[local] if mine else None
        if self.shared is not None:
            w.update({f"shared_experts.{k}": v for k, v in self.shared.weights().items()})
        return w

    def __call__(self, x: torch.Tensor, ops) -> torch.Tensor:
        ids, weights = ops.route(x, self.gate, self.e_score_correction_bias, self.router)  # [T, k] each
        if self.par.size == 1:  # routed and shared experts in one call (one C++ call in a CPU decode step)
            shared = (self.shared.w13, self.shared.w2) if self.shared is not None else None
            return ops.moe(x, ids, weights, self.w13, self.w2, shared)
        # the (token, expert) pairs of this rank's experts, each as a token of its own
        t, j = ((ids >= self.e0) & (ids < self.e0 + len(self.w13))).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if t.numel():
            y = ops.moe(x[t], (ids[t, j] - self.e0)[:, None], weights[t, j][:, None], self.w13, self.w2)
            out.index_add_(0, t, y)
        if self.shared is not None:
            out = out + self.shared.partial(x, ops)
        return self.par.all_reduce(out)
