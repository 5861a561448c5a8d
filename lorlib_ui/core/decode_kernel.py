"""One token's top-k routing after its scores, in one call of a small C function (CPU decoding).

Decoding one token, a routed layer (or a group of layers that read one input,
`lorlib_ui.core.input_groups`) does some twenty tensor operations after scoring the experts:
top-k, softmax, gathering the chosen rows of A and Bᵀ, widening them, the mix's coefficients and
two small matmuls. Each costs a few microseconds of fixed overhead (Python, dispatch,
allocation) for a few thousand multiply-adds: routing added 7.7 ms to a 46 ms step of the
embedded model with 64 experts, 4.6 ms with this kernel (`benchmarks/bench_decode.py
--kernel-off`, BENCHMARKS.md). PyTorch has no fused operation for this, and torch.compile, tried
once, was slower than eager (its guards cost more than the operations), so `decode_kernel.c`
does all of it in one call; the scores themselves stay one matmul of PyTorch's.

The C file is compiled once per machine with the system's C compiler (`$CC`, else `cc`) into
the lorlib cache (`kernels/`), named by a hash of the source, the flags and the CPU's vector
level, and loaded with ctypes. Where no compiler is found, the compile fails, or
`LORLIB_DECODE_KERNEL=0` is set, decoding takes the tensor path it replaces (the same results;
tests hold the two equal): nothing else changes. It runs for per-token top-k routers
(`TopKRouter`), float32 arithmetic, and factors stored in float32 or bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from lorlib_ui.core.atomic import temporary_name
from lorlib_ui.core.cache import cache_dir
from lorlib_ui.core.routers.per_token import TopKRouter

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernel.c")
SWITCH = "LORLIB_DECODE_KERNEL"  # "0": never use the kernel
# -fopenmp-simd: the source's `omp simd` loops may be vectorised (no OpenMP runtime is linked)
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno"]
VECTOR_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma"]}  # PyTorch's own reading of the CPU
STORED = {torch.float32: 0, torch.bfloat16: 1}


class _Plan(ctypes.Structure):  # the C `Plan`, field for field
    _fields_ = [
        ("members", ctypes.c_int32),
        ("experts", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("d_in", ctypes.c_int32),
        ("a_bf16", ctypes.c_int32),
        ("bt_bf16", ctypes.c_int32),
        ("a", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bt", ctypes.POINTER(ctypes.c_void_p)),
        ("d_out", ctypes.POINTER(ctypes.c_int32)),
        ("out", ctypes.POINTER(ctypes.c_void_p)),
        ("index", ctypes.c_void_p),
        ("top", ctypes.c_void_p),
    ]


@functools.cache
def _kernel():
    """The compiled `lorlib_route_decode`, or None where it cannot be had (said once, in the log)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: decoding routes with tensor operations (slower with many layers)")
        return None
    flags = FLAGS + VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"decode-{digest}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_name(path)
            try:
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        function = ctypes.CDLL(str(path)).lorlib_route_decode
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or str(error).encode()
        log.warning("decoding kernel unavailable, routing with tensor operations: %s", detail.decode().strip()[:300])
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_float, ctypes.c_int32]
    return function


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
        self._held = (lora_a, scales, lora_bts)  # the kernel reads their memory: keep them alive
        g, e = len(lora_bts), n_experts
        d_out = [bt.shape[1] for bt in lora_bts]
        self.outputs = [torch.empty(1, n, dtype=torch.float32) for n in d_out]
        self.index = torch.empty(g, e, dtype=torch.int64)
        self.top = torch.empty(g, e, dtype=torch.float32)
        self._arrays = (
            (ctypes.c_void_p * g)(*(bt.data_ptr() for bt in lora_bts)),
            (ctypes.c_int32 * g)(*d_out),
            (ctypes.c_void_p * g)(*(out.data_ptr() for out in self.outputs)),
        )
        self._plan = _Plan(
            g,
            e,
            lora_a.shape[0] // (g * e),
            lora_a.shape[1],
            STORED[lora_a.dtype],
            STORED[lora_bts[0].dtype],
            lora_a.data_ptr(),
            scales.data_ptr(),
            *self._arrays,
            self.index.data_ptr(),
            self.top.data_ptr(),
        )
        self._address = ctypes.addressof(self._plan)
        self._function = _kernel()

    @staticmethod
    def build(lora_a: torch.Tensor, scales: torch.Tensor, lora_bts: list[torch.Tensor], n_experts: int):
        """A plan for these factors, or None where the kernel does not run (unavailable, not on
        the CPU, a dtype it does not read, or buffers not laid out as it reads them)."""
        tensors = [lora_a, scales, *lora_bts]
        if (
            _kernel() is None
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
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
        # held here, contiguous, while the kernel reads them
        h, logits = h.contiguous(), logits.contiguous()
        usable = None if usable is None else usable.contiguous()
        status = self._function(
            self._address,
            h.data_ptr(),
            logits.data_ptr(),
            None if usable is None else usable.data_ptr(),
            k,
            temperature,
            mix == "parameters",
        )
        return status == 0
