"""One token's top-k routing after its scores, in one compiled call (CPU decoding).

Decoding one token, a routed layer (or a group of layers that read one input,
`lorlib_ui.core.input_groups`) does some twenty tensor operations after scoring the experts:
top-k, softmax, gathering the chosen rows of A and Bᵀ, widening them, the mix's coefficients and
two small matmuls. Each costs a few microseconds of fixed overhead (Python, dispatch,
allocation) for a few thousand multiply-adds, so `route_decode` does all of it in one call of a
function compiled by numba (`benchmarks/bench_decode.py --kernel-off` measures what it gives,
BENCHMARKS.md); the scores themselves stay one matmul of PyTorch's. For each layer g of the group:

    top-k      the k largest logits among the usable experts, largest first (NaN counts as the
               largest, as in torch.topk); ties keep the lower index first
    softmax    w_j = softmax(top_j / T)
    A side     z_ji = A_{e_j, i} . h                  (the chosen experts' rows only)
    mix        outputs:    c_ji = w_j s_j z_ji
               parameters: c_ji = w_j s_j u_i,  u_i = sum_j w_j z_ji
    B side     out = sum_ji c_ji Bt_{e_j, i}          (the chosen experts' rows only)

numba is a dependency already (umap-learn's) and caches what it compiles the standard way:
beside this module in `__pycache__`, or, where the package cannot be written, in the user's own
cache; no code is loaded from a folder of lorlib's choosing. Factors are float32 or bfloat16
(read as uint16 and widened exactly: a bfloat16 is the top half of a float32); the arithmetic is
float32, summed in another order than the BLAS's, so results agree with the tensor path to
float32 rounding, not bit for bit. With `LORLIB_DECODE_KERNEL=0`, other routers than per-token
top-k, gradients, other dtypes or other devices, decoding takes the tensor operations (tests hold
the two equal).
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
import torch

from lorlib_ui.core.routers.per_token import TopKRouter

SWITCH = "LORLIB_DECODE_KERNEL"  # "0": never use the kernel
STORED = {torch.float32: np.float32, torch.bfloat16: np.uint16}  # how each storage dtype is read


def _widen(rows, wide, bits):
    """Rows of factors as float32 (a stub: numba compiles the overloads below)."""
    raise NotImplementedError


@numba.extending.overload(_widen)
def _widen_overload(rows, wide, bits):
    """float32 rows as they are; bfloat16 rows (their uint16 bits, the top half of a float32's)
    widened into `bits`, the scratch buffer whose float32 view is `wide`: no allocation per call."""
    if rows.dtype == numba.types.uint16:

        def widen(rows, wide, bits):
            n_rows, n = rows.shape
            for i in range(n_rows):
                for t in range(n):
                    bits[i * n + t] = np.uint32(rows[i, t]) << np.uint32(16)
            return wide[: n_rows * n].reshape((n_rows, n))

        return widen
    return lambda rows, wide, bits: rows


@numba.njit(cache=True, nogil=True)
def _greater(a, b):
    return (not np.isnan(b)) if np.isnan(a) else a > b


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def route_decode(a, scales, bts, outs, h, logits, usable, masked, k, temperature, parameters, index, top, wide, bits):
    """Route one token at G layers (see the module's docstring); 0, or 1 when k < 1 or a layer
    has fewer than k usable experts (then nothing is to be trusted). `a` (G·E·r, d_in), `bts`
    G arrays (E·r, d_out_g), `outs` G arrays (d_out_g,) written, `index` and `top` (G, E) written;
    `wide` and `bits`, float32 and uint32 views of one scratch buffer of r·max(d_in, d_out) numbers."""
    n_layers, experts = logits.shape
    rank = a.shape[0] // (n_layers * experts)
    if k < 1 or k > experts:
        return 1
    z = np.empty((k, rank), np.float32)
    for g in range(n_layers):
        found = 0
        for e in range(experts):
            if masked and not usable[g, e]:
                continue
            v = logits[g, e]
            if found == k and not _greater(v, top[g, k - 1]):
                continue
            if found < k:
                j = found
                found += 1
            else:
                j = k - 1
            while j > 0 and _greater(v, top[g, j - 1]):
                top[g, j] = top[g, j - 1]
                index[g, j] = index[g, j - 1]
                j -= 1
            top[g, j] = v
            index[g, j] = e
        if found < k:
            return 1
        largest = top[g, 0] / temperature
        total = np.float32(0.0)
        for j in range(k):
            top[g, j] = np.exp(top[g, j] / temperature - largest)
            total += top[g, j]
        for j in range(k):
            top[g, j] /= total
        for j in range(k):
            first = (g * experts + index[g, j]) * rank
            rows = _widen(a[first : first + rank], wide, bits)
            for i in range(rank):
                acc = np.float32(0.0)
                for t in range(h.shape[0]):
                    acc += h[t] * rows[i, t]
                z[j, i] = acc
        out = outs[g]
        out[:] = 0.0
        bt = bts[g]
        for j in range(k):
            weight = top[g, j] * scales[g * experts + index[g, j]]
            rows = _widen(bt[index[g, j] * rank : (index[g, j] + 1) * rank], wide, bits)
            for i in range(rank):
                if parameters:
                    u = np.float32(0.0)
                    for m in range(k):
                        u += z[m, i] * top[g, m]
                    c = weight * u
                else:
                    c = weight * z[j, i]
                for t in range(out.shape[0]):
                    out[t] += c * rows[i, t]
    return 0


@functools.cache
def _kernel():
    """`route_decode`, or None where it is switched off ($LORLIB_DECODE_KERNEL=0)."""
    return None if os.environ.get(SWITCH, "1") == "0" else route_decode


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory, bfloat16 as its uint16 bits."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def decodes(router, h: torch.Tensor) -> bool:
    """Whether the kernel may route the token h (1, d_in) for `router`: a per-token top-k router
    that scores key vectors, float32 arithmetic, and no gradient wanted (the kernel keeps none)."""
    return (
        isinstance(router, TopKRouter)
        and router.keys is not None
        and h.dtype == torch.float32
        and not torch.is_grad_enabled()
        and _kernel() is not None
    )


def chosen_weights(plan: DecodePlan, g: int, k: int, n_experts: int) -> torch.Tensor:
    """Layer g's routing weights (1, n_experts) from the plan's last call: k non-zero."""
    return plan.top.new_zeros(1, n_experts).scatter_(1, plan.index[g : g + 1, :k], plan.top[g : g + 1, :k])


class DecodePlan:
    """What the kernel needs of G layers that read one input, built once: their stacked A
    (G·E·r, d_in) and scales (G·E,), each layer's Bᵀ (E·r, d_out), and buffers for the results.
    `plan(...)` routes one token; each layer's result is then `outputs[g]` (1, d_out), and its
    choices `index[g, :k]` and weights `top[g, :k]`, until the next call overwrites them."""

    def __init__(self, lora_a: torch.Tensor, scales: torch.Tensor, lora_bts: list[torch.Tensor], n_experts: int):
        g = len(lora_bts)
        self.outputs = [torch.empty(1, bt.shape[1], dtype=torch.float32) for bt in lora_bts]
        self.index = torch.empty(g, n_experts, dtype=torch.int64)
        self.top = torch.empty(g, n_experts, dtype=torch.float32)
        self._held = (lora_a, scales, lora_bts)  # the arrays below are views of their memory
        self._arrays = (
            _array(lora_a),
            scales.numpy(),
            tuple(_array(bt) for bt in lora_bts),
            tuple(out[0].numpy() for out in self.outputs),
        )
        self._results = (self.index.numpy(), self.top.numpy())
        self._no_mask = np.ones((g, n_experts), dtype=np.bool_)
        rank = lora_a.shape[0] // (g * n_experts)
        scratch = np.empty(rank * max(lora_a.shape[1], *(bt.shape[1] for bt in lora_bts)), dtype=np.float32)
        self._scratch = (scratch, scratch.view(np.uint32))
        self._function = _kernel()

    @staticmethod
    def build(lora_a: torch.Tensor, scales: torch.Tensor, lora_bts: list[torch.Tensor], n_experts: int):
        """A plan for these factors, or None where the kernel does not run (switched off, not on
        the CPU, a dtype it does not read, or buffers not laid out as it reads them)."""
        tensors = [lora_a, scales, *lora_bts]
        if (
            _kernel() is None
            or any(t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad for t in tensors)
            or scales.dtype != torch.float32
            or lora_a.dtype not in STORED
            or len({bt.dtype for bt in lora_bts}) != 1
            or lora_bts[0].dtype not in STORED
        ):
            return None
        return DecodePlan(lora_a, scales, lora_bts, n_experts)

    def __call__(
        self, h: torch.Tensor, logits: torch.Tensor, usable: torch.Tensor | None, k: int, temperature: float, mix: str
    ) -> bool:
        """Route the token h (1, d_in) float32 by `logits` (G, E) float32, among the `usable`
        experts (G, E) bool (None: all), to the top k with softmax(·/temperature) weights, mixed
        as `mix` says. False (nothing to trust, take the tensor path) where k < 1 or fewer than k
        experts are usable."""
        a, scales, bts, outs = self._arrays
        shape = self.top.shape  # a lone layer's logits and mask may come as one row (E,)
        mask = self._no_mask if usable is None else usable.contiguous().numpy().reshape(shape)
        status = self._function(
            a,
            scales,
            bts,
            outs,
            h.contiguous()[0].numpy(),
            logits.contiguous().numpy().reshape(shape),
            mask,
            usable is not None,
            k,
            np.float32(temperature),
            mix == "parameters",
            *self._results,
            *self._scratch,
        )
        return status == 0
