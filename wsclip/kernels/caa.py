"""CLIP-ES class-aware attention affinity (CAA): the transition and the box-masked propagation.

METHODS.md section 5. From the averaged attention W (B, N, N), N = h*w patches row-major:
`iters` rounds of D = D / column sums, D = D / row sums; S = (D + D^T) / 2; A = S @ S.
For each class c with CAM M_c and box mask b_c: F_c = A @ (b_c * vec(M_c)), then min-max
normalised per class, (F - min) / (max - min + EPS) with EPS = 1e-7 as CLIP-ES does.

The alternating normalisation keeps D = diag(r) W diag(c), so the fast paths compute the
scale vectors with 2 * iters matrix-vector products (c = 1 / (W^T r), r = 1 / (W c)) instead
of rewriting D 2 * iters times. The Triton transition forms S on the fly from W, r and c
inside a `tl.dot` tiled product and computes only the tiles on and above the diagonal
(A is symmetric), writing each off-diagonal tile twice. `caa_refine` goes further: with S
symmetric, F = V A^T = (V S) S, and V S needs only W, r and c: skinny products with W and
W^T instead of the N^3 square, and no N x N temporary at all.

GPU precision, decided in `tuning.DOT_PRECISION` with the reasons: every `tl.dot` uses TF32 tensor
cores (the square is compute-bound; exact fp32 in the propagation spills registers). Every term is
>= 0, so each product is within `tuning.dot_rel_bound("tf32", N)` (about 1e-3) element-wise; the
parity tests take their tolerances from the same bound.
"""

from __future__ import annotations

import functools

import torch

from wsclip.errors import ShapeError
from wsclip.kernels import _dispatch
from wsclip.kernels._dispatch import check_launch, import_triton, interpreting, next_pow2, resolve_backend, tuned
from wsclip.kernels.tuning import CAA_MAX_BLOCK_C, SPECS

tl = None  # triton.language, bound by _triton_kernels() on first use of the Triton path

EPS = 1e-7  # min-max normalisation: (F - min) / (max - min + EPS), as CLIP-ES's scale_cam_image


# ----------------------------------------------------------------------------- checks and helpers
def _check_attn(attn: torch.Tensor) -> None:
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ShapeError(f"attention must be (B, N, N), got {tuple(attn.shape)}")
    if not attn.dtype.is_floating_point:
        raise ShapeError(f"attention must be floating point, got {attn.dtype}")


def _check_prop(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> None:
    _check_attn(transition)
    if cams.dim() != 4 or tuple(masks.shape) != tuple(cams.shape):
        raise ShapeError(f"cams and masks must both be (B, C, h, w), got {tuple(cams.shape)} and {tuple(masks.shape)}")
    B, _, h, w = cams.shape
    if transition.shape[0] != B or transition.shape[1] != h * w:
        raise ShapeError(
            f"transition must be (B, N, N) = ({B}, {h * w}, {h * w}) for cams {tuple(cams.shape)}, "
            f"got {tuple(transition.shape)}"
        )
    if not (transition.device == cams.device == masks.device):
        raise ShapeError("transition, cams and masks must be on one device")


def _calc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def minmax(f: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation over the last dim: (f - min) / (max - min + EPS)."""
    lo = f.amin(-1, keepdim=True)
    hi = f.amax(-1, keepdim=True)
    return (f - lo) / (hi - lo + EPS)


def _sources(cams: torch.Tensor, masks: torch.Tensor, dtype) -> torch.Tensor:
    """V = b_c * vec(M_c) as (B, C, N)."""
    B, C, h, w = cams.shape
    return (cams.to(dtype) * masks.to(dtype)).reshape(B, C, h * w)


def sinkhorn_scales(w: torch.Tensor, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, c), each (B, N), with diag(r) W diag(c) = `iters` rounds of column then row normalisation."""
    r = torch.ones(w.shape[:2], dtype=w.dtype, device=w.device)
    c = r
    for _ in range(int(iters)):
        c = 1.0 / torch.matmul(r.unsqueeze(1), w).squeeze(1)  # column sums of diag(r) W
        r = 1.0 / torch.matmul(w, c.unsqueeze(2)).squeeze(2)  # row sums of W diag(c)
    return r, c


def symmetric_transition(attn: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """S = (D + D^T) / 2 with D the normalised attention (so the transition is S @ S)."""
    _check_attn(attn)
    w = attn.to(_calc_dtype(attn))
    r, c = sinkhorn_scales(w, iters)
    d = r.unsqueeze(2) * w * c.unsqueeze(1)
    return (d + d.transpose(1, 2)) * 0.5


# ----------------------------------------------------------------------------- PyTorch references
def caa_transition_reference(attn: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """The literal algorithm: normalise columns then rows `iters` times, symmetrise, square."""
    d = attn.to(_calc_dtype(attn))
    for _ in range(int(iters)):
        d = d / d.sum(1, keepdim=True)
        d = d / d.sum(2, keepdim=True)
    s = (d + d.transpose(1, 2)) / 2
    return torch.matmul(s, s)


def caa_propagate_reference(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """F_c = A @ (b_c * vec(M_c)), min-max normalised per class; (B, C, h, w)."""
    dt = _calc_dtype(transition)
    v = _sources(cams, masks, dt)
    f = torch.matmul(v, transition.to(dt).transpose(1, 2))  # rows: (A @ v_c)^T
    return minmax(f).reshape(cams.shape)


# ----------------------------------------------------------------------------- Triton kernels
@functools.lru_cache(maxsize=None)
def _jit_kernels(interpret: bool) -> dict:
    """The `triton.jit` functions by name, interpreted ones when `interpret` (launch space:
    tuning.SPECS["caa.<name>"]; DOT is the tl.dot input precision, tuning.DOT_PRECISION)."""
    global tl
    triton, tl = import_triton()

    @triton.jit
    def sym_square(w, r, c, out, N, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        # out = S @ S, S_ij = (r_i W_ij c_j + r_j W_ji c_i) / 2; tiles on/above the diagonal only
        b = tl.program_id(0)
        ti = tl.program_id(1)
        tj = tl.program_id(2)
        if tj >= ti:
            wb = w + b.to(tl.int64) * N * N
            rb = r + b * N
            cb = c + b * N
            im = ti * BLOCK + tl.arange(0, BLOCK)
            jn = tj * BLOCK + tl.arange(0, BLOCK)
            imask = im < N
            jmask = jn < N
            ri = tl.load(rb + im, mask=imask, other=0.0)
            ci = tl.load(cb + im, mask=imask, other=0.0)
            rj = tl.load(rb + jn, mask=jmask, other=0.0)
            cj = tl.load(cb + jn, mask=jmask, other=0.0)
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for k0 in range(0, N, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < N
                rk = tl.load(rb + kk, mask=kmask, other=0.0)
                ck = tl.load(cb + kk, mask=kmask, other=0.0)
                m_ik = imask[:, None] & kmask[None, :]
                w_ik = tl.load(wb + im[:, None] * N + kk[None, :], mask=m_ik, other=0.0).to(tl.float32)
                w_ki = tl.load(wb + kk[None, :] * N + im[:, None], mask=m_ik, other=0.0).to(tl.float32)
                s_ik = (ri[:, None] * w_ik * ck[None, :] + rk[None, :] * w_ki * ci[:, None]) * 0.5
                m_kj = kmask[:, None] & jmask[None, :]
                w_kj = tl.load(wb + kk[:, None] * N + jn[None, :], mask=m_kj, other=0.0).to(tl.float32)
                w_jk = tl.load(wb + jn[None, :] * N + kk[:, None], mask=m_kj, other=0.0).to(tl.float32)
                s_kj = (rk[:, None] * w_kj * cj[None, :] + rj[None, :] * w_jk * ck[:, None]) * 0.5
                acc += tl.dot(s_ik, s_kj, input_precision=DOT)
            ob = out + b.to(tl.int64) * N * N
            omask = imask[:, None] & jmask[None, :]
            tl.store(ob + im[:, None] * N + jn[None, :], acc, mask=omask)
            if tj > ti:
                tl.store(ob + jn[None, :] * N + im[:, None], acc, mask=omask)

    @triton.jit
    def propagate(a, v, r, c, out, N, C, SYM: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
        # one program: BLOCK_I rows i x BLOCK_C classes (program_id 2 picks the class block)
        # SYM=False: out[b, c, i] = sum_j a[b, i, j] v[b, c, j]   (out = v a^T)
        # SYM=True:  out = v S with S = (diag(r) a diag(c) + diag(c) a^T diag(r)) / 2, S never formed:
        #   out[c, i] = (r_i sum_j a_ij c_j v_cj + c_i sum_j a_ji r_j v_cj) / 2
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        imask = i < N
        cmask = cc < C
        ab = a + b.to(tl.int64) * N * N
        vb = v + b.to(tl.int64) * C * N
        acc = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jmask = j < N
            m_ij = imask[:, None] & jmask[None, :]
            vt = tl.load(vb + cc[None, :] * N + j[:, None], mask=jmask[:, None] & cmask[None, :], other=0.0)
            vt = vt.to(tl.float32)
            at = tl.load(ab + i[:, None] * N + j[None, :], mask=m_ij, other=0.0).to(tl.float32)
            if SYM:
                cj = tl.load(c + b * N + j, mask=jmask, other=0.0)
                rj = tl.load(r + b * N + j, mask=jmask, other=0.0)
                acc += tl.dot(at, vt * cj[:, None], input_precision=DOT)
                a_ji = tl.load(ab + j[None, :] * N + i[:, None], mask=m_ij, other=0.0).to(tl.float32)
                acc_t += tl.dot(a_ji, vt * rj[:, None], input_precision=DOT)
            else:
                acc += tl.dot(at, vt, input_precision=DOT)
        if SYM:
            ri = tl.load(r + b * N + i, mask=imask, other=0.0)
            ci = tl.load(c + b * N + i, mask=imask, other=0.0)
            acc = (acc * ri[:, None] + acc_t * ci[:, None]) * 0.5
        tl.store(out + b.to(tl.int64) * C * N + cc[None, :] * N + i[:, None], acc,
                 mask=imask[:, None] & cmask[None, :])

    return {"sym_square": sym_square, "propagate": propagate}


@functools.lru_cache(maxsize=None)
def _triton_kernels(interpret: bool):
    triton, _ = import_triton()
    jit = _jit_kernels(interpret)
    return triton, tuned(jit["sym_square"], SPECS["caa.sym_square"]), tuned(jit["propagate"], SPECS["caa.propagate"])


def _square_triton(w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    triton, square, _ = _triton_kernels(interpreting())
    B, N, _ = w.shape
    out = _dispatch.empty((B, N, N), torch.float32, w.device)
    if B and N:
        r, c = r.float().contiguous(), c.float().contiguous()
        check_launch(SPECS["caa.sym_square"], w=w, r=r, c=c, out=out)
        grid = lambda meta: (B, triton.cdiv(N, meta["BLOCK"]), triton.cdiv(N, meta["BLOCK"]))  # noqa: E731
        square[grid](w, r, c, out, N)
    return out


def _propagate_triton(a: torch.Tensor, v: torch.Tensor, scales=None) -> torch.Tensor:
    """(B, C, N) = v @ a^T with a (B, N, N); with scales = (r, c): v @ S, S as in `apply_symmetric`."""
    triton, _, prop = _triton_kernels(interpreting())
    B, C, N = v.shape
    out = _dispatch.empty((B, C, N), torch.float32, a.device)
    if B and C and N:
        v = v.float().contiguous()
        r, c = (t.float().contiguous() for t in scales) if scales is not None else (v, v)  # unused when not SYM
        a = a.contiguous() if a.dtype in (torch.float16, torch.bfloat16, torch.float32) else a.float().contiguous()
        block_c = min(max(16, next_pow2(C)), CAA_MAX_BLOCK_C)
        sym = scales is not None
        check_launch(SPECS["caa.propagate"], a=a, v=v, r=r, c=c, out=out, SYM=sym, BLOCK_C=block_c)
        grid = lambda meta: (B, triton.cdiv(N, meta["BLOCK_I"]), triton.cdiv(C, block_c))  # noqa: E731
        prop[grid](a, v, r, c, out, N, C, SYM=sym, BLOCK_C=block_c)
    return out


def apply_symmetric(w: torch.Tensor, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v @ S for v (B, C, N), S = (diag(r) W diag(c) + diag(c) W^T diag(r)) / 2, without forming S.

    Two skinny products with W and W^T (BLAS reads the transpose in place).
    """
    a = torch.matmul(v * r.unsqueeze(1), w) * c.unsqueeze(1)
    b = torch.matmul(v * c.unsqueeze(1), w.transpose(1, 2)) * r.unsqueeze(1)
    return (a + b) * 0.5


# ----------------------------------------------------------------------------- public
def caa_transition(attn: torch.Tensor, iters: int = 3, backend: str = "auto") -> torch.Tensor:
    """The CAA transition A = S @ S (B, N, N), fp32 (fp64 for fp64 input).

    S = (D + D^T) / 2, D the attention after `iters` rounds of column then row normalisation.
    On a GPU the Triton path multiplies with TF32 tensor cores (tuning.DOT_PRECISION): every element
    within `tuning.dot_rel_bound("tf32", N)` (about 1e-3) relative of the fp32 product.
    """
    _check_attn(attn)
    if resolve_backend(backend, attn) == "torch" or attn.dtype == torch.float64:
        return caa_transition_reference(attn, iters)
    w = attn.float().contiguous()
    r, c = sinkhorn_scales(w, iters)
    return _square_triton(attn.contiguous(), r, c)


def caa_propagate(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """F_c = A @ (b_c * vec(M_c)) for every class, min-max normalised; (B, C, h, w) float.

    transition (B, N, N) from `caa_transition`; cams (B, C, h, w); masks (B, C, h, w) bool or
    0/1 (the box masks b_c), N = h * w row-major.
    """
    _check_prop(transition, cams, masks)
    if resolve_backend(backend, transition, cams) == "torch" or transition.dtype == torch.float64:
        return caa_propagate_reference(transition, cams, masks)
    v = _sources(cams, masks, torch.float32)
    return minmax(_propagate_triton(transition, v)).reshape(cams.shape)


def caa_refine(attn: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor, iters: int = 3,
               backend: str = "auto") -> torch.Tensor:
    """caa_propagate(caa_transition(attn, iters), cams, masks) without forming S or S @ S.

    With D = diag(r) W diag(c) and S = (D + D^T) / 2 symmetric, F = V (S S)^T = (V S) S:
    four skinny products with W (8 C N^2 FLOP) instead of 2 N^3, and no N x N temporaries.
    Same result as the two-step path up to rounding.
    """
    _check_attn(attn)
    _check_prop(attn, cams, masks)
    dt = _calc_dtype(attn)
    w = attn.to(dt)
    r, c = sinkhorn_scales(w, iters)
    v = _sources(cams, masks, dt)
    if resolve_backend(backend, attn, cams) == "torch" or dt == torch.float64:
        f = apply_symmetric(w, r, c, apply_symmetric(w, r, c, v))
    else:
        f = _propagate_triton(attn, _propagate_triton(attn, v, (r, c)), (r, c))
    return minmax(f).reshape(cams.shape)
