"""Fused GroupNorm + ReLU for 4-D activations, forward and backward, in Triton.

Layout of this file: Triton helpers and kernels, launchers, the torch implementation, routing
(availability, dtype gates, the self-check), the torch.library op with its autograd, the public
function and nn.Module.

Math, per sample n and group g over its M = (C/G)*H*W elements:
    mean, rstd = 1/sqrt(var + eps)            (biased variance, accumulated in fp32)
    xhat = (x - mean) * rstd;  y = relu(xhat * w_c + b_c)
Backward, with dy' = dy * (xhat * w_c + b_c > 0) and dxhat = dy' * w_c:
    db_c = sum_{n,h,w} dy';  dw_c = sum_{n,h,w} dy' * xhat
    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))

One program handles one (n, g) and walks the group in [BLOCK_C, BLOCK_HW] tiles. When N*G programs
would leave SMs idle, each group is split into S channel chunks: a first launch reduces every chunk
(forward: count/mean/M2; backward: per-channel dw/db and the chunk's share of the two group sums),
a second merges the S partials and writes y (or dx). Tensors are indexed through their strides, so
NCHW, channels_last or any other layout is read in place and outputs keep the input's format. The
backward saves x (not xhat) and recomputes xhat and the ReLU mask. dw/db are written as per-sample
partials [N, C] and summed afterwards: deterministic, no atomics.

Every call goes through one torch.library op (fastcifar_kernels::group_norm_relu) whose autograd is
registered with torch.library, so eager and torch.compile run the same code. Its implementation
picks, per (device type, dtype, memory format) and cached, the Triton kernels or the torch
implementation (CPU without the interpreter, float64, FASTCIFAR_KERNELS_DISABLE=1, a kernel that
failed its self-check; see verify_kernel).
"""
import os
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, blocked, or a broken install: the torch implementation still works
    triton = None

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SPLIT_ELEMS = 512  # a split chunk smaller than this costs more in the second launch than it gains


def _interpret_asked():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# Triton helpers and kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _program(G, cpg, CPS):
        """(pid, s, n, c0, c_lo, c_hi): this program's (sample, group) and chunk, the group's first channel, and
        the chunk's channels [c_lo, c_hi) within the group."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        c_lo = s * CPS
        return pid, s, pid // G, (pid % G) * cpg, c_lo, tl.minimum(c_lo + CPS, cpg)

    @triton.jit
    def _base(ptr, n, c0, s_n, s_c):
        # int64 offsets: N*C*H*W may exceed 2**31 even when one sample does not
        return ptr + n.to(tl.int64) * s_n + c0.to(tl.int64) * s_c

    @triton.jit
    def _hw_offsets(hw, width, s_h, s_w, FLAT_HW: tl.constexpr):
        # NCHW and channels_last both step H*W with one stride; only odd layouts pay for div/mod
        if FLAT_HW:
            return hw * s_w
        else:
            return (hw // width) * s_h + (hw % width) * s_w

    @triton.jit
    def _load_tile(base, c, hw, mask, width, s_c, s_h, s_w, FLAT_HW: tl.constexpr):
        return tl.load(base + c * s_c + _hw_offsets(hw, width, s_h, s_w, FLAT_HW), mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_tile(base, c, hw, mask, width, s_c, s_h, s_w, val, FLAT_HW: tl.constexpr):
        tl.store(base + c * s_c + _hw_offsets(hw, width, s_h, s_w, FLAT_HW), val.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _affine(W, B, ch, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """(w, b) for the channels ch as [BLOCK_C, 1] fp32 columns, or the scalars 1 and 0."""
        if HAS_W:
            w = tl.load(W + ch, mask=cmask, other=1.0).to(tl.float32)
        else:
            w = 1.0
        if HAS_B:
            b = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
        else:
            b = 0.0
        return w, b

    @triton.jit
    def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
        # Chan's merge of (count, mean, M2): sum/sum-of-squares would cancel in fp32
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        return n_ab, mean_a + delta * (n_b / n_ab), m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)

    @triton.jit
    def _tile_stats(x, mask, n_b):
        mean_b = tl.sum(x) / n_b
        d = tl.where(mask, x - mean_b, 0.0)
        return mean_b, tl.sum(d * d)

    @triton.jit
    def _chunk_stats(x_base, c_lo, c_hi, HW, width, s_c, s_h, s_w,
                     FLAT_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """(count, mean, M2) of channels [c_lo, c_hi) of one group, tile by tile."""
        cs = tl.arange(0, BLOCK_C)[:, None]
        hws = tl.arange(0, BLOCK_HW)[None, :]
        n_a = 0.0
        mean_a = 0.0
        m2_a = 0.0
        for c_start in range(c_lo, c_hi, BLOCK_C):
            cmask = (c_start + cs) < c_hi
            for hw_start in range(0, HW, BLOCK_HW):
                mask = cmask & ((hw_start + hws) < HW)
                x = _load_tile(x_base, c_start + cs, hw_start + hws, mask, width, s_c, s_h, s_w, FLAT_HW)
                n_b = (tl.minimum(c_hi - c_start, BLOCK_C) * tl.minimum(HW - hw_start, BLOCK_HW)).to(tl.float32)
                mean_b, m2_b = _tile_stats(x, mask, n_b)
                n_a, mean_a, m2_a = _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
        return n_a, mean_a, m2_a

    @triton.jit
    def _bwd_tile(x_base, dy_base, c, hw, cmask, w, b, HW, width, mean, rstd,
                  sx_c, sx_h, sx_w, sd_c, sd_h, sd_w, FLAT_HW: tl.constexpr):
        """The one place the backward loads a tile: (xhat, dy', mask), the ReLU mask recomputed
        from x exactly as the forward computed y."""
        mask = cmask & (hw < HW)
        x = _load_tile(x_base, c, hw, mask, width, sx_c, sx_h, sx_w, FLAT_HW)
        dy = _load_tile(dy_base, c, hw, mask, width, sd_c, sd_h, sd_w, FLAT_HW)
        xhat = (x - mean) * rstd
        return xhat, tl.where(mask & (xhat * w + b > 0.0), dy, 0.0), mask

    def _one_tile(args):
        return args["BLOCK_C"] >= args["CPS"] and args["BLOCK_HW"] >= args["HW"]

    def _fit_configs(configs, nargs, **kwargs):
        """Clamp each config's tile to the chunk (CPS channels x HW) and drop the duplicates."""
        p2 = triton.next_power_of_2
        out = {}
        for cfg in configs:
            bc = min(cfg.kwargs["BLOCK_C"], p2(nargs["CPS"]))
            bhw = max(min(cfg.kwargs["BLOCK_HW"], p2(nargs["HW"])), 16 // bc)  # at least 16 lanes a tile
            warps = cfg.num_warps
            while warps > 1 and bc * bhw < 64 * warps:  # at least two elements per thread
                warps //= 2
            out.setdefault((bc, bhw, warps), triton.Config({"BLOCK_C": bc, "BLOCK_HW": bhw}, num_warps=warps))
        return list(out.values())

    def _quick_bench(kernel_call, quantiles):
        from triton.testing import do_bench
        return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    # (BLOCK_C, BLOCK_HW, warps): at most 8 elements per thread, where ptxas (sm_90a) reports at most ~130
    # registers and no spills; 16 per thread needed up to 254. Wide-channel tiles suit channels_last, long
    # H*W tiles NCHW.
    _GPU_TILES = [(64, 64, 16), (32, 64, 8), (32, 128, 16), (16, 128, 8), (16, 64, 8), (8, 256, 8), (4, 512, 8),
                  (2, 1024, 8)]
    # The interpreter would time every config (seconds each, on the CPU, per shape): one config there.
    _INTERPRET_TILES = [(32, 128, 4)]

    def _tuned(kernel, tiles, bench=_quick_bench):
        configs = [triton.Config({"BLOCK_C": bc, "BLOCK_HW": bhw}, num_warps=w) for bc, bhw, w in tiles]
        return triton.autotune(configs, key=["CPS", "HW", "G", "S", "sx_c", "PHASE"],
                               prune_configs_by={"early_config_prune": _fit_configs}, do_bench=bench)(
            triton.heuristics({"ONE_TILE": _one_tile})(kernel))

    @triton.jit
    def _gn_relu_fwd_kernel(
        X, Y, W, B, MEAN, RSTD, PMEAN, PM2,
        HW, width, cpg, G, CPS, S, eps,
        sx_n, sx_c, sx_h, sx_w,
        sy_n, sy_c, sy_h, sy_w,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, FLAT_HW: tl.constexpr,
        PHASE: tl.constexpr,  # 0: whole group; split: 1 chunk statistics, 2 merge and write y
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_TILE: tl.constexpr,
    ):
        pid, s, n, c0, c_lo, c_hi = _program(G, cpg, CPS)
        x_base = _base(X, n, c0, sx_n, sx_c)
        y_base = _base(Y, n, c0, sy_n, sy_c)
        cs = tl.arange(0, BLOCK_C)[:, None]
        hws = tl.arange(0, BLOCK_HW)[None, :]
        count = cpg * HW * 1.0  # cpg or HW may arrive as constexpr 1, so no .to()
        mean = 0.0
        rstd = 0.0
        if PHASE == 2:
            n_a = 0.0
            mean_a = 0.0
            m2_a = 0.0
            for j in range(0, S):
                n_b = (tl.minimum(cpg - j * CPS, CPS) * HW).to(tl.float32)
                n_a, mean_a, m2_a = _merge(n_a, mean_a, m2_a, n_b, tl.load(PMEAN + pid * S + j),
                                           tl.load(PM2 + pid * S + j))
            mean = mean_a
            rstd = 1.0 / tl.sqrt(m2_a / count + eps)

        if ONE_TILE:  # the chunk fits one tile: load it once, keep it in registers
            cmask = (c_lo + cs) < c_hi
            mask = cmask & (hws < HW)
            x = _load_tile(x_base, c_lo + cs, hws, mask, width, sx_c, sx_h, sx_w, FLAT_HW)
            if PHASE != 2:
                mean_c, m2_c = _tile_stats(x, mask, ((c_hi - c_lo) * HW).to(tl.float32))
        elif PHASE != 2:
            _, mean_c, m2_c = _chunk_stats(x_base, c_lo, c_hi, HW, width, sx_c, sx_h, sx_w, FLAT_HW, BLOCK_C, BLOCK_HW)
        if PHASE == 1:  # this chunk's statistics, for the second launch to merge
            tl.store(PMEAN + pid * S + s, mean_c)
            tl.store(PM2 + pid * S + s, m2_c)
        if PHASE == 0:
            mean = mean_c
            rstd = 1.0 / tl.sqrt(m2_c / count + eps)
        if PHASE != 1:
            if ONE_TILE:
                w, b = _affine(W, B, c0 + c_lo + cs, cmask, HAS_W, HAS_B)
                y = tl.maximum((x - mean) * rstd * w + b, 0.0)
                _store_tile(y_base, c_lo + cs, hws, mask, width, sy_c, sy_h, sy_w, y, FLAT_HW)
            else:
                for c_start in range(c_lo, c_hi, BLOCK_C):
                    cmask = (c_start + cs) < c_hi
                    w, b = _affine(W, B, c0 + c_start + cs, cmask, HAS_W, HAS_B)
                    for hw_start in range(0, HW, BLOCK_HW):
                        mask = cmask & ((hw_start + hws) < HW)
                        x = _load_tile(x_base, c_start + cs, hw_start + hws, mask, width, sx_c, sx_h, sx_w, FLAT_HW)
                        y = tl.maximum((x - mean) * rstd * w + b, 0.0)
                        _store_tile(y_base, c_start + cs, hw_start + hws, mask, width, sy_c, sy_h, sy_w, y, FLAT_HW)
        if PHASE != 1:
            if s == 0:
                tl.store(MEAN + pid, mean)
                tl.store(RSTD + pid, rstd)

    @triton.jit
    def _gn_relu_bwd_kernel(
        X, DY, DX, W, B, MEAN, RSTD, DWP, DBP, S1P, S2P,
        C, HW, width, cpg, G, CPS, S,
        sx_n, sx_c, sx_h, sx_w,
        sd_n, sd_c, sd_h, sd_w,
        sg_n, sg_c, sg_h, sg_w,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
        COMPUTE_DX: tl.constexpr, FLAT_HW: tl.constexpr,
        PHASE: tl.constexpr,  # 0: whole group; split: 1 chunk sums (and dw, db), 2 merge and write dx
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_TILE: tl.constexpr,
    ):
        pid, s, n, c0, c_lo, c_hi = _program(G, cpg, CPS)
        x_base = _base(X, n, c0, sx_n, sx_c)
        dy_base = _base(DY, n, c0, sd_n, sd_c)
        dx_base = _base(DX, n, c0, sg_n, sg_c)
        part = n.to(tl.int64) * C + c0  # row of the [N, C] dw/db partials
        cs = tl.arange(0, BLOCK_C)[:, None]
        hws = tl.arange(0, BLOCK_HW)[None, :]
        count = cpg * HW * 1.0  # cpg or HW may arrive as constexpr 1, so no .to()
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)

        if ONE_TILE and PHASE == 0:  # the whole group in one tile: x and dy are read once
            cmask = cs < cpg
            w, b = _affine(W, B, c0 + cs, cmask, HAS_W, HAS_B)
            xhat, gy, mask = _bwd_tile(x_base, dy_base, cs, hws, cmask, w, b, HW, width, mean, rstd,
                                       sx_c, sx_h, sx_w, sd_c, sd_h, sd_w, FLAT_HW)
            db_c = tl.sum(gy, axis=1, keep_dims=True)
            dw_c = tl.sum(gy * xhat, axis=1, keep_dims=True)
            if STORE_DB:
                tl.store(DBP + part + cs, db_c, mask=cmask)
            if STORE_DW:
                tl.store(DWP + part + cs, dw_c, mask=cmask)
            if COMPUTE_DX:
                s1 = tl.sum(db_c * w) / count
                s2 = tl.sum(dw_c * w) / count
                _store_tile(dx_base, cs, hws, mask, width, sg_c, sg_h, sg_w, (gy * w - s1 - xhat * s2) * rstd, FLAT_HW)
        else:
            s1 = 0.0
            s2 = 0.0
            if PHASE != 2:  # per-channel sums of dy' and dy'*xhat; the group sums follow from them
                for c_start in range(c_lo, c_hi, BLOCK_C):
                    cmask = (c_start + cs) < c_hi
                    db_c = tl.zeros([BLOCK_C, 1], dtype=tl.float32)
                    dw_c = tl.zeros([BLOCK_C, 1], dtype=tl.float32)
                    w, b = _affine(W, B, c0 + c_start + cs, cmask, HAS_W, HAS_B)
                    for hw_start in range(0, HW, BLOCK_HW):
                        xhat, gy, mask = _bwd_tile(x_base, dy_base, c_start + cs, hw_start + hws, cmask, w, b, HW,
                                                   width, mean, rstd, sx_c, sx_h, sx_w, sd_c, sd_h, sd_w, FLAT_HW)
                        db_c += tl.sum(gy, axis=1, keep_dims=True)
                        dw_c += tl.sum(gy * xhat, axis=1, keep_dims=True)
                    if STORE_DB:
                        tl.store(DBP + part + c_start + cs, db_c, mask=cmask)
                    if STORE_DW:
                        tl.store(DWP + part + c_start + cs, dw_c, mask=cmask)
                    s1 += tl.sum(db_c * w)
                    s2 += tl.sum(dw_c * w)
                if PHASE == 1:
                    tl.store(S1P + pid * S + s, s1)
                    tl.store(S2P + pid * S + s, s2)
            if PHASE == 2:
                for j in range(0, S):
                    s1 += tl.load(S1P + pid * S + j)
                    s2 += tl.load(S2P + pid * S + j)
            if COMPUTE_DX and PHASE != 1:  # x and dy are read again (from L2 when the chunk is small enough)
                s1 = s1 / count
                s2 = s2 / count
                for c_start in range(c_lo, c_hi, BLOCK_C):
                    cmask = (c_start + cs) < c_hi
                    w, b = _affine(W, B, c0 + c_start + cs, cmask, HAS_W, HAS_B)
                    for hw_start in range(0, HW, BLOCK_HW):
                        xhat, gy, mask = _bwd_tile(x_base, dy_base, c_start + cs, hw_start + hws, cmask, w, b, HW,
                                                   width, mean, rstd, sx_c, sx_h, sx_w, sd_c, sd_h, sd_w, FLAT_HW)
                        _store_tile(dx_base, c_start + cs, hw_start + hws, mask, width, sg_c, sg_h, sg_w,
                                    (gy * w - s1 - xhat * s2) * rstd, FLAT_HW)

    _TILES = _INTERPRET_TILES if _interpret_asked() else _GPU_TILES
    _fwd_tuned = _tuned(_gn_relu_fwd_kernel, _TILES)
    _bwd_tuned = _tuned(_gn_relu_bwd_kernel, _TILES)


# ---------------------------------------------------------------------------------------------
# Launchers (no autograd here)
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


_SMS = {}


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere, so the CPU never splits by itself."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _split(N, G, cpg, hw, sms):
    """(S, CPS): chunks per group and channels per chunk. A group is split only when N*G programs
    are fewer than two per SM, into power-of-two channel chunks of at least _MIN_SPLIT_ELEMS (the last
    chunk may be smaller)."""
    if N * G >= 2 * sms or cpg < 2:
        return 1, cpg
    want = -(-2 * sms // (N * G))
    cps = max(-(-cpg // want), -(-_MIN_SPLIT_ELEMS // hw), 1)
    cps = 1 << (cps - 1).bit_length()
    if cps >= cpg:
        return 1, cpg
    return -(-cpg // cps), cps


def _launch(tuned, grid, args, kwargs, blocks):
    if blocks is None:
        tuned[grid](*args, **kwargs)
    else:  # a forced tile (tests, the self-check): skip the tuner, keep the ONE_TILE heuristic
        tuned.fn[grid](*args, **kwargs, BLOCK_C=blocks[0], BLOCK_HW=blocks[1], num_warps=4)


def _forward(x, num_groups, weight=None, bias=None, eps=1e-5, blocks=None, split=None):
    """Run the forward kernel(s); returns (y, mean, rstd) with mean/rstd fp32 of shape [N, G].
    blocks=(BLOCK_C, BLOCK_HW) forces a tile, split=(S, CPS) a split (tests and the self-check)."""
    N, C, H, W = x.shape
    G = num_groups
    cpg, hw = C // G, H * W
    y = _empty_like(x)
    mean = _empty((N, G), torch.float32, x.device)
    rstd = _empty((N, G), torch.float32, x.device)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    S, cps = split or _split(N, G, cpg, hw, _sm_count(x.device))
    sx, sy = _hw_strides(x), _hw_strides(y)
    part = _empty((N * G * S,), torch.float32, x.device) if S > 1 else mean
    part2 = _empty((N * G * S,), torch.float32, x.device) if S > 1 else rstd
    args = (x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd, part, part2,
            hw, W, cpg, G, cps, S, float(eps), *sx[:4], *sy[:4])
    kw = dict(HAS_W=weight is not None, HAS_B=bias is not None, FLAT_HW=sx[4] and sy[4])
    for phase in ((1, 2) if S > 1 else (0,)):
        _launch(_fwd_tuned, (N * G, S), args, {**kw, "PHASE": phase}, blocks)
    return y, mean, rstd


def _backward(dy, x, mean, rstd, num_groups, weight=None, bias=None,
              needs_dx=True, needs_dw=True, needs_db=True, blocks=None, split=None):
    """Run the backward kernel(s); returns (dx, dw, db), None for what was not asked for.
    dy may have any strides (e.g. NCHW while x is channels_last, or expanded): no copy is made."""
    N, C, H, W = x.shape
    G = num_groups
    cpg, hw = C // G, H * W
    needs_dw = needs_dw and weight is not None
    needs_db = needs_db and bias is not None
    dx = _empty_like(x) if needs_dx else None
    dwp = _empty((N, C), torch.float32, x.device) if needs_dw else None
    dbp = _empty((N, C), torch.float32, x.device) if needs_db else None
    if x.numel() == 0:
        zeros = lambda p: torch.zeros_like(p) if p is not None else None  # noqa: E731
        return dx, zeros(weight) if needs_dw else None, zeros(bias) if needs_db else None
    if needs_dx or needs_dw or needs_db:
        S, cps = split or _split(N, G, cpg, hw, _sm_count(x.device))
        sx, sd = _hw_strides(x), _hw_strides(dy)
        sg = _hw_strides(dx) if needs_dx else sx
        s1p = _empty((N * G * S,), torch.float32, x.device) if S > 1 else mean
        s2p = _empty((N * G * S,), torch.float32, x.device) if S > 1 else rstd
        args = (x, dy, dx if needs_dx else x, weight if weight is not None else x, bias if bias is not None else x,
                mean, rstd, dwp if needs_dw else mean, dbp if needs_db else mean, s1p, s2p,
                C, hw, W, cpg, G, cps, S, *sx[:4], *sd[:4], *sg[:4])
        kw = dict(HAS_W=weight is not None, HAS_B=bias is not None, STORE_DW=needs_dw, STORE_DB=needs_db,
                  COMPUTE_DX=needs_dx, FLAT_HW=sx[4] and sd[4] and sg[4])
        for phase in ((1, 2) if S > 1 and needs_dx else (1,) if S > 1 else (0,)):
            _launch(_bwd_tuned, (N * G, S), args, {**kw, "PHASE": phase}, blocks)
    dw = dwp.sum(0).to(weight.dtype) if needs_dw else None
    db = dbp.sum(0).to(bias.dtype) if needs_db else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# The torch implementation of the same op: same outputs (y in x's dtype and layout, fp32 statistics
# for fp32/fp16/bf16, float64 for float64), same backward formula
# ---------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _torch_xhat_pre(x, mean, rstd, G, weight, bias):
    N, C, H, W = x.shape
    xg = x.to(mean.dtype).reshape(N, G, -1)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(N, C, H, W)
    pre = xhat
    if weight is not None:
        pre = pre * weight.to(mean.dtype).view(1, C, 1, 1)
    if bias is not None:
        pre = pre + bias.to(mean.dtype).view(1, C, 1, 1)
    return xhat, pre


def _into(x, t):
    """t in x's dtype and laid out like the kernels' outputs (empty_like(x, preserve_format))."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x, memory_format=torch.preserve_format).copy_(t)


def _torch_forward(x, G, weight, bias, eps):
    N = x.shape[0]
    var, mean = torch.var_mean(x.to(_compute_dtype(x.dtype)).reshape(N, G, -1), dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return _into(x, _torch_xhat_pre(x, mean, rstd, G, weight, bias)[1].relu_()), mean, rstd


def _torch_backward(dy, x, mean, rstd, G, weight, bias, needs_dx, needs_dw, needs_db):
    N, C, H, W = x.shape
    xhat, pre = _torch_xhat_pre(x, mean, rstd, G, weight, bias)
    gy = dy.to(mean.dtype) * (pre > 0)
    dw = (gy * xhat).sum((0, 2, 3)).to(weight.dtype) if needs_dw and weight is not None else None
    db = gy.sum((0, 2, 3)).to(bias.dtype) if needs_db and bias is not None else None
    dx = None
    if needs_dx:
        dxh = (gy * weight.to(mean.dtype).view(1, C, 1, 1) if weight is not None else gy).reshape(N, G, -1)
        xh = xhat.reshape(N, G, -1)
        dx = rstd[..., None] * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
        dx = _into(x, dx.reshape(N, C, H, W))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Routing: Triton or torch, per (device type, dtype, memory format), decided once
# ---------------------------------------------------------------------------------------------
def _kernels_interpreted():
    """True when this module's kernels and triton's own jit'd helpers (tl.sum's combine function) are both
    interpreted. Both are fixed at import: helpers compiled before TRITON_INTERPRET was set fail inside an
    interpreted kernel, so the torch path must be taken then. Without TRITON_INTERPRET nothing is interpreted,
    and triton's interpreter (which imports numpy, a package torch does not need) is never imported."""
    if triton is None or not _interpret_asked():
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    helper = getattr(standard, "_sum_combine", None)
    return isinstance(_gn_relu_fwd_kernel, InterpretedFunction) and \
        (helper is None or isinstance(helper, InterpretedFunction))


_INTERPRETED = _kernels_interpreted()
_ENV = {}      # environment read once: {"disable": bool, "interpret": bool}
_ROUTES = {}   # (device type, dtype, channels_last) -> "triton" | "torch" | "error: ..."
_STATUS = {}   # key -> "ok" | "mismatch: ..." | "unavailable: ..." (verify_kernel's results)


def _reset_routes():
    """Forget the environment and the routes derived from it (tests that change the environment use this).
    Verification results are kept: a kernel that disagreed with torch stays disabled for the process."""
    _ENV.clear()
    _ROUTES.clear()


def _env():
    if not _ENV:
        _ENV.update(disable=os.environ.get("FASTCIFAR_KERNELS_DISABLE", "0") not in ("", "0"),
                    interpret=_interpret_asked())
    return _ENV


def _key(device_type, dtype, channels_last):
    return f"{device_type}/{str(dtype).removeprefix('torch.')}/{'channels_last' if channels_last else 'contiguous'}"


def _tensor_key(x):
    """(device type, dtype, channels_last): a tuple, so the per-call lookup formats no string."""
    return x.device.type, x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _dtype_gate(dtype, capability):
    """None if the compiled kernels handle dtype on a CUDA device of this capability, else why not."""
    if dtype == torch.bfloat16 and capability < (8, 0):
        return (f"bfloat16 needs a GPU of compute capability 8.0 or newer for the fused GroupNorm+ReLU kernel "
                f"(this one is sm_{capability[0]}{capability[1]}); use float16, or FASTCIFAR_KERNELS_DISABLE=1")
    return None


def _static_route(device, dtype):
    """"triton", "torch" or "error: ..." for a device and dtype, before any self-check."""
    if triton is None or _env()["disable"] or dtype not in _FUSED_DTYPES:
        return "torch"
    if device.type == "cuda":
        if not torch.cuda.is_available() or _INTERPRETED:
            return "torch"
        why = _dtype_gate(dtype, torch.cuda.get_device_capability(device))
        return "error: " + why if why else "triton"
    if device.type == "cpu":  # interpreted kernels, and the interpreter still asked for; it has no bf16
        return "triton" if _INTERPRETED and _env()["interpret"] and dtype != torch.bfloat16 else "torch"
    return "torch"


def _route(x):
    key = _tensor_key(x)
    route = _ROUTES.get(key)
    if route is None:
        route = _static_route(x.device, x.dtype)
        if route == "triton" and _key(*key) not in _STATUS and x.device.type == "cuda" \
                and torch.cuda.is_current_stream_capturing():
            return "torch"  # first use inside a CUDA graph capture: no self-check possible here, nothing cached
        if route == "triton" and not verify_kernel(x.device, x.dtype, key[2]):
            route = "torch"
        _ROUTES[key] = route
    if route.startswith("error: "):
        raise RuntimeError(route[len("error: "):])
    return route


def fused_supported(device=None, dtype=torch.float32) -> bool:
    """True when the Triton kernels can run on this device (default cuda) for this dtype: triton is there, the
    device and dtype are supported, FASTCIFAR_KERNELS_DISABLE is unset. Nothing runs or is allocated, and it
    says nothing of the self-check: fused_available does."""
    return _static_route(torch.device("cuda" if device is None else device), dtype) == "triton"


def fused_available(x_or_device=None, dtype=None, channels_last=True) -> bool:
    """True when group_norm_relu runs the Triton kernels for this tensor, or for this device, dtype (default
    float32) and memory format: they can run there and have passed their self-check for that key. The
    self-check (verify_kernel) runs here if it has not yet, so True is never an unchecked answer.

    CUDA: needs triton. CPU: needs TRITON_INTERPRET=1, both when this module was imported (triton
    decides at definition time) and when first used. The dtype must be fp32/fp16/bf16 (bf16 on CUDA
    from sm80; the interpreter has none). FASTCIFAR_KERNELS_DISABLE=1 turns it off. The environment is
    read once per process.
    """
    if isinstance(x_or_device, Tensor):
        dev, (_, dtype, channels_last) = x_or_device.device, _tensor_key(x_or_device)
    else:
        dev, dtype = torch.device("cuda" if x_or_device is None else x_or_device), dtype or torch.float32
    if not fused_supported(dev, dtype):
        return False
    if _key(dev.type, dtype, channels_last) not in _STATUS and dev.type == "cuda" and \
            torch.cuda.is_current_stream_capturing():
        return False  # no self-check possible inside a CUDA graph capture
    return verify_kernel(dev, dtype, channels_last)


# ---------------------------------------------------------------------------------------------
# Self-check: the kernels against F.group_norm + F.relu before they are trusted
# ---------------------------------------------------------------------------------------------
_VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def _self_check(device, dtype, channels_last):
    """"ok" or "mismatch: ..." after running the forward and backward launchers on small inputs: one
    tile, the tiled loops, and the split path, each against aten's own group norm forward and backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    N, C, H, W, G = 2, 8, 3, 5, 2  # small: under the interpreter every tile costs milliseconds
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(device, dtype).to(memory_format=fmt)
    dy = torch.randn(N, C, H, W, generator=g).to(device, dtype).to(memory_format=fmt)
    w = (1 + 0.2 * torch.randn(C, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(C, generator=g)).to(device, dtype)
    # aten's kernels directly (F.group_norm's forward and its autograd formula): this may run inside the op,
    # below autograd
    xf, wf, bf = x.float(), w.float(), b.float()
    pre, mean, rstd = torch.ops.aten.native_group_norm(xf, wf, bf, N, C, H * W, G, 1e-5)
    gy = dy.float() * (pre > 0)
    ref_dx, ref_dw, ref_db = torch.ops.aten.native_group_norm_backward(
        gy, xf, mean, rstd, wf, N, C, H * W, G, [True, True, True])
    want = {"y": pre.relu(), "dx": ref_dx, "dw": ref_dw, "db": ref_db}
    worst, where = 0.0, ""
    for name, blocks, split in (("one tile", (4, 16), (1, C // G)), ("tiled loops", (2, 8), (1, C // G)),
                                ("split", (2, 8), (2, 2))):
        y, m, r = _forward(x, G, w, b, 1e-5, blocks=blocks, split=split)
        dx, dw, db = _backward(dy, x, m, r, G, w, b, blocks=blocks, split=split)
        for k, got in (("y", y), ("dx", dx), ("dw", dw), ("db", db)):
            err = _rel_err(got, want[k]) if bool(torch.isfinite(got).all()) else float("inf")
            if not err <= worst:
                worst, where = err, f"{k}, {name}"
    if worst > _VERIFY_TOL[dtype]:
        return f"mismatch: max relative error {worst:.3g} in {where} (tolerance {_VERIFY_TOL[dtype]:g})"
    return "ok"


def verify_kernel(device, dtype=torch.float32, channels_last=True, strict=False) -> bool:
    """Check the Triton forward and backward against F.group_norm + F.relu on a small input, once per
    process per (device type, dtype, memory format); True when they agree.

    A disagreement warns once (RuntimeWarning with the max error), and from then on group_norm_relu and
    GroupNormReLU take the torch path for that key. strict=True raises RuntimeError instead of returning
    False (also when the kernels cannot run there at all). Call it eagerly, before torch.compile.
    """
    dev = torch.device(device)
    key = _key(dev.type, dtype, channels_last)
    status = _STATUS.get(key)
    if status is None:
        route = _static_route(dev, dtype)
        if route.startswith("error: "):
            raise RuntimeError(route[len("error: "):])
        if route != "triton":
            status = f"unavailable: the Triton kernels do not run for {key} here"
        else:
            try:
                status = _self_check(dev, dtype, channels_last)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or launch is a failed check too
                status = f"mismatch: the kernels raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if status != "ok":
                warnings.warn(f"fastcifar_kernels: the fused GroupNorm+ReLU kernel disagrees with torch on {key} "
                              f"({status}); using the torch implementation there", RuntimeWarning, stacklevel=2)
            _ROUTES.clear()
        if route == "triton":  # "unavailable" is not cached: the environment may still change
            _STATUS[key] = status
    if status != "ok" and strict:
        raise RuntimeError(f"fused GroupNorm+ReLU kernel on {key}: {status}")
    return status == "ok"


def kernel_status() -> dict:
    """Results of verify_kernel so far, e.g. {"cuda/bfloat16/channels_last": "ok"}."""
    return dict(_STATUS)


# ---------------------------------------------------------------------------------------------
# The torch.library op and its autograd: what eager and torch.compile both call
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcifar_kernels::group_norm_relu", mutates_args=())
def _op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if _route(x) == "triton":
        return _forward(x, num_groups, weight, bias, eps)
    return _torch_forward(x, num_groups, weight, bias, eps)


@_op.register_fake
def _(x, num_groups, weight, bias, eps):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.preserve_format), stats, stats.clone()


@torch.library.custom_op("fastcifar_kernels::group_norm_relu_backward", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int, weight: Optional[Tensor],
            bias: Optional[Tensor], needs_dx: bool, needs_dw: bool, needs_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    run = _backward if _route(x) == "triton" else _torch_backward
    dx, dw, db = run(dy, x, mean, rstd, num_groups, weight, bias, needs_dx, needs_dw, needs_db)
    # an op cannot return None: empty tensors stand in for grads nobody asked for
    none = lambda: x.new_empty((0,))  # noqa: E731
    return (dx if dx is not None else none(), dw if dw is not None else none(),
            db if db is not None else none())


@_bwd_op.register_fake
def _(dy, x, mean, rstd, num_groups, weight, bias, needs_dx, needs_dw, needs_db):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.preserve_format) if need and t is not None else x.new_empty((0,))
    return like(x, needs_dx), like(weight, needs_dw), like(bias, needs_db)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)  # x, not xhat or y
    ctx.num_groups = num_groups
    ctx.mark_non_differentiable(mean, rstd)


def _backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    needs_dx, _, needs_dw, needs_db, _ = ctx.needs_input_grad
    needs_dw, needs_db = needs_dw and weight is not None, needs_db and bias is not None
    dx, dw, db = _bwd_op(dy, x, mean, rstd, ctx.num_groups, weight, bias, needs_dx, needs_dw, needs_db)
    return dx if needs_dx else None, None, dw if needs_dw else None, db if needs_db else None, None


_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional entry point and nn.Module
# ---------------------------------------------------------------------------------------------
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


def group_norm_relu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """relu(group_norm(x, num_groups, weight, bias, eps)) for a 4-D x, fused where the kernels run.

    Same result as F.relu(F.group_norm(...)); the output keeps x's memory format and dtype (statistics
    in fp32; under autocast bf16 in gives bf16 out, unlike nn.GroupNorm's fp32). One torch.library op
    (fastcifar_kernels::group_norm_relu), so torch.compile(fullgraph=True) keeps one graph.
    """
    _check_args(x, num_groups, weight, bias)
    return torch.ops.fastcifar_kernels.group_norm_relu(x, num_groups, weight, bias, eps)[0]


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
