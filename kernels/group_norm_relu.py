"""Fused GroupNorm + ReLU for 4-D activations, forward and backward, in Triton.

Layout of this file: forward kernel, backward kernel, host wrappers, torch.library ops,
autograd Function, functional entry point, nn.Module.

Math, per sample n and group g over its M = (C/G)*H*W elements:
    mean, rstd = 1/sqrt(var + eps)            (biased variance, accumulated in fp32)
    xhat = (x - mean) * rstd;  y = relu(xhat * w_c + b_c)
Backward, with dy' = dy * (xhat * w_c + b_c > 0) and dxhat = dy' * w_c:
    db_c = sum_{n,h,w} dy';  dw_c = sum_{n,h,w} dy' * xhat
    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))

One program handles one (n, g) and walks the group in [BLOCK_C, BLOCK_HW] tiles, so any group
size works. Tensors are indexed through their strides (NCHW, channels_last, or anything else),
so outputs keep the input's memory format and nothing is copied to make it contiguous.
The backward pass saves x (not the normalized tensor) and recomputes xhat and the ReLU mask.
dw/db are written as per-sample partials [N, C] and summed afterwards: deterministic, no atomics.

Set FASTCIFAR_KERNELS_DISABLE=1 to force the plain torch path everywhere.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or a broken install: the torch path still works
    triton = None

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile sizes in elements. Not timed on a GPU yet; chosen from ptxas register counts for sm_90 (about
# 30-90 registers per thread on the model's shapes, no spills). A group of up to _ONE_TILE_MAX
# elements is loaded once and kept in registers; larger groups are walked twice (stats, then apply).
_ONE_TILE_MAX = 4096
_LOOP_TILE = 2048


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _hw_offsets(hw, width, s_h, s_w, FLAT_HW: tl.constexpr):
        # NCHW and channels_last both step H*W with one stride; only odd layouts pay for div/mod
        if FLAT_HW:
            return hw * s_w
        else:
            return (hw // width) * s_h + (hw % width) * s_w

    @triton.jit
    def _gn_relu_fwd_kernel(
        X, Y, W, B, MEAN, RSTD,
        HW, width, cpg, G, eps,
        sx_n, sx_c, sx_h, sx_w,
        sy_n, sy_c, sy_h, sy_w,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, FLAT_HW: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // G
        c0 = (pid % G) * cpg
        # int64 base offsets: N*C*H*W may exceed 2**31 even when one sample does not
        x_base = X + n.to(tl.int64) * sx_n + c0.to(tl.int64) * sx_c
        y_base = Y + n.to(tl.int64) * sy_n + c0.to(tl.int64) * sy_c
        cs = tl.arange(0, BLOCK_C)[:, None]
        hws = tl.arange(0, BLOCK_HW)[None, :]
        count = cpg * HW * 1.0  # cpg or HW may arrive as constexpr 1, so no .to()

        if ONE_TILE:
            mask = (cs < cpg) & (hws < HW)
            x = tl.load(x_base + cs * sx_c + _hw_offsets(hws, width, sx_h, sx_w, FLAT_HW),
                        mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x) / count
            d = tl.where(mask, x - mean, 0.0)
            var = tl.sum(d * d) / count
            rstd = 1.0 / tl.sqrt(var + eps)
            y = d * rstd
            if HAS_W:
                y = y * tl.load(W + c0 + cs, mask=cs < cpg, other=1.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c0 + cs, mask=cs < cpg, other=0.0).to(tl.float32)
            y = tl.maximum(y, 0.0)
            tl.store(y_base + cs * sy_c + _hw_offsets(hws, width, sy_h, sy_w, FLAT_HW),
                     y.to(Y.dtype.element_ty), mask=mask)
        else:
            # Chan's merge of per-tile (count, mean, M2): sum/sum-of-squares would cancel in fp32
            n_a = 0.0
            mean_a = 0.0
            m2_a = 0.0
            for c_start in range(0, cpg, BLOCK_C):
                cmask = (c_start + cs) < cpg
                x_c = x_base + (c_start + cs) * sx_c
                for hw_start in range(0, HW, BLOCK_HW):
                    mask = cmask & ((hw_start + hws) < HW)
                    x = tl.load(x_c + _hw_offsets(hw_start + hws, width, sx_h, sx_w, FLAT_HW),
                                mask=mask, other=0.0).to(tl.float32)
                    n_b = (tl.minimum(cpg - c_start, BLOCK_C) * tl.minimum(HW - hw_start, BLOCK_HW)).to(tl.float32)
                    mean_b = tl.sum(x) / n_b
                    d = tl.where(mask, x - mean_b, 0.0)
                    m2_b = tl.sum(d * d)
                    delta = mean_b - mean_a
                    n_ab = n_a + n_b
                    mean_a = mean_a + delta * (n_b / n_ab)
                    m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)
                    n_a = n_ab
            mean = mean_a
            rstd = 1.0 / tl.sqrt(m2_a / count + eps)
            for c_start in range(0, cpg, BLOCK_C):
                cmask = (c_start + cs) < cpg
                x_c = x_base + (c_start + cs) * sx_c
                y_c = y_base + (c_start + cs) * sy_c
                if HAS_W:
                    w = tl.load(W + c0 + c_start + cs, mask=cmask, other=1.0).to(tl.float32)
                if HAS_B:
                    b = tl.load(B + c0 + c_start + cs, mask=cmask, other=0.0).to(tl.float32)
                for hw_start in range(0, HW, BLOCK_HW):
                    mask = cmask & ((hw_start + hws) < HW)
                    x = tl.load(x_c + _hw_offsets(hw_start + hws, width, sx_h, sx_w, FLAT_HW),
                                mask=mask, other=0.0).to(tl.float32)
                    y = (x - mean) * rstd
                    if HAS_W:
                        y = y * w
                    if HAS_B:
                        y = y + b
                    y = tl.maximum(y, 0.0)
                    tl.store(y_c + _hw_offsets(hw_start + hws, width, sy_h, sy_w, FLAT_HW),
                             y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)

# ---------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gn_relu_bwd_kernel(
        X, DY, DX, W, B, MEAN, RSTD, DWP, DBP,
        C, HW, width, cpg, G,
        sx_n, sx_c, sx_h, sx_w,
        sd_n, sd_c, sd_h, sd_w,
        sg_n, sg_c, sg_h, sg_w,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
        COMPUTE_DX: tl.constexpr, FLAT_HW: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // G
        c0 = (pid % G) * cpg
        x_base = X + n.to(tl.int64) * sx_n + c0.to(tl.int64) * sx_c
        dy_base = DY + n.to(tl.int64) * sd_n + c0.to(tl.int64) * sd_c
        dx_base = DX + n.to(tl.int64) * sg_n + c0.to(tl.int64) * sg_c
        part = n.to(tl.int64) * C + c0  # row of the [N, C] dw/db partials
        cs = tl.arange(0, BLOCK_C)[:, None]
        hws = tl.arange(0, BLOCK_HW)[None, :]
        count = cpg * HW * 1.0  # cpg or HW may arrive as constexpr 1, so no .to()
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)

        if ONE_TILE:
            cmask = cs < cpg
            mask = cmask & (hws < HW)
            x = tl.load(x_base + cs * sx_c + _hw_offsets(hws, width, sx_h, sx_w, FLAT_HW),
                        mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + cs * sd_c + _hw_offsets(hws, width, sd_h, sd_w, FLAT_HW),
                         mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            pre = xhat
            if HAS_W:
                w = tl.load(W + c0 + cs, mask=cmask, other=1.0).to(tl.float32)
                pre = pre * w
            if HAS_B:
                pre = pre + tl.load(B + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            # the mask is recomputed from x exactly as the forward computed y
            gy = tl.where(mask & (pre > 0.0), dy, 0.0)
            db_c = tl.sum(gy, axis=1, keep_dims=True)
            dw_c = tl.sum(gy * xhat, axis=1, keep_dims=True)
            if STORE_DB:
                tl.store(DBP + part + cs, db_c, mask=cmask)
            if STORE_DW:
                tl.store(DWP + part + cs, dw_c, mask=cmask)
            if COMPUTE_DX:
                if HAS_W:
                    s1 = tl.sum(db_c * w) / count
                    s2 = tl.sum(dw_c * w) / count
                    dx = (gy * w - s1 - xhat * s2) * rstd
                else:
                    s1 = tl.sum(db_c) / count
                    s2 = tl.sum(dw_c) / count
                    dx = (gy - s1 - xhat * s2) * rstd
                tl.store(dx_base + cs * sg_c + _hw_offsets(hws, width, sg_h, sg_w, FLAT_HW),
                         dx.to(DX.dtype.element_ty), mask=mask)
        else:
            # pass 1: per-channel sums of dy' and dy'*xhat; the group sums follow from them
            s1 = 0.0
            s2 = 0.0
            for c_start in range(0, cpg, BLOCK_C):
                cmask = (c_start + cs) < cpg
                x_c = x_base + (c_start + cs) * sx_c
                dy_c = dy_base + (c_start + cs) * sd_c
                if HAS_W:
                    w = tl.load(W + c0 + c_start + cs, mask=cmask, other=1.0).to(tl.float32)
                if HAS_B:
                    b = tl.load(B + c0 + c_start + cs, mask=cmask, other=0.0).to(tl.float32)
                db_c = tl.zeros([BLOCK_C, 1], dtype=tl.float32)
                dw_c = tl.zeros([BLOCK_C, 1], dtype=tl.float32)
                for hw_start in range(0, HW, BLOCK_HW):
                    mask = cmask & ((hw_start + hws) < HW)
                    x = tl.load(x_c + _hw_offsets(hw_start + hws, width, sx_h, sx_w, FLAT_HW),
                                mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_c + _hw_offsets(hw_start + hws, width, sd_h, sd_w, FLAT_HW),
                                 mask=mask, other=0.0).to(tl.float32)
                    xhat = (x - mean) * rstd
                    pre = xhat
                    if HAS_W:
                        pre = pre * w
                    if HAS_B:
                        pre = pre + b
                    gy = tl.where(mask & (pre > 0.0), dy, 0.0)
                    db_c += tl.sum(gy, axis=1, keep_dims=True)
                    dw_c += tl.sum(gy * xhat, axis=1, keep_dims=True)
                if STORE_DB:
                    tl.store(DBP + part + c_start + cs, db_c, mask=cmask)
                if STORE_DW:
                    tl.store(DWP + part + c_start + cs, dw_c, mask=cmask)
                if HAS_W:
                    s1 += tl.sum(db_c * w)
                    s2 += tl.sum(dw_c * w)
                else:
                    s1 += tl.sum(db_c)
                    s2 += tl.sum(dw_c)
            # pass 2: dx; x and dy are read again (from L2 when the group is small enough)
            if COMPUTE_DX:
                s1 = s1 / count
                s2 = s2 / count
                for c_start in range(0, cpg, BLOCK_C):
                    cmask = (c_start + cs) < cpg
                    x_c = x_base + (c_start + cs) * sx_c
                    dy_c = dy_base + (c_start + cs) * sd_c
                    dx_c = dx_base + (c_start + cs) * sg_c
                    if HAS_W:
                        w = tl.load(W + c0 + c_start + cs, mask=cmask, other=1.0).to(tl.float32)
                    if HAS_B:
                        b = tl.load(B + c0 + c_start + cs, mask=cmask, other=0.0).to(tl.float32)
                    for hw_start in range(0, HW, BLOCK_HW):
                        mask = cmask & ((hw_start + hws) < HW)
                        x = tl.load(x_c + _hw_offsets(hw_start + hws, width, sx_h, sx_w, FLAT_HW),
                                    mask=mask, other=0.0).to(tl.float32)
                        dy = tl.load(dy_c + _hw_offsets(hw_start + hws, width, sd_h, sd_w, FLAT_HW),
                                     mask=mask, other=0.0).to(tl.float32)
                        xhat = (x - mean) * rstd
                        pre = xhat
                        if HAS_W:
                            pre = pre * w
                        if HAS_B:
                            pre = pre + b
                        gy = tl.where(mask & (pre > 0.0), dy, 0.0)
                        if HAS_W:
                            gy = gy * w
                        dx = (gy - s1 - xhat * s2) * rstd
                        tl.store(dx_c + _hw_offsets(hw_start + hws, width, sg_h, sg_w, FLAT_HW),
                                 dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host wrappers (launch the kernels; no autograd here)
# ---------------------------------------------------------------------------------------------
def _empty_like(x):
    # preserve_format: a dense NCHW or channels_last input gets an output with the same strides
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _hw_strides(t):
    """(s_n, s_c, s_h, s_w, flat): flat when one stride steps through H*W in order."""
    _, _, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    if W == 1:
        return sn, sc, sh, sh, True
    if H == 1:
        return sn, sc, sw, sw, True
    return sn, sc, sh, sw, sh == W * sw


def _blocks(cpg, hw, blocks=None, channels_fast=False):
    """(BLOCK_C, BLOCK_HW, ONE_TILE, num_warps); `blocks` forces the tile (tests use it).

    channels_fast: channel stride 1 (channels_last), so tiles span many channels; otherwise tiles
    run along H*W (NCHW), where wide channel blocks cost registers and buy no contiguity.
    """
    p2 = triton.next_power_of_2
    if blocks is not None:
        bc, bhw = blocks
        one = bc >= cpg and bhw >= hw
    elif p2(cpg) * p2(hw) <= _ONE_TILE_MAX:
        bc, bhw, one = p2(cpg), p2(hw), True
    elif channels_fast:
        bc = min(p2(cpg), 32)
        bhw, one = min(p2(hw), _LOOP_TILE // bc), False
    else:
        bhw = min(p2(hw), _LOOP_TILE)
        bc, one = min(p2(cpg), max(1, _LOOP_TILE // bhw), 4), False
    bhw = max(bhw, 16 // bc)  # keep at least 16 lanes per tile
    num_warps = 16 if bc * bhw >= 4096 else 8 if bc * bhw >= 2048 else 4
    return bc, bhw, one, num_warps


def _check_args(x, num_groups, weight, bias):
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"group_norm_relu expects a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups != 0:
        raise ValueError(f"num_channels ({C}) must be divisible by num_groups ({num_groups})")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(p.shape)}")


def _forward(x, num_groups, weight=None, bias=None, eps=1e-5, out=None, blocks=None):
    """Run the forward kernel; returns (y, mean, rstd) with mean/rstd fp32 of shape [N, G]."""
    N, C, H, W = x.shape
    G = num_groups
    cpg, hw = C // G, H * W
    y = _empty_like(x) if out is None else out
    mean = _empty((N, G), torch.float32, x.device)
    rstd = _empty((N, G), torch.float32, x.device)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    sx, sy = _hw_strides(x), _hw_strides(y)
    bc, bhw, one, num_warps = _blocks(cpg, hw, blocks, channels_fast=sx[1] == 1 and C > 1)
    _gn_relu_fwd_kernel[(N * G,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        hw, W, cpg, G, float(eps),
        *sx[:4], *sy[:4],
        HAS_W=weight is not None, HAS_B=bias is not None, FLAT_HW=sx[4] and sy[4],
        BLOCK_C=bc, BLOCK_HW=bhw, ONE_TILE=one, num_warps=num_warps,
    )
    return y, mean, rstd


def _backward(dy, x, mean, rstd, num_groups, weight=None, bias=None,
              needs_dx=True, needs_dw=True, needs_db=True, out=None, blocks=None):
    """Run the backward kernel; returns (dx, dw, db), None for what was not asked for.

    dy may have any strides (e.g. NCHW while x is channels_last, or expanded): no copy is made.
    """
    N, C, H, W = x.shape
    G = num_groups
    cpg, hw = C // G, H * W
    needs_dw = needs_dw and weight is not None
    needs_db = needs_db and bias is not None
    dx = (_empty_like(x) if out is None else out) if needs_dx else None
    dwp = _empty((N, C), torch.float32, x.device) if needs_dw else None
    dbp = _empty((N, C), torch.float32, x.device) if needs_db else None
    if x.numel() == 0:
        zeros = lambda p: torch.zeros_like(p) if p is not None else None  # noqa: E731
        return dx, zeros(weight) if needs_dw else None, zeros(bias) if needs_db else None
    if needs_dx or needs_dw or needs_db:
        sx, sd = _hw_strides(x), _hw_strides(dy)
        sg = _hw_strides(dx) if needs_dx else sx
        bc, bhw, one, num_warps = _blocks(cpg, hw, blocks, channels_fast=sx[1] == 1 and C > 1)
        _gn_relu_bwd_kernel[(N * G,)](
            x, dy, dx if needs_dx else x,
            weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
            dwp if needs_dw else mean, dbp if needs_db else mean,
            C, hw, W, cpg, G,
            *sx[:4], *sd[:4], *sg[:4],
            HAS_W=weight is not None, HAS_B=bias is not None, STORE_DW=needs_dw, STORE_DB=needs_db,
            COMPUTE_DX=needs_dx, FLAT_HW=sx[4] and sd[4] and sg[4],
            BLOCK_C=bc, BLOCK_HW=bhw, ONE_TILE=one, num_warps=num_warps,
        )
    dw = dwp.sum(0).to(weight.dtype) if needs_dw else None
    db = dbp.sum(0).to(bias.dtype) if needs_db else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile sees (opaque calls with shape functions, no graph break)
# ---------------------------------------------------------------------------------------------
_OPS_OK = False
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    try:
        @torch.library.custom_op("fastcifar_kernels::group_norm_relu_fwd", mutates_args=())
        def _fwd_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
            return _forward(x, num_groups, weight, bias, eps)

        @_fwd_op.register_fake
        def _(x, num_groups, weight, bias, eps):
            stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
            return torch.empty_like(x, memory_format=torch.preserve_format), stats, stats.clone()

        @torch.library.custom_op("fastcifar_kernels::group_norm_relu_bwd", mutates_args=())
        def _bwd_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                    weight: Optional[Tensor], bias: Optional[Tensor], needs_dx: bool, needs_dw: bool,
                    needs_db: bool) -> tuple[Tensor, Tensor, Tensor]:
            dx, dw, db = _backward(dy, x, mean, rstd, num_groups, weight, bias, needs_dx, needs_dw, needs_db)
            # an op cannot return None: empty tensors stand in for grads nobody asked for
            none = lambda: x.new_empty((0,))  # noqa: E731
            return (dx if dx is not None else none(), dw if dw is not None else none(),
                    db if db is not None else none())

        @_bwd_op.register_fake
        def _(dy, x, mean, rstd, num_groups, weight, bias, needs_dx, needs_dw, needs_db):
            def like(t, need):
                return torch.empty_like(t, memory_format=torch.preserve_format) if need else x.new_empty((0,))
            return like(x, needs_dx), like(weight, needs_dw and weight is not None), \
                like(bias, needs_db and bias is not None)

        _OPS_OK = True
    except Exception:  # noqa: BLE001 - already registered (this file loaded twice) or an old torch
        _OPS_OK = hasattr(torch.ops.fastcifar_kernels, "group_norm_relu_fwd")


def _is_compiling():
    return _OPS_OK and hasattr(torch, "compiler") and torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------------------------
class GroupNormReLUFunction(torch.autograd.Function):
    """Ties the kernels together. Saves x, mean and rstd (fp32, [N, G]) -- not xhat, not y."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        if _is_compiling():
            y, mean, rstd = torch.ops.fastcifar_kernels.group_norm_relu_fwd(x, num_groups, weight, bias, eps)
        else:  # eager: skip the dispatcher round trip
            y, mean, rstd = _forward(x, num_groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs_dx, _, needs_dw, needs_db, _ = ctx.needs_input_grad
        needs_dw = needs_dw and weight is not None
        needs_db = needs_db and bias is not None
        if _is_compiling():
            dx, dw, db = torch.ops.fastcifar_kernels.group_norm_relu_bwd(
                dy, x, mean, rstd, ctx.num_groups, weight, bias, needs_dx, needs_dw, needs_db)
        else:
            dx, dw, db = _backward(dy, x, mean, rstd, ctx.num_groups, weight, bias,
                                   needs_dx, needs_dw, needs_db)
        return (dx if needs_dx else None), None, (dw if needs_dw else None), (db if needs_db else None), None


# ---------------------------------------------------------------------------------------------
# Functional entry point
# ---------------------------------------------------------------------------------------------
def _kernels_interpreted():
    # triton's own jit'd helpers (tl.sum's combine function) are fixed when triton is imported: imported before
    # TRITON_INTERPRET was set, they fail inside an interpreted kernel, so the torch path must be taken then
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    helper = getattr(standard, "_sum_combine", None)
    return isinstance(_gn_relu_fwd_kernel, InterpretedFunction) and \
        (helper is None or isinstance(helper, InterpretedFunction))


_INTERPRETED = triton is not None and _kernels_interpreted()


def fused_available(x_or_device=None) -> bool:
    """True when group_norm_relu will run the Triton kernels for this tensor (or device).

    CUDA: needs triton. CPU: needs TRITON_INTERPRET=1, set now and also when this module was
    imported (triton decides at definition time). For a tensor, its dtype must be fp32/fp16/bf16
    (bf16 only on CUDA: the interpreter has none). FASTCIFAR_KERNELS_DISABLE=1 turns it off.
    """
    if triton is None or os.environ.get("FASTCIFAR_KERNELS_DISABLE", "0") not in ("", "0"):
        return False
    if isinstance(x_or_device, Tensor):
        dev, dtype = x_or_device.device, x_or_device.dtype
    else:
        dev = torch.device("cuda" if x_or_device is None else x_or_device)
        dtype = None
    if dev.type == "cuda":
        ok = torch.cuda.is_available()
    elif dev.type == "cpu":  # interpreted kernels, and the user still asks for the interpreter
        ok = _INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    else:
        return False
    if dtype is not None:
        ok = ok and dtype in _FUSED_DTYPES and not (dev.type == "cpu" and dtype == torch.bfloat16)
    return ok


def group_norm_relu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """relu(group_norm(x, num_groups, weight, bias, eps)) for a 4-D x, fused when possible.

    Same result as F.relu(F.group_norm(...)); the output keeps x's memory format and dtype.
    Runs the Triton kernels when fused_available(x), otherwise the torch ops. Under autocast the
    fused path keeps x's dtype (bf16 in, bf16 out; statistics in fp32), whereas the torch path,
    like nn.GroupNorm, returns fp32.
    """
    _check_args(x, num_groups, weight, bias)
    if not fused_available(x):
        return F.relu(F.group_norm(x, num_groups, weight, bias, eps))
    return GroupNormReLUFunction.apply(x, num_groups, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# nn.Module
# ---------------------------------------------------------------------------------------------
class GroupNormReLU(nn.Module):
    """Drop-in for nn.Sequential(nn.GroupNorm(num_groups, num_channels, eps, affine, bias=bias), nn.ReLU()).

    Parameters are named and initialised like nn.GroupNorm's (weight=1, bias=0), so an
    nn.GroupNorm state_dict loads as is. num_groups=1 gives LayerNorm over (C, H, W) with a
    per-channel affine.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return group_norm_relu(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
