"""Weight-only quantized linear layers: y = x @ W.T with W stored as int8 or int4 and dequantized on the fly.

Formats (QuantWeight), both symmetric (no zero point):
  int8  qweight int8 [N, K], scales fp32 [N]: one scale per output channel, W ~ q * scale, q in [-127, 127].
  int4  qweight uint8 [N, Kp / 2], scales fp32 [N, Kp / 128]: one scale per group of 128 values along K (K padded
        with zeros to Kp, a multiple of 128); q in [-7, 7] stored as q + 8, two per byte: k = 2i in the low nibble,
        k = 2i + 1 in the high nibble.

quant_linear(x [M, K], qw, backend) -> [M, N] in x.dtype:
  "torch"   on the CPU with M <= CPU_FAST_MAX_M (decode): torch's packed weight-only kernels
            (_weight_int8pack_mm / _weight_int4pack_mm_for_cpu) with bf16 activations, which read 1 or 0.5 bytes
            per weight instead of 4 and beat the fp32 F.linear they replace (decode is memory-bound; medians in
            the issue note); for larger M (prefill) or other devices: dequantize to x.dtype and F.linear (the
            packed kernels are slow for large M).
  "triton"  a GEMM that dequantizes tiles in registers, split-K for small M (kernels/triton_quant_linear.py).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")
MODES = ("int8", "int4")
INT4_GROUP = 128
CPU_FAST_MAX_M = 16  # up to this many rows the CPU uses the packed kernels; above, dequantize + F.linear
INT8PACK_K_ALIGN = 32  # _weight_int8pack_mm (torch 2.13, CPU) crashes or returns garbage when K % 16 != 0
INT4PACK_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu requires N % 16 == 0


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class QuantWeight:
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, Kp / 2]
    scales: torch.Tensor  # fp32 [N] | [N, Kp / group_size]
    mode: str  # "int8" | "int4"
    shape: tuple  # (N, K) of the float weight
    group_size: int  # values of K per scale: K for int8 (a whole row), 128 for int4
    _packed: dict = field(default_factory=dict, repr=False)  # CPU fast-path layouts, built on first use

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> "QuantWeight":
        return QuantWeight(self.qweight.to(device), self.scales.to(device), self.mode, self.shape, self.group_size)

    def int_values(self) -> torch.Tensor:
        """The signed integers, int8 [N, K] (int4: unpacked, padding columns included: [N, Kp])."""
        if self.mode == "int8":
            return self.qweight
        lo = (self.qweight & 0xF).to(torch.int8) - 8
        hi = (self.qweight >> 4).to(torch.int8) - 8
        return torch.stack((lo, hi), dim=-1).view(self.qweight.shape[0], -1)  # [N, Kp]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight [N, K] that the quantized one stands for (the reference of every path)."""
        N, K = self.shape
        if self.mode == "int8":
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        q = self.int_values().float().view(N, -1, self.group_size)  # [N, Kp / G, G]
        return (q * self.scales[:, :, None]).view(N, -1)[:, :K].to(dtype)


def quantize_weight(w: torch.Tensor, mode: str = "int8") -> QuantWeight:
    """Symmetric weight-only quantization of a linear weight w [N, K] (any float dtype; scales in fp32)."""
    _check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    _check(w.dim() == 2 and w.is_floating_point(), f"w must be a float [N, K], got {w.dtype} {tuple(w.shape)}")
    N, K = w.shape
    wf = w.float()
    if mode == "int8":
        scales = wf.abs().amax(dim=1) / 127  # [N]
        q = torch.round(wf / scales.clamp(min=1e-30)[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantWeight(q.contiguous(), scales.contiguous(), mode, (N, K), K)
    G = INT4_GROUP
    Kp = _cdiv(K, G) * G
    wg = F.pad(wf, (0, Kp - K)).view(N, Kp // G, G)
    scales = wg.abs().amax(dim=-1) / 7  # [N, Kp / G]
    q = torch.round(wg / scales.clamp(min=1e-30)[:, :, None]).clamp_(-7, 7).to(torch.int16) + 8  # [N, Kp/G, G]
    q = q.view(N, Kp // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)  # [N, Kp / 2]
    return QuantWeight(packed.contiguous(), scales.contiguous(), mode, (N, K), G)


@dataclass(eq=False)
class QuantExperts:
    """A layer's routed experts, weight-only quantized, stacked: qweight [E, N, K | Kp / 2] and scales [E, N | N,
    Kp / 128] for the grouped Triton MoE, and expert e as a QuantWeight of views into them (experts[e])."""
    qweight: torch.Tensor
    scales: torch.Tensor
    experts: list[QuantWeight]

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e: int) -> QuantWeight:
        return self.experts[e]

    @property
    def mode(self) -> str:
        return self.experts[0].mode

    @property
    def shape(self) -> tuple:
        """(N, K) of one expert's float weight."""
        return self.experts[0].shape


def quantize_experts(w: torch.Tensor, mode: str = "int8") -> QuantExperts:
    """Each expert of w [E, N, K] quantized as quantize_weight does it (the same scales), stored stacked."""
    _check(w.dim() == 3, f"w must be [E, N, K], got {tuple(w.shape)}")
    each = [quantize_weight(we, mode) for we in w]
    qweight = torch.stack([q.qweight for q in each])
    scales = torch.stack([q.scales for q in each])
    return QuantExperts(qweight, scales, [QuantWeight(qweight[e], scales[e], mode, q.shape, q.group_size)
                                          for e, q in enumerate(each)])


def choose_split_k(M: int, N: int, K: int, block_m: int, block_n: int, num_sms: int = 132,
                   unit: int = INT4_GROUP, programs_per_sm: int = 4) -> int:
    """How many ranges K is cut into. 1 when the M x N tiles alone fill the SMs; otherwise enough ranges for about
    programs_per_sm programs per SM, each range a whole number of `unit` values (a multiple of the int4 group, so
    a K tile never straddles two scales), never an empty range."""
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    if tiles >= num_sms:
        return 1
    chunks = _cdiv(K, unit)
    split = min(_cdiv(programs_per_sm * num_sms, tiles), chunks)
    per = _cdiv(chunks, max(1, split))
    return _cdiv(chunks, per)


def quant_linear_reference(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    return F.linear(x, qw.dequantize(x.dtype))


def _int8_cpu_pack(qw: QuantWeight):
    if "int8_cpu" not in qw._packed:
        N, K = qw.shape
        Ka = _cdiv(K, INT8PACK_K_ALIGN) * INT8PACK_K_ALIGN
        q = F.pad(qw.qweight, (0, Ka - K)).contiguous() if Ka != K else qw.qweight.contiguous()
        qw._packed["int8_cpu"] = (q, qw.scales.to(torch.bfloat16), Ka)
    return qw._packed["int8_cpu"]


def _int4_cpu_pack(qw: QuantWeight):
    if "int4_cpu" not in qw._packed:
        N, K = qw.shape
        Na = _cdiv(N, INT4PACK_N_ALIGN) * INT4PACK_N_ALIGN
        u = (qw.int_values().to(torch.int32) + 8)  # [N, Kp] in 0..15, the layout torch's packer takes
        u = F.pad(u, (0, 0, 0, Na - N), value=8)  # padding rows: q = 0
        packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        s = F.pad(qw.scales, (0, 0, 0, Na - N))  # [Na, Kp / G]
        # torch's int4 format is w = (u - 8) * scale + zero; symmetric: zero = 0
        scale_zeros = torch.stack((s, torch.zeros_like(s)), dim=-1).transpose(0, 1).contiguous()  # [Kp/G, Na, 2]
        qw._packed["int4_cpu"] = (packed, scale_zeros.to(torch.bfloat16), u.shape[1])
    return qw._packed["int4_cpu"]


def quant_linear_cpu_decode(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """Small-M CPU path: torch's packed weight-only kernels with bf16 activations (fp32 accumulation inside)."""
    N, K = qw.shape
    xb = x.to(torch.bfloat16)
    if qw.mode == "int8":
        q, s, Ka = _int8_cpu_pack(qw)
        if Ka != K:
            xb = F.pad(xb, (0, Ka - K))
        y = torch._weight_int8pack_mm(xb.contiguous(), q, s)
    else:
        packed, scale_zeros, Kp = _int4_cpu_pack(qw)
        if Kp != K:
            xb = F.pad(xb, (0, Kp - K))
        y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, qw.group_size, scale_zeros)[:, :N]
    return y.to(x.dtype)


def _has_cpu_kernels(mode: str) -> bool:
    if mode == "int8":
        return hasattr(torch, "_weight_int8pack_mm")
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def quant_linear(x: torch.Tensor, qw: QuantWeight, backend: str = "torch") -> torch.Tensor:
    """x [M, K] @ W.T for a quantized W [N, K]: [M, N] in x.dtype."""
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(isinstance(qw, QuantWeight) and qw.mode in MODES, "qw must be a QuantWeight (see quantize_weight)")
    N, K = qw.shape
    _check(x.dim() == 2 and x.shape[1] == K, f"x must be [M, K={K}], got {tuple(x.shape)}")
    _check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be float32/16 or bf16, got {x.dtype}")
    _check(x.device == qw.qweight.device == qw.scales.device, "x and the quantized weight must be on one device")
    if qw.mode == "int8":
        _check(qw.qweight.dtype == torch.int8 and tuple(qw.qweight.shape) == (N, K), "int8 qweight must be int8 [N, K]")
        _check(tuple(qw.scales.shape) == (N,) and qw.scales.dtype == torch.float32, "int8 scales must be fp32 [N]")
    else:
        Kp = _cdiv(K, qw.group_size) * qw.group_size
        _check(qw.group_size == INT4_GROUP, f"int4 group_size must be {INT4_GROUP}")
        _check(qw.qweight.dtype == torch.uint8 and tuple(qw.qweight.shape) == (N, Kp // 2),
               "int4 qweight must be uint8 [N, Kp / 2]")
        _check(tuple(qw.scales.shape) == (N, Kp // qw.group_size) and qw.scales.dtype == torch.float32,
               "int4 scales must be fp32 [N, Kp / 128]")
    if backend == "triton":
        _check(x.stride(-1) == 1 and qw.qweight.stride(-1) == 1, "x and qweight must be contiguous in their last dim")
        from . import triton_quant_linear
        return triton_quant_linear.quant_linear(x, qw)
    if x.device.type == "cpu" and 0 < x.shape[0] <= CPU_FAST_MAX_M and _has_cpu_kernels(qw.mode):
        return quant_linear_cpu_decode(x, qw)
    return quant_linear_reference(x, qw)
