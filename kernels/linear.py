"""linear(x, w, backend): x @ w.T for every weight the model holds, float or weight-only quantized (QuantWeight).

On the CPU, the few rows of a decode step take their own path: there, streaming the weight from memory is the whole
cost, and MKL streams it slowly. Its one-row product (gemv) runs on one core (about 16 GB/s on this 2-core EPYC, of
about 30 GB/s that two cores read), and its gemm for 2..16 rows with x as the left operand reaches 5-8 GB/s. So the
weight's rows are cut into pieces and the product runs as one batched w_piece @ x.T: torch spreads the pieces over
its threads (one row: 30 GB/s), and the large operand on the left is the gemm MKL runs well (2..4 rows: 11-17 GB/s
instead of 5-8). Measured with 2 threads on 2048-wide fp32 weights of 2816 to 102400 rows (V2-Lite's experts,
MLP and LM head)."""
import torch
import torch.nn.functional as F

from .weight_quant import QuantWeight, quant_linear

MAX_M = 16  # rows up to which the CPU takes this path; above, F.linear's gemm is the better one


def linear(x: torch.Tensor, w, backend: str = "torch") -> torch.Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in x.dtype."""
    if isinstance(w, QuantWeight):
        return quant_linear(x, w, backend=backend)
    if x.device.type == "cpu" and 0 < x.shape[0] <= MAX_M:
        return _cpu_few_rows(x, w)
    return F.linear(x, w)


def _cpu_few_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    (N, K), M = w.shape, x.shape[0]
    if not w.is_contiguous():  # pieces are views of the weight's rows
        return torch.mm(w, x.t()).t().contiguous()
    threads = torch.get_num_threads()
    pieces = next((p for p in (2 * threads, threads) if N % p == 0), 1)
    y = torch.bmm(w.view(pieces, N // pieces, K), x.t().expand(pieces, K, M))  # [pieces, N / pieces, M]
    return y.view(N, M).t().contiguous()
