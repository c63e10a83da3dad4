"""Triton scatter of the new tokens' [c_kv | k_pe] rows into the paged latent cache, quantizing on the way.

Grid: one program per new token. The latent and the rope values go through separate views (for a float cache,
two slices of one row; for a packed cache, the int8/fp8 latent, its float32 scales and the k_pe bytes of one
uint8 row), each loaded as one power-of-two tile with a mask, so widths like 512 + 64 need no 1024-wide tile."""
import torch
import triton
import triton.language as tl

from .triton_common import pow2


@triton.jit
def _write_latent_kernel(lat, scl, rope, slot_mapping, c_kv, k_pe,
                         s_lb, s_ls, s_sb, s_ss, s_rb, s_rs, s_ct, s_pt, block_size, R, DR, qmax,
                         BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, NUM_SCALES: tl.constexpr,
                         ROUND: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        blk = slot // block_size
        off = slot % block_size
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_DR)
        r_ok = offs_r < R
        c = tl.load(c_kv + t.to(tl.int64) * s_ct + offs_r, mask=r_ok, other=0.0)
        p = tl.load(k_pe + t.to(tl.int64) * s_pt + offs_d, mask=offs_d < DR)
        if NUM_SCALES == 0:
            tl.store(lat + blk * s_lb + off * s_ls + offs_r, c.to(lat.dtype.element_ty), mask=r_ok)
        else:
            x = c.to(tl.float32)
            group = offs_r // (R // NUM_SCALES)
            scale = tl.zeros([BLOCK_R], tl.float32)
            for g in tl.static_range(NUM_SCALES):  # absmax per group of R / NUM_SCALES values
                in_g = (group == g) & r_ok
                # div_rn: IEEE division as torch's (a GPU's default float32 division is approximate), so that
                # both backends store the same scale and the same quantized bytes
                s_g = tl.math.div_rn(tl.max(tl.where(in_g, tl.abs(x), 0.0), 0), qmax)
                s_g = tl.where(s_g > 0, s_g, 1.0)
                tl.store(scl + blk * s_sb + off * s_ss + g, s_g)
                scale = tl.where(in_g, s_g, scale)
            y = tl.math.div_rn(x, tl.where(r_ok, scale, 1.0))
            if ROUND == 1:  # int8: round half up and clamp
                y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -qmax), qmax)
            elif ROUND == 2:
                # fp8 e4m3, written as its bits (the latent is passed as uint8): sm_80 has no fp8 conversion, and
                # Triton's interpreter (3.9) gets the conversion's rounding carry wrong (127.9 -> 64). The bytes are
                # torch's float8_e4m3fn conversion's: round the magnitude onto the grid (3 mantissa bits, subnormal
                # step 2^-9) to nearest, ties to even, then take exponent and the top three mantissa bits from the
                # rounded float32's bits, and the sign from the unrounded value's (a negative that rounds to zero is
                # -0, 0x80). Exponent and step come from the bits too: an approximate log2 / exp2 could pick the
                # neighbouring binade's step.
                f = y.to(tl.int32, bitcast=True)
                e = tl.maximum(((f >> 23) & 0xFF) - 127, -6)  # y's binade; e4m3's subnormals share 2^-6's step
                v = tl.abs(y) * ((130 - e) << 23).to(tl.float32, bitcast=True)  # |y| / 2^(e - 3), exact
                r = tl.floor(v + 0.5)
                r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # a tie: to even
                m = r * ((e + 124) << 23).to(tl.float32, bitcast=True)  # times 2^(e - 3), exact
                fm = m.to(tl.int32, bitcast=True)
                ex = ((fm >> 23) & 0xFF) - 127  # the rounded value's own binade (rounding may carry into the next)
                normal = (((ex + 7) << 3) | ((fm >> 20) & 7)) & 0x7F
                sub = (m * 512.0).to(tl.int32)  # below 2^-6: multiples of 2^-9
                y = tl.where(ex < -6, sub, normal) | tl.where(f < 0, 0x80, 0)
            tl.store(lat + blk * s_lb + off * s_ls + offs_r, y.to(lat.dtype.element_ty), mask=r_ok)
        tl.store(rope + blk * s_rb + off * s_rs + offs_d, p.to(rope.dtype.element_ty), mask=offs_d < DR)


def write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt):
    T, R = c_kv.shape
    DR = k_pe.shape[1]
    if T == 0:
        return
    lat, scl, rope = fmt.views(kv_cache)
    if fmt.name == "fp8":
        lat = lat.view(torch.uint8)  # the kernel writes the e4m3 bits itself
    scl = kv_cache if scl is None else scl  # a float cache has no scales: any pointer, never written
    _write_latent_kernel[(T,)](lat, scl, rope, slot_mapping, c_kv, k_pe,
                               lat.stride(0), lat.stride(1), scl.stride(0), scl.stride(1), rope.stride(0),
                               rope.stride(1), c_kv.stride(0), k_pe.stride(0), kv_cache.shape[1], R, DR, fmt.qmax,
                               BLOCK_R=pow2(R, 1), BLOCK_DR=pow2(DR, 1), NUM_SCALES=fmt.num_scales,
                               ROUND={"int8": 1, "fp8": 2}.get(fmt.name, 0), num_warps=4)
