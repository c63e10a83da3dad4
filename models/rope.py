"""RoPE with DeepSeek's YaRN scaling, applied to q_pe and the shared k_pe."""
import math

import torch

from .config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if cfg.rope_factor <= 1.0:
        return extrapolation
    interpolation = 1.0 / (cfg.rope_factor * pos_freqs)

    def correction_dim(num_rotations):
        return dim * math.log(cfg.rope_original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the frequency is extrapolated (high frequencies), 0 where interpolated
    return interpolation * (1 - keep) + extrapolation * keep


# The least table reserved at once: growing it moves the tables (a captured CUDA graph would keep the old ones), so
# short contexts still reserve a few thousand positions.
MIN_RESERVED_POSITIONS = 4096


class RotaryEmbedding:
    """cos/sin tables for positions 0..n-1, computed in float32. The caller reserves the positions it will use
    (host-side, before the forward pass), so rotating never reads a device value back: no sync, and a captured
    CUDA graph keeps pointing at tables that stay put."""

    def __init__(self, cfg: ModelConfig, device):
        self.interleave = cfg.rope_interleave
        self.inv_freq = yarn_inv_freq(cfg).to(device)
        # YaRN scales cos/sin by mscale / mscale_all_dim (1.0 for the published checkpoints)
        self.attention_factor = 1.0
        if cfg.rope_factor > 1.0:
            if cfg.rope_mscale and cfg.rope_mscale_all_dim:
                self.attention_factor = yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(
                    cfg.rope_factor, cfg.rope_mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(cfg.rope_factor)
        self.cos = self.sin = torch.empty(0, device=device)

    def reserve(self, n: int):
        """Make positions 0..n-1 available."""
        if n <= self.cos.shape[0]:
            return
        n = max(n, 2 * self.cos.shape[0], MIN_RESERVED_POSITIONS)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        self.cos = torch.cos(freqs) * self.attention_factor  # [n, rope_dim / 2]
        self.sin = torch.sin(freqs) * self.attention_factor

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, ops) -> torch.Tensor:
        """Rotate x [T, N, rope_dim] in place by the angles of positions [T] (all below the reserved count)."""
        return ops.rope_(x, positions, self.cos, self.sin, self.interleave)
