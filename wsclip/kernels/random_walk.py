"""Random-walk propagation x T^(2^t) over the IRN neighbourhood, without forming T.

METHODS.md section 6. The grid's pixels are the nodes; pixel i = (y, x) links to
j = i + o_k for the K forward offsets o_k = (dy_k, dx_k) of `neighbor_offsets(radius)`
with weight a(i, j) = affinity[b, k, y, x] (ignored when j falls outside the grid). The full
affinity A is symmetric with A_ii = 1, T_ij = A_ij^beta / D_j with D_j = sum_i A_ij^beta
(column-normalised), and each class map x is a row vector: x'_j = sum_i x_i T_ij.

T^(2^t) is applied as 2^t steps of a (2K+1)-point gather stencil (69 points at radius 5):
the weights are computed once per image, then each step reads x, the K forward weights and
1/D, and writes x' (ping-pong buffers). `dense_random_walk` is IRN's dense formulation
(T as an HW x HW matrix squared t times), kept as the reference of truth for tests and
benchmarks: it needs (HW)^2 memory and about 2 t (HW)^3 FLOP.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

import torch

from wsclip.errors import ShapeError
from wsclip.kernels import _dispatch
from wsclip.kernels._dispatch import check_launch, import_triton, interpreting, next_pow2, resolve_backend, tuned
from wsclip.kernels.tuning import RW_MAX_BLOCK_C, SPECS

tl = None  # triton.language, bound by _triton_kernels() on first use of the Triton path


@functools.lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    if int(radius) != radius or radius < 1:
        raise ShapeError(f"radius must be a positive integer, got {radius}")
    r = int(radius)
    offs = [(0, dx) for dx in range(1, r)]
    offs += [(dy, dx) for dy in range(1, r) for dx in range(-(r - 1), r) if dx * dx + dy * dy < r * r]
    return tuple(offs)


def neighbor_offsets(radius: int) -> torch.Tensor:
    """The forward offsets (dy, dx) of the IRN neighbourhood as a LongTensor (K, 2).

    (0, dx) for dx = 1..r-1, then (dy, dx) for dy = 1..r-1, dx = -(r-1)..r-1 with
    dx^2 + dy^2 < r^2. radius 5 gives 34 offsets (69 neighbours with mirrors and self).
    """
    offs = _offsets(radius)
    return torch.tensor(offs, dtype=torch.long).reshape(len(offs), 2)


# ----------------------------------------------------------------------------- weights
def _check(x: torch.Tensor, affinity: torch.Tensor, radius: int) -> tuple[tuple[int, int], ...]:
    offs = _offsets(radius)
    if x.dim() != 4 or affinity.dim() != 4:
        raise ShapeError(
            f"random_walk expects x (B,C,H,W) and affinity (B,K,H,W), got {tuple(x.shape)} and {tuple(affinity.shape)}"
        )
    B, _, H, W = x.shape
    if tuple(affinity.shape) != (B, len(offs), H, W):
        raise ShapeError(
            f"affinity must be (B, K, H, W) = ({B}, {len(offs)}, {H}, {W}) for radius {radius} "
            f"(K = len(neighbor_offsets(radius))), got {tuple(affinity.shape)}"
        )
    if x.device != affinity.device:
        raise ShapeError(f"x is on {x.device} but affinity on {affinity.device}: move both to one device")
    return offs


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = t[..., y - dy, x - dx], zero where that falls outside (dy >= 0)."""
    H, W = t.shape[-2:]
    out = torch.zeros_like(t)
    if dy >= H or abs(dx) >= W:
        return out
    ys, yd = slice(0, H - dy), slice(dy, H)
    if dx >= 0:
        xs, xd = slice(0, W - dx), slice(dx, W)
    else:
        xs, xd = slice(-dx, W), slice(0, W + dx)
    out[..., yd, xd] = t[..., ys, xs]
    return out


def stencil_weights(affinity: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(wf, inv_d): wf (B,K,H,W) fp32 = a^beta where the forward neighbour is inside, else 0;
    inv_d (B,H,W) = 1 / D_j, D_j = 1 + sum of the weights of j's 2K neighbours.

    Computed once per image in float64 and rounded to fp32 at the end: the 256 steps
    reuse these weights, so their rounding error would otherwise compound (measured at
    32x32: max element error 4e-4 with fp32 weights, 1.3e-4 with these)."""
    offs = _offsets(radius)
    B, K, H, W = affinity.shape
    wide = torch.float32 if affinity.device.type == "mps" else torch.float64
    a = affinity.to(wide).clamp_min(0)
    wf = torch.exp(beta * torch.log(a))  # a^beta; a = 0 gives exp(-inf) = 0
    valid = torch.zeros(K, H, W, dtype=torch.bool, device=a.device)
    for k, (dy, dx) in enumerate(offs):
        if dy < H and abs(dx) < W:
            valid[k, : H - dy, max(0, -dx) : W - max(0, dx)] = True
    wf = torch.where(valid, wf, 0.0)  # whatever lies outside (even NaN) is ignored
    d = 1.0 + wf.sum(1)
    for k, (dy, dx) in enumerate(offs):
        d += _shift(wf[:, k], dy, dx)
    return wf.float().contiguous(), (1.0 / d).float().contiguous()


_DELTA_DOC = """Both paths iterate on the change d = x_t - x0 rather than on x_t itself:
x_{t+1} = x_t T gives d_1 = x0 T - x0 = c and d_{t+1} = c + d_t T, output x0 + d.
Same arithmetic count, but a pixel nearly cut off by boundaries receives inflows far below
half an fp32 ulp of its own value; added to the small d they survive, added to x_t they
are rounded away 256 times (measured at 32x32 against float64: norm-wise error 2.4e-5 ->
1.5e-5, max element error 1.9e-4 -> 1.3e-4 of the largest value)."""


# ----------------------------------------------------------------------------- PyTorch path
def stencil_matrix(wf: torch.Tensor, inv_d: torch.Tensor, radius: int) -> torch.Tensor:
    """T^T as a sparse CSR matrix (B*HW, B*HW), block-diagonal over the batch.

    Row j holds the stencil of pixel j: T_ij = A_ij^beta / D_j for the (at most 2K+1)
    neighbours i of j, built straight from the stencil weights (T is never dense).
    """
    offs = _offsets(radius)
    B, K, H, W = wf.shape
    hw = H * W
    dev = wf.device
    # every tap as (dy, dx, weight at the destination j); sorted by flat offset so that the
    # column indices of each row come out sorted
    taps = [(0, 0, torch.ones_like(inv_d))]
    taps += [(dy, dx, wf[:, k]) for k, (dy, dx) in enumerate(offs)]
    taps += [(-dy, -dx, _shift(wf[:, k], dy, dx)) for k, (dy, dx) in enumerate(offs)]
    taps.sort(key=lambda t: t[0] * W + t[1])
    yy = torch.arange(H, device=dev).view(H, 1)
    xx = torch.arange(W, device=dev).view(1, W)
    vals, valid, cols = [], [], []
    for dy, dx, w in taps:
        inside = (yy + dy >= 0) & (yy + dy < H) & (xx + dx >= 0) & (xx + dx < W)
        vals.append(w * inv_d)
        valid.append(inside.expand(H, W))
        cols.append(dy * W + dx)
    vals = torch.stack(vals, -1).reshape(B, hw, len(taps))
    valid = torch.stack(valid, -1).reshape(1, hw, len(taps)).expand(B, hw, len(taps))
    itype = torch.int32 if B * hw * len(taps) < 2**31 else torch.int64  # 32-bit indices: less to stream
    base = torch.arange(B * hw, device=dev, dtype=itype).view(B, hw, 1)
    col = (base + torch.tensor(cols, device=dev, dtype=itype).view(1, 1, -1))[valid]
    crow = torch.zeros(B * hw + 1, dtype=itype, device=dev)
    crow[1:] = valid.reshape(B * hw, -1).sum(-1).cumsum(0)
    vals = vals[valid]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, vals, size=(B * hw, B * hw), dtype=torch.float32, device=dev)


def _walk_torch(x: torch.Tensor, wf: torch.Tensor, inv_d: torch.Tensor, radius: int, steps: int) -> torch.Tensor:
    """The stencil with torch ops: sparse products with the CSR stencil matrix, in the
    change-iteration form of `_DELTA_DOC` (x0 + d, d <- c + d T).

    Measured about 2x faster on the CPU than 69 shift-and-add passes over padded tensors
    (one library call per step instead of 2K+1 elementwise ops).
    """
    B, C, H, W = x.shape
    tt = stencil_matrix(wf, inv_d, radius)
    x0 = x.float().permute(0, 2, 3, 1).reshape(B * H * W, C).contiguous()
    with torch.no_grad():
        if steps == 0:
            y = x0
        else:
            c = tt @ x0 - x0
            d = c
            for _ in range(steps - 1):
                d = tt @ d + c
            y = x0 + d
    return y.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- Triton path
@functools.lru_cache(maxsize=None)
def _jit_kernels(interpret: bool) -> dict:
    """The `triton.jit` functions by name, interpreted ones when `interpret` (launch space: tuning.SPECS["random_walk.<name>"])."""
    global tl
    triton, tl = import_triton()

    @triton.jit
    def rw_step(src, dst, add, wf, inv_d, offs, C, H, W, K, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # one program: BLOCK_C classes x BLOCK_P pixels of one image;
        # x'_j = (sum_i w_ij x_i) / D_j + add_j (the change-iteration form, see _DELTA_DOC)
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2)
        HW = H * W
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < HW
        cm = c < C
        py = p // W
        px = p % W
        rows = (b * C + c).to(tl.int64)[:, None] * HW
        acc = tl.load(src + rows + p[None, :], mask=cm[:, None] & pm[None, :], other=0.0).to(tl.float32)
        wrow = wf + (b * K).to(tl.int64) * HW
        for k in range(K):
            dy = tl.load(offs + 2 * k)
            dx = tl.load(offs + 2 * k + 1)
            # forward neighbour j + o_k: weight stored at j
            qx = px + dx
            okf = pm & (py + dy < H) & (qx >= 0) & (qx < W)
            q = p + dy * W + dx
            w = tl.load(wrow + k * HW + p, mask=okf, other=0.0)
            v = tl.load(src + rows + q[None, :], mask=cm[:, None] & okf[None, :], other=0.0)
            acc += w[None, :] * v.to(tl.float32)
            # backward neighbour j - o_k: weight stored at j - o_k
            rx = px - dx
            okb = pm & (py - dy >= 0) & (rx >= 0) & (rx < W)
            r = p - dy * W - dx
            w = tl.load(wrow + k * HW + r, mask=okb, other=0.0)
            v = tl.load(src + rows + r[None, :], mask=cm[:, None] & okb[None, :], other=0.0)
            acc += w[None, :] * v.to(tl.float32)
        acc = acc * tl.load(inv_d + b * HW + p, mask=pm, other=0.0)[None, :]
        acc += tl.load(add + rows + p[None, :], mask=cm[:, None] & pm[None, :], other=0.0)
        tl.store(dst + rows + p[None, :], acc, mask=cm[:, None] & pm[None, :])

    return {"rw_step": rw_step}


@functools.lru_cache(maxsize=None)
def _triton_kernels(interpret: bool):
    triton, _ = import_triton()
    return triton, tuned(_jit_kernels(interpret)["rw_step"], SPECS["random_walk.rw_step"])


def _offset_table(radius: int, device) -> torch.Tensor:
    offs = _offsets(radius)
    flat = [v for o in offs for v in o] or [0, 0]
    return torch.tensor(flat, dtype=torch.int32, device=device)


def _walk_triton(x: torch.Tensor, wf: torch.Tensor, inv_d: torch.Tensor, radius: int, steps: int,
                 off_t: torch.Tensor | None = None) -> torch.Tensor:
    """`steps` launches of the stencil kernel in the change-iteration form (see `_DELTA_DOC`):
    one launch gives c = x0 T - x0, then d <- d T + c ping-pongs two fp32 buffers."""
    triton, step = _triton_kernels(interpreting())
    B, C, H, W = x.shape
    K = len(_offsets(radius))
    if off_t is None:
        off_t = _offset_table(radius, x.device)
    block_c = min(next_pow2(C), RW_MAX_BLOCK_C)
    x0 = x.float().contiguous()
    if steps == 0 or x0.numel() == 0:
        return x0.clone()
    neg_x0 = -x0
    c = _dispatch.empty(x0.shape, torch.float32, x0.device)
    bufs = [_dispatch.empty(x0.shape, torch.float32, x0.device) for _ in range(2)]

    def grid(meta):
        return (triton.cdiv(H * W, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]), B)

    check_launch(SPECS["random_walk.rw_step"], src=x0, wf=wf, inv_d=inv_d, offs=off_t, BLOCK_C=block_c)
    step[grid](x0, c, neg_x0, wf, inv_d, off_t, C, H, W, K, BLOCK_C=block_c)
    cur = c
    for s in range(steps - 1):
        dst = bufs[s % 2]
        step[grid](cur, dst, c, wf, inv_d, off_t, C, H, W, K, BLOCK_C=block_c)
        cur = dst
    return x0 + cur


_GRAPHS: OrderedDict = OrderedDict()  # (shape, radius, steps, device) -> captured walk; a few kept
_MAX_GRAPHS = 4


def _walk_triton_graph(x: torch.Tensor, wf: torch.Tensor, inv_d: torch.Tensor, radius: int, steps: int) -> torch.Tensor:
    """The same launches, captured once per shape in a CUDA graph and replayed afterwards.

    Removes the per-step launch overhead for repeated calls with one shape; the first call
    for a shape runs the plain path (compiling and autotuning) and then captures.
    """
    key = (tuple(x.shape), radius, steps, str(x.device))
    entry = _GRAPHS.get(key)
    if entry is None:
        out = _walk_triton(x, wf, inv_d, radius, steps)  # compiles and autotunes outside the capture
        static = (x.float().contiguous().clone(), wf.clone(), inv_d.clone(), _offset_table(radius, x.device))
        torch.cuda.synchronize(x.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = _walk_triton(*static[:3], radius, steps, off_t=static[3])
        _GRAPHS[key] = (graph, static, result)
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
        return out
    _GRAPHS.move_to_end(key)
    graph, (xs, ws, ds, _), result = entry
    xs.copy_(x)
    ws.copy_(wf)
    ds.copy_(inv_d)
    graph.replay()
    return result.clone()


# ----------------------------------------------------------------------------- public
def random_walk(
    x: torch.Tensor,
    affinity: torch.Tensor,
    radius: int,
    beta: float = 10.0,
    exp_times: int = 8,
    backend: str = "auto",
    cuda_graph: bool = False,
) -> torch.Tensor:
    """x T^(2^exp_times) for each class map, T the column-normalised A^beta (METHODS.md 6).

    x (B,C,H,W); affinity (B,K,H,W) for the K forward offsets of `neighbor_offsets(radius)`,
    affinity[b, k, y, x] = a((y, x), (y + dy_k, x + dx_k)) in [0, 1] (negative values are
    clamped to 0; entries whose neighbour is outside the grid are ignored). Accumulates in
    fp32 and returns x's dtype. backend: "auto" (Triton on CUDA), "triton" or "torch".
    cuda_graph=True (Triton on CUDA only) captures the 2^exp_times launches once per shape
    and replays them on later calls with that shape. Not differentiable.
    """
    _check(x, affinity, radius)
    if exp_times < 0 or not beta > 0:
        raise ShapeError(f"need exp_times >= 0 and beta > 0, got exp_times={exp_times}, beta={beta}")
    path = resolve_backend(backend, x, affinity)
    with torch.no_grad():
        wf, inv_d = stencil_weights(affinity, radius, beta)
        steps = 2 ** int(exp_times)
        if path == "triton":
            walk = _walk_triton_graph if (cuda_graph and x.is_cuda and not interpreting()) else _walk_triton
        else:
            walk = _walk_torch
        out = walk(x, wf, inv_d, int(radius), steps)
    return out.to(x.dtype) if x.dtype.is_floating_point else out


def transition_matrix(affinity: torch.Tensor, radius: int, beta: float = 10.0, dtype=torch.float64) -> torch.Tensor:
    """The dense column-normalised T (B, HW, HW) of IRN, in `dtype` (memory (HW)^2 per image)."""
    offs = _offsets(radius)
    B, K, H, W = affinity.shape
    if K != len(offs):
        raise ShapeError(f"affinity has {K} offset channels, radius {radius} needs {len(offs)}")
    n = H * W
    a = torch.zeros(B, n, n, dtype=dtype, device=affinity.device)
    idx = torch.arange(n, device=affinity.device).reshape(H, W)
    a[:, idx.reshape(-1), idx.reshape(-1)] = 1.0
    aff = affinity.to(dtype).clamp_min(0)
    for k, (dy, dx) in enumerate(offs):
        if dy >= H or abs(dx) >= W:
            continue  # the neighbour is always outside the grid
        ys = slice(0, H - dy)
        xs = slice(max(0, -dx), W - max(0, dx))
        i = idx[ys, xs].reshape(-1)
        j = idx[dy : dy + (H - dy), xs.start + dx : xs.stop + dx].reshape(-1)
        v = aff[:, k, ys, xs].reshape(B, -1)
        a[:, i, j] = v
        a[:, j, i] = v
    a = a.pow(beta)
    return a / a.sum(1, keepdim=True)


def dense_random_walk(
    x: torch.Tensor,
    affinity: torch.Tensor,
    radius: int,
    beta: float = 10.0,
    exp_times: int = 8,
    dtype=torch.float64,
) -> torch.Tensor:
    """IRN's dense formulation: build T (HW x HW), square it exp_times times, return x T.

    The reference of truth for tests and benchmarks; computes and returns in `dtype`.
    """
    _check(x, affinity, radius)
    B, C, H, W = x.shape
    t = transition_matrix(affinity, radius, beta, dtype)
    for _ in range(int(exp_times)):
        t = torch.matmul(t, t)
    return torch.matmul(x.to(dtype).reshape(B, C, H * W), t).reshape(B, C, H, W)
