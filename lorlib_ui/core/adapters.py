"""Reading, checking and writing standard PEFT LoRA adapter folders.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
`PeftModel.save_pretrained` writes them, so every expert in a library also loads with plain
`PeftModel.from_pretrained`. Weights are read only from safetensors: `.bin`, `.pt` and `.ckpt`
files are pickles, and nothing user-supplied is ever unpickled.

For a linear layer W (d_out x d_in) a LoRA adds ΔW = s·B·A with A (r x d_in), B (d_out x r) and
s = alpha / r (alpha / sqrt(r) with rsLoRA) (Hu et al., 2021; Kalajdzievski, 2023).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex
import torch

from lorlib_ui.core.atomic import save_tensors
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.limits import MAX_ALPHA, MAX_RANK_ENV, max_rank

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.ckpt", "pytorch_model.bin")
_KEY = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]{1,300})\.lora_(?P<ab>[AB])\.weight")
MAX_CONFIG = 2**20  # an adapter_config.json is a few hundred bytes
MAX_PATTERNS = 1000  # rank_pattern and alpha_pattern keys: at most one per module of a large model
MAX_PATTERN_LENGTH = 300
PATTERN_BUDGET_S = 0.5  # all of one adapter's pattern matching: a backtracking key cannot hold the server
# what `adapter_config.json` keeps in a library: what PEFT needs to load a plain LoRA, and nothing
# an upload could carry to whoever loads the expert next (its own base model id, remote code, auto_mapping)
STORED_CONFIG = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of `path`, which must be a regular file, not a link (O_NOFOLLOW), a FIFO (opened
    without blocking, then refused) or a device; refused past `limit` bytes. Everything lorlib
    reads from a library or an upload comes through here or `open_regular`."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if limit is not None and size > limit:
            raise OSError(f"{path.name} is larger than {limit // 2**20} MiB")
        return handle.read()


def open_regular(path: Path):
    """`path` opened for reading as a binary file object, if it is a regular file (see `read_regular`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a link
            raise OSError(exc.errno, f"{path.name} is a link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


@dataclass
class LoraAdapter:
    """One LoRA adapter: per adapted linear module, the factors A, B and the scale s."""

    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A, B)
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _) in self.factors.items()}

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    @property
    def target_modules(self) -> list[str]:
        """Short names of the adapted modules (q_proj, v_proj, ...), as PEFT's config lists them."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.factors})

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted module: what this adapter needs from the base model."""
        return {m: (b.shape[0], a.shape[1]) for m, (a, b) in self.factors.items()}

    def check_fits(self, base_shapes: dict[str, tuple[int, int]], what: str) -> None:
        """Refuse, naming the first offending module, unless every factor fits a base linear layer."""
        check_shapes(self.shapes, base_shapes, what)

    def at_rank(self, rank: int, alpha: float) -> LoraAdapter:
        """The same update ΔW = s·B·A at every module, as one LoRA of rank `rank` and scale
        alpha / rank: each pair zero-padded to that rank (zero rows add nothing), B rescaled."""
        if rank < self.rank:
            raise LorlibError(f"an adapter of rank {self.rank} cannot be written at the lower rank {rank}")
        scale = alpha / rank
        factors = {}
        for module, (a, b) in self.factors.items():
            pad = rank - a.shape[0]
            b = b.float() * (self.scales.get(module, 1.0) / scale)
            factors[module] = (
                torch.cat([a.float(), a.new_zeros(pad, a.shape[1], dtype=torch.float32)]).contiguous(),
                torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous(),
            )
        config = {**self.config, "r": rank, "lora_alpha": alpha, "target_modules": self.target_modules}
        config.pop("rank_pattern", None), config.pop("alpha_pattern", None)
        return LoraAdapter(config=config, factors=factors, scales=dict.fromkeys(factors, scale))

    def stored_config(self, base_model: str) -> dict:
        """The adapter_config.json a library keeps: what PEFT needs to load this plain LoRA, with
        patterns rewritten as exact module names and the library's own base model."""
        config = {key: self.config[key] for key in STORED_CONFIG if self.config.get(key) is not None}
        config["target_modules"] = self.target_modules
        r, alpha = self.config["r"], float(self.config.get("lora_alpha", self.config["r"]))
        ranks, alphas = _per_module(self.config, sorted(self.factors), "adapter")
        config["rank_pattern"] = {re.escape(m): n for m, n in ranks.items() if n != r}
        config["alpha_pattern"] = {re.escape(m): a for m, a in alphas.items() if a != alpha}
        config.update(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model, bias="none")
        return config


def check_shapes(shapes: dict[str, tuple[int, int]], base_shapes: dict[str, tuple[int, int]], what: str) -> None:
    """Refuse, naming the first offending module, unless every (d_out, d_in) fits a base linear layer."""
    for module, (d_out, d_in) in sorted(shapes.items()):
        if module not in base_shapes:
            raise LorlibError(f"{what}: module {module[:200]} is not a linear layer of the base model")
        if tuple(base_shapes[module]) != (d_out, d_in):
            expected = "x".join(map(str, base_shapes[module]))
            raise LorlibError(
                f"{what}: module {module} is {d_out}x{d_in} in the adapter but {expected} "
                "in the base model (an adapter for another base model?)"
            )


def read_adapter(folder: str | Path, base_shapes: dict[str, tuple[int, int]] | None = None) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder; raise LorlibError with one clear line if unfit.
    With `base_shapes`, every module must be a linear layer of that shape in the base model,
    checked before anything else reads the module names (the config's patterns match them)."""
    packed = read_packed(folder, base_shapes)
    return LoraAdapter(config=packed.config, factors=packed.factors(), scales=packed.scales)


@dataclass(frozen=True)
class Span:
    """Where one factor lies in a weights file's data: byte offset, dtype and shape."""

    begin: int
    dtype: torch.dtype
    shape: tuple[int, int]

    @property
    def end(self) -> int:
        return self.begin + math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class Layout:
    """A weights file's header, checked to hold only LoRA factors: per module (sorted), the
    spans of A (r x d_in) and B (d_out x r). Files written alike share one (see `_layout`)."""

    modules: dict[str, tuple[Span, Span]]
    runs: tuple[tuple[torch.dtype, int, int], ...]  # (dtype, begin, end) of tensors back to back
    size: int  # where the last tensor ends

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _) in self.modules.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (b.shape[0], a.shape[1]) for m, (a, b) in self.modules.items()}

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {span.dtype for pair in self.modules.values() for span in pair}


@dataclass
class PackedAdapter:
    """A checked adapter as its weights file's bytes and their layout, not yet split into
    tensors: many adapters with one layout are placed together (`Layout` spans over stacked
    files) instead of a few hundred tensors each."""

    config: dict
    layout: Layout
    data: bytearray  # the whole file
    start: int  # where the tensors' data begins
    scales: dict[str, float]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> (A, B), views into `data`."""
        return {
            m: tuple(_view(self.data, s.dtype, list(s.shape), self.start + s.begin) for s in pair)
            for m, pair in self.layout.modules.items()
        }

    def tensor(self) -> torch.Tensor:
        """The tensors' data as bytes (uint8), a view."""
        return torch.frombuffer(self.data, dtype=torch.uint8)[self.start :]


def read_packed(folder: str | Path, base_shapes: dict[str, tuple[int, int]] | None = None) -> PackedAdapter:
    """Read and check a PEFT LoRA adapter folder (everything `read_adapter` checks), unsplit."""
    folder = Path(folder)
    what = f"adapter {folder}"
    if not folder.is_dir():
        raise LorlibError(f"{what}: no such folder")
    config = _read_config(folder, what)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [p for p in _PICKLED if (folder / p).exists()]
        if pickled:
            raise LorlibError(
                f"{what}: weights are pickled ({pickled[0]}); only {WEIGHTS_FILE} is accepted "
                "because loading a pickle can run arbitrary code"
            )
        raise LorlibError(f"{what}: {WEIGHTS_FILE} is missing")
    data, header = _read_file(weights_path, what)
    start = 8 + len(header)
    with _invalid_file(weights_path, what):
        tensors, _, end = _parsed(header)
        if start + end > len(data):
            name = next(n for n, (_, _, _, e) in tensors.items() if start + e > len(data))
            raise ValueError(f"tensor {name} lies outside the file")
        layout = _layout(header)
    if base_shapes is not None:
        check_shapes(layout.shapes, base_shapes, what)
    for module, (a, b) in layout.modules.items():
        if a.shape[0] > min(a.shape[1], b.shape[0]):
            raise LorlibError(
                f"{what}: module {module} has rank {a.shape[0]}, above its size {b.shape[0]}x{a.shape[1]} allows"
            )
    if (bad := _first_not_finite(data, start, layout)) is not None:
        raise LorlibError(f"{what}: tensor {bad} contains NaN or Inf")
    ranks, alphas = _per_module(config, list(layout.modules), what)
    for module, rank in layout.ranks.items():
        if rank != ranks[module]:
            raise LorlibError(f"{what}: module {module} has rank {rank} but {CONFIG_FILE} says {ranks[module]}")
    root = math.sqrt if config.get("use_rslora") else (lambda r: r)
    scales = {m: alphas[m] / root(rank) for m, rank in layout.ranks.items()}
    return PackedAdapter(config=config, layout=layout, data=data, start=start, scales=scales)


def _read_file(path: Path, what: str) -> tuple[bytearray, bytes]:
    """A safetensors file's bytes and its JSON header's.

    Read into memory, never memory-mapped: a mapped file rewritten in place under a running
    process crashes it with SIGBUS. The format: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {}}, then the data."""
    with _invalid_file(path, what):
        with open_regular(path) as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            if handle.readinto(data) != len(data):
                raise OSError("the file changed while it was read")
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 + size:
            raise ValueError("the header runs past the end of the file")
        return data, bytes(data[8 : 8 + size])


@contextmanager
def _invalid_file(path: Path, what: str):
    """Any error of reading or parsing `path` as one line naming it."""
    try:
        yield
    except LorlibError as exc:
        raise LorlibError(f"{what}: {exc}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise LorlibError(f"{what}: {path.name} is not a valid safetensors file ({exc})") from None


# Parsing and checking a header's few hundred entries cost more than reading an adapter's
# tensors (a 1024-expert library); the experts of a library are usually written
# alike, so both are cached by the header's bytes.
@functools.lru_cache(maxsize=64)
def _parsed(header: bytes) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], dict[str, str], int]:
    """`_parse_header` of a JSON header, and where its last tensor ends."""
    tensors, metadata, _ = _parse_header(len(header).to_bytes(8, "little") + header)
    return tensors, metadata, max((end for _, _, _, end in tensors.values()), default=0)


@functools.lru_cache(maxsize=64)
def _layout(header: bytes) -> Layout:
    """The checked layout of a LoRA weights file from its JSON header."""
    tensors, _, _ = _parsed(header)
    halves: dict[str, dict[str, Span]] = {}
    for key, (dtype, shape, begin, _) in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise LorlibError(f"unexpected tensor {key!r}; only lora_A/lora_B weights of linear layers")
        if len(shape) != 2:
            raise LorlibError(f"tensor {key} must be a 2-D floating-point matrix")
        halves.setdefault(match["module"], {})[match["ab"]] = Span(begin, dtype, tuple(shape))
    if not halves:
        raise LorlibError(f"{WEIGHTS_FILE} holds no LoRA weights")
    modules = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LorlibError(f"module {module} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise LorlibError(f"module {module} has A {a.shape} and B {b.shape}, which do not share a positive rank")
        modules[module] = (a, b)
    runs: list[tuple[torch.dtype, int, int]] = []
    for span in sorted((s for pair in modules.values() for s in pair), key=lambda s: s.begin):
        if runs and runs[-1][0] == span.dtype and runs[-1][2] == span.begin:
            runs[-1] = (span.dtype, runs[-1][1], span.end)
        else:
            runs.append((span.dtype, span.begin, span.end))
    return Layout(modules, tuple(runs), max(end for _, _, end in runs))


def _first_not_finite(data: bytearray, start: int, layout: Layout) -> str | None:
    """The key of the first tensor holding NaN or Inf, or None. One check per run of tensors
    of one dtype lying back to back (usually one per file), not one per tensor: a call per
    tensor costs more than the check (240 per adapter). The largest |w| is NaN or infinite
    exactly when some weight is, and is 15 times faster than isfinite on bfloat16."""
    runs = (_view(data, dtype, [(end - begin) // dtype.itemsize], start + begin) for dtype, begin, end in layout.runs)
    if all(math.isfinite(run.abs().amax()) for run in runs if run.numel()):
        return None
    for module, pair in layout.modules.items():
        for ab, s in zip("AB", pair):
            t = _view(data, s.dtype, list(s.shape), start + s.begin)
            if t.numel() and not math.isfinite(t.abs().amax()):
                return f"base_model.model.{module}.lora_{ab}.weight"
    return None


# safetensors dtype names -> torch; LoRA factors are floating point, anything else is refused
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, as views into one buffer holding the file, and the
    file's metadata. Parsed here rather than by `safetensors.torch.load`, which copies every
    tensor into a bytes object of its own first; opening a 1024-expert library reads a quarter
    of a million tensors."""
    data, header = _read_file(path, what)
    with _invalid_file(path, what):
        tensors, metadata, start = _parse_header(data[:8] + header)
        out = {}
        for name, (dtype, shape, begin, end) in tensors.items():
            if not start + end <= len(data):
                raise ValueError(f"tensor {name} lies outside the file")
            out[name] = _view(data, dtype, shape, start + begin)
        return out, metadata


def _view(data: bytearray, dtype: torch.dtype, shape: list[int], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    flat = torch.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
    return flat.view(shape)


def _parse_header(data: bytes) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], dict[str, str], int]:
    """name -> (dtype, shape, begin, end) from a safetensors header, its metadata, and where the
    data starts. Raises ValueError (or KeyError, TypeError) on a malformed header; LorlibError on
    a tensor that cannot be a LoRA factor's."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError("the header runs past the end of the file")
    out, metadata = {}, {}
    for name, info in json.loads(bytes(data[8 : 8 + size])).items():
        if name == "__metadata__":
            metadata = dict(info)
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise LorlibError(f"tensor {name} must be a 2-D floating-point matrix, not {info['dtype']}")
        shape, (begin, end) = [int(n) for n in info["shape"]], info["data_offsets"]
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name} has the wrong size")
        out[name] = (dtype, shape, int(begin), int(end))
    return out, metadata, 8 + size


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading only its header (a regular file only)."""
    with open_regular(path) as handle:
        header = _read_header_bytes(handle)
    metadata = json.loads(header).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("its metadata is not an object")
    return metadata


def _read_header_bytes(handle) -> bytes:
    """The JSON header of an open safetensors file, reading only its bytes."""
    size = int.from_bytes(handle.read(8), "little")
    if size > 100 * 2**20:
        raise ValueError("the header is larger than 100 MiB")
    header = handle.read(size)
    if len(header) < size:
        raise ValueError("the header runs past the end of the file")
    return header


def _read_config(folder: Path, what: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LorlibError(f"{what}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(read_regular(path, MAX_CONFIG).decode("utf-8"))
    except OSError as exc:
        raise LorlibError(f"{what}: {CONFIG_FILE} is unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LorlibError(f"{what}: {CONFIG_FILE} is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(config, dict):
        raise LorlibError(f"{what}: {CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LorlibError(f"{what}: it is a {peft_type or 'non-PEFT'} adapter; only LoRA adapters are supported")
    unsupported = {
        "use_dora": "DoRA",
        "modules_to_save": "modules_to_save",
        "lora_bias": "LoRA bias",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    }
    for key, label in unsupported.items():
        if config.get(key):
            raise LorlibError(f"{what}: {label} is not supported; only plain LoRA on linear layers")
    if config.get("bias", "none") != "none":
        raise LorlibError(f"{what}: trained biases (bias={config['bias']!r}) are not supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LorlibError(f"{what}: rank r must be a positive integer, got {str(r)[:40]!r}")
    if r > max_rank():
        raise LorlibError(f"{what}: rank r = {r} is above the largest rank allowed, {max_rank()} ({MAX_RANK_ENV})")
    return config


def _number(value, what: str, low: float, high: float, integer: bool = False):
    """`value` if it is a (finite) number in [low, high], else a one-line error naming `what`."""
    kinds = int if integer else int | float
    if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        raise LorlibError(f"{what} must be {kind} between {low:g} and {high:g}, got {str(value)[:40]!r}")
    return value


def _patterns(config: dict, key: str, what: str) -> list[tuple[object, object]]:
    """A config's rank_pattern or alpha_pattern, checked: (compiled key, value) in order. Keys are
    regular expressions (PEFT matches `(.*\\.)?(key)$` against module names), so they are bounded
    in number and length, and compiled here: a bad one is one line, not an exception."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise LorlibError(f"{what}: {key} must be a JSON object of module patterns")
    if len(patterns) > MAX_PATTERNS:
        raise LorlibError(f"{what}: {key} has {len(patterns)} keys, more than {MAX_PATTERNS}")
    out = []
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise LorlibError(f"{what}: a {key} key is longer than {MAX_PATTERN_LENGTH} characters")
        if key == "rank_pattern":
            _number(value, f"{what}: {key}[{pattern[:40]!r}]", 1, max_rank(), integer=True)
        else:
            _number(value, f"{what}: {key}[{pattern[:40]!r}]", -MAX_ALPHA, MAX_ALPHA)
        try:
            out.append((regex.compile(rf"(.*\.)?({pattern})"), value))
        except (regex.error, RecursionError, OverflowError) as exc:
            raise LorlibError(f"{what}: {key} key {pattern[:40]!r} is not a valid regular expression ({exc})") from None
    return out


def _per_module(config: dict, modules: list[str], what: str) -> tuple[dict[str, int], dict[str, float]]:
    """Each module's rank and alpha from the config: r and lora_alpha, unless a rank_pattern or
    alpha_pattern key matches the module (the first that does, as PEFT's `get_pattern_key`).
    The matching runs with the `regex` package under one deadline for the whole adapter, so a
    key that backtracks without bound ((a+)+b) is refused in one line instead of holding the
    process: Python's `re` cannot be interrupted."""
    r = _number(config.get("r"), f"{what}: rank r", 1, max_rank(), integer=True)
    alpha = _number(config.get("lora_alpha", r), f"{what}: lora_alpha", -MAX_ALPHA, MAX_ALPHA)
    if config.get("lora_dropout") is not None:
        _number(config["lora_dropout"], f"{what}: lora_dropout", 0, 1)
    if not isinstance(config.get("use_rslora", False), bool):
        raise LorlibError(f"{what}: use_rslora must be true or false")
    rank_patterns, alpha_patterns = _patterns(config, "rank_pattern", what), _patterns(config, "alpha_pattern", what)
    deadline = time.monotonic() + PATTERN_BUDGET_S

    def first(patterns, module, default):
        for compiled, value in patterns:
            try:
                if compiled.fullmatch(module, timeout=max(deadline - time.monotonic(), 1e-3)):
                    return value
            except TimeoutError:
                raise LorlibError(
                    f"{what}: matching its rank_pattern or alpha_pattern against the module names took too "
                    "long; use module names as the keys"
                ) from None
        return default

    ranks = {m: first(rank_patterns, m, r) for m in modules}
    alphas = {m: float(first(alpha_patterns, m, alpha)) for m in modules}
    return ranks, alphas


def write_adapter(folder: Path, adapter: LoraAdapter, config: dict | None = None) -> None:
    """Write the adapter as PEFT does (keys `base_model.model.<module>.lora_A.weight`), with
    `config` (default: the adapter's own) as its adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in adapter.factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    text = json.dumps(adapter.config if config is None else config, indent=2, sort_keys=True, allow_nan=False)
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")


def read_layout(folder: Path) -> tuple[dict[str, int], set[str]]:
    """Rank per adapted module and the dtypes of the weights, from the safetensors header alone
    (checked as `read_adapter` checks it; no tensor is read), for sizing buffers before the
    weights are read."""
    path = folder / WEIGHTS_FILE
    with _invalid_file(path, f"adapter {folder}"), open(path, "rb") as handle:
        layout = _layout(_read_header_bytes(handle))
    return layout.ranks, {_DTYPE_NAMES[dtype] for dtype in layout.dtypes}


@dataclass(frozen=True)
class Spans:
    """Where tensors lie in a weights file: absolute byte offset, byte count and dtype of each,
    as compact arrays (a many-expert library keeps one per expert)."""

    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    dtypes: list[torch.dtype]


def factor_spans(folder: Path, modules: list[str]) -> Spans:
    """The spans of A then B of each of `modules`, in that order, from the header alone (checked
    through the cached `Layout`, as `read_adapter` checks it): for reading an adapter again piece
    by piece (MBC reads each expert in column blocks)."""
    path = folder / WEIGHTS_FILE
    with _invalid_file(path, f"adapter {folder}"), open(path, "rb") as handle:
        header = _read_header_bytes(handle)
        layout = _layout(header)
        if missing := [m for m in modules if m not in layout.modules]:
            raise LorlibError(f"it adapts no module {missing[0]}")
    spans = [span for m in modules for span in layout.modules[m]]
    start = 8 + len(header)
    return Spans(
        np.array([start + span.begin for span in spans], dtype=np.int64),
        np.array([span.end - span.begin for span in spans], dtype=np.int64),
        [span.dtype for span in spans],
    )


def read_spans(folder: Path, spans: Spans, first: int, stop: int) -> list[torch.Tensor]:
    """Tensors `first`..`stop - 1` of `spans`, flattened, reading only their bytes (positional
    reads, no memory map): one read for each run of them that lies back to back in the file, as
    tensors written together do."""
    out = []
    try:
        with open(folder / WEIGHTS_FILE, "rb") as handle:
            i = first
            while i < stop:
                end = i + 1
                while end < stop and spans.offsets[end] == spans.offsets[end - 1] + spans.sizes[end - 1]:
                    end += 1
                data = bytearray(int(spans.offsets[end - 1] + spans.sizes[end - 1] - spans.offsets[i]))
                handle.seek(int(spans.offsets[i]))
                if handle.readinto(data) != len(data):
                    raise OSError("the file is shorter than its header says")
                for j in range(i, end):
                    at, size, dtype = int(spans.offsets[j] - spans.offsets[i]), int(spans.sizes[j]), spans.dtypes[j]
                    out.append(
                        torch.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=at)
                        if size
                        else torch.empty(0)
                    )
                i = end
    except OSError as exc:
        raise LorlibError(f"adapter {folder}: {WEIGHTS_FILE} could not be read ({exc})") from None
    return out


def weights_hash(folder: Path) -> str:
    """Content hash of an adapter's weights: the key of its cached Arrow prototypes."""
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
