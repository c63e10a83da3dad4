"""How the model's weights are stored: WeightFormat decides it once, and each stored weight knows the kernel that
reads it (kernels.linear and kernels.moe_experts take no backend for a quantized weight).

Float weights are plain tensors in the model dtype. Weight-only quantized ones (QuantWeight), both symmetric (no
zero point):
  int8  qweight int8 [N, K], scales fp32 [N]: one scale per output channel, W ~ q * scale, q in [-127, 127].
  int4  qweight uint8 [N, Kp / 2], scales fp32 [N, Kp / 128]: one scale per group of 128 values along K (K padded
        with zeros to Kp, a multiple of 128); q in [-7, 7] stored as q + 8, two per byte: k = 2i in the low nibble,
        k = 2i + 1 in the high nibble.
A layer's routed experts are one QuantWeight with a leading expert dimension (qweight [E, N, ...]); experts[e] is
expert e's QuantWeight, a view. Every quantization is per row (int8) or per row and group (int4), so a block of
rows can be quantized on its own: the loader stores gate_proj and up_proj into the rows of one fused w13."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")
MODES = ("int8", "int4")
INT4_GROUP = 128
STORE_ROWS = 1024  # rows quantized at a time by QuantWeight.store: 8 MiB float32 temporaries at K=2048 (at 4096
# rows more stayed resident after loading V2-Lite's cut: glibc keeps freed blocks of that size in its heap)


def check_arg(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class QuantWeight:
    qweight: torch.Tensor  # int8 [(E,) N, K] | uint8 [(E,) N, Kp / 2]
    scales: torch.Tensor  # fp32 [(E,) N] | [(E,) N, Kp / group_size]
    mode: str  # "int8" | "int4"
    shape: tuple  # (N, K) of one float weight
    group_size: int  # values of K per scale: K for int8 (a whole row), 128 for int4
    backend: str = "torch"  # the kernel family that multiplies by it: "torch" | "triton"
    _experts: list | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def stacked(self) -> bool:
        return self.scales.dim() == (2 if self.mode == "int8" else 3)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def __len__(self) -> int:
        return self.qweight.shape[0]

    def __getitem__(self, e: int) -> "QuantWeight":
        """Expert e of a stacked weight: views into the stack, made once."""
        if self._experts is None:
            self._experts = [QuantWeight(self.qweight[i], self.scales[i], self.mode, self.shape, self.group_size,
                                         self.backend) for i in range(len(self))]
        return self._experts[e]

    def rows(self, start: int, end: int) -> "QuantWeight":
        """Rows start:end of one weight, as a view the loader stores a checkpoint tensor into."""
        N, K = self.shape
        return QuantWeight(self.qweight[start:end], self.scales[start:end], self.mode, (end - start, K),
                           self.group_size, self.backend)

    def store(self, w: torch.Tensor, row_absmax: torch.Tensor | None = None):
        """Quantize the float w [N, K] into this weight's storage (a view of the model's), STORE_ROWS rows at a time,
        so that the float temporaries stay small however large the weight (a 102400-row LM head). row_absmax [N]
        (int8): the largest |value| of each whole row when w holds only some of its columns (a rank's share), so
        that every rank quantizes on the scales one rank would use."""
        check_arg(tuple(w.shape) == tuple(self.shape), f"cannot store {tuple(w.shape)} into a weight of {self.shape}")
        for r in range(0, w.shape[0], STORE_ROWS):
            amax = None if row_absmax is None else row_absmax[r:r + STORE_ROWS]
            q = quantize_weight(w[r:r + STORE_ROWS], self.mode, row_absmax=amax)
            self.qweight[r:r + STORE_ROWS].copy_(q.qweight)
            self.scales[r:r + STORE_ROWS].copy_(q.scales)

    def to(self, device) -> "QuantWeight":
        return QuantWeight(self.qweight.to(device), self.scales.to(device), self.mode, self.shape, self.group_size,
                           self.backend)

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


def empty_quant(shape: tuple, mode: str, device, backend: str = "torch", experts: int | None = None) -> QuantWeight:
    """Storage for a quantized weight of float shape (N, K), or for `experts` of them stacked; filled by store()."""
    check_arg(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    N, K = shape
    lead = (experts,) if experts is not None else ()
    if mode == "int8":
        return QuantWeight(torch.empty(*lead, N, K, dtype=torch.int8, device=device),
                           torch.empty(*lead, N, dtype=torch.float32, device=device), mode, (N, K), K, backend)
    Kp = cdiv(K, INT4_GROUP) * INT4_GROUP
    return QuantWeight(torch.empty(*lead, N, Kp // 2, dtype=torch.uint8, device=device),
                       torch.empty(*lead, N, Kp // INT4_GROUP, dtype=torch.float32, device=device), mode, (N, K),
                       INT4_GROUP, backend)


def quantize_weight(w: torch.Tensor, mode: str = "int8", backend: str = "torch",
                    row_absmax: torch.Tensor | None = None) -> QuantWeight:
    """Symmetric weight-only quantization of a linear weight w [N, K], or of stacked experts w [E, N, K] each on its
    own scales (any float dtype; scales in fp32)."""
    check_arg(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    check_arg(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    check_arg(w.dim() in (2, 3) and w.is_floating_point(),
              f"w must be a float [(E,) N, K], got {w.dtype} {tuple(w.shape)}")
    if w.dim() == 3:
        out = empty_quant(tuple(w.shape[1:]), mode, w.device, backend, experts=w.shape[0])
        for e in range(w.shape[0]):
            out[e].store(w[e])
        return out
    N, K = w.shape
    wf = w.float()
    if mode == "int8":
        scales = (wf.abs().amax(dim=1) if row_absmax is None else row_absmax.float()) / 127  # [N]
        q = torch.round(wf / scales.clamp(min=1e-30)[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantWeight(q.contiguous(), scales.contiguous(), mode, (N, K), K, backend)
    G = INT4_GROUP
    Kp = cdiv(K, G) * G
    wg = F.pad(wf, (0, Kp - K)).view(N, Kp // G, G)
    scales = wg.abs().amax(dim=-1) / 7  # [N, Kp / G]
    q = torch.round(wg / scales.clamp(min=1e-30)[:, :, None]).clamp_(-7, 7).to(torch.int16) + 8  # [N, Kp/G, G]
    q = q.view(N, Kp // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)  # [N, Kp / 2]
    return QuantWeight(packed.contiguous(), scales.contiguous(), mode, (N, K), G, backend)


def quantize_experts(w: torch.Tensor, mode: str = "int8", backend: str = "torch") -> QuantWeight:
    """Stacked experts w [E, N, K], each quantized as quantize_weight does it (its own scales)."""
    check_arg(w.dim() == 3, f"w must be [E, N, K], got {tuple(w.shape)}")
    return quantize_weight(w, mode, backend)


def choose_split_k(M: int, N: int, K: int, block_m: int, block_n: int, num_sms: int,
                   unit: int = INT4_GROUP, programs_per_sm: int = 4) -> int:
    """How many ranges K is cut into. 1 when the M x N tiles alone fill the SMs; otherwise enough ranges for about
    programs_per_sm programs per SM, each range a whole number of `unit` values (a multiple of the int4 group, so
    a K tile never straddles two scales), never an empty range."""
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    if tiles >= num_sms:
        return 1
    chunks = cdiv(K, unit)
    split = min(cdiv(programs_per_sm * num_sms, tiles), chunks)
    per = cdiv(chunks, max(1, split))
    return cdiv(chunks, per)


@dataclass(frozen=True)
class WeightFormat:
    """How a model stores its weights: the model dtype and device, weight-only quantization of the linears and
    experts (None, "int8", "int4"), the kernel family that reads them, and float_dtype, the dtype of the float
    weights that are not quantized (None: the model dtype; bf16 under a float32 model keeps a bf16 checkpoint's
    values at half the bytes, and every product widens them, so the results are float32 weights'). Norms and the
    router always stay in the model dtype. Modules ask it for empty storage in its final form; the loader fills it
    tensor by tensor."""
    dtype: torch.dtype
    device: torch.device
    quant: str | None = None
    backend: str = "torch"
    float_dtype: torch.dtype | None = None

    def tensor(self, *shape) -> torch.Tensor:
        """Weights that stay in the model dtype: norms and the router."""
        return torch.empty(*shape, dtype=self.dtype, device=self.device)

    def unquantized(self, *shape) -> torch.Tensor:
        """Float weights never quantized (the embedding, kv_b_proj), and the linears when nothing is."""
        return torch.empty(*shape, dtype=self.float_dtype or self.dtype, device=self.device)

    def linear(self, N: int, K: int, experts: int | None = None):
        """A linear weight [N, K] (or `experts` of them stacked): quantized when the format says so."""
        if self.quant is None:
            return self.unquantized(*((experts,) if experts is not None else ()), N, K)
        return empty_quant((N, K), self.quant, self.device, self.backend, experts)


def stored_bytes(weights) -> int:
    """Bytes held by stored weights (float tensors and QuantWeights), each underlying tensor counted once however
    many views of it (fused rows, stacked experts, a tied head) are given."""
    roots = {}
    for w in weights:
        parts = (w.qweight, w.scales) if isinstance(w, QuantWeight) else getattr(w, "tensors", (w,))
        for t in parts:
            root = t if t._base is None else t._base
            roots[id(root)] = root.numel() * root.element_size()
    return sum(roots.values())


def store(target, w: torch.Tensor):
    """Write the checkpoint tensor w into its place in the model: a float view, a quantized weight's rows, or an
    object with copy_ that lays it out (kv_b_proj split into W_UK and W_UV)."""
    if isinstance(target, QuantWeight):
        target.store(w)
    else:
        target.copy_(w)
