"""Reading, checking and writing standard PEFT LoRA adapter folders.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
`PeftModel.save_pretrained` writes them, so every expert in a library also loads with plain
`PeftModel.from_pretrained`. Weights are read only from safetensors: `.bin`, `.pt` and `.ckpt`
files are pickles, and nothing user-supplied is ever unpickled.

For a linear layer W (d_out x d_in) a LoRA adds ΔW = s·B·A with A (r x d_in), B (d_out x r) and
s = alpha / r (alpha / sqrt(r) with rsLoRA) (Hu et al., 2021; Kalajdzievski, 2023).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorlib_ui.core.atomic import save_tensors
from lorlib_ui.core.errors import LorlibError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.ckpt", "pytorch_model.bin")
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


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
        for module, (d_out, d_in) in sorted(self.shapes.items()):
            if module not in base_shapes:
                raise LorlibError(f"{what}: module {module} is not a linear layer of the base model")
            if base_shapes[module] != (d_out, d_in):
                expected = "x".join(map(str, base_shapes[module]))
                raise LorlibError(
                    f"{what}: module {module} is {d_out}x{d_in} in the adapter but {expected} "
                    "in the base model (an adapter for another base model?)"
                )


def read_adapter(folder: str | Path) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder; raise LorlibError with one clear line if unfit."""
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
    factors = _split_factors(read_tensors(weights_path, what), what)
    adapter = LoraAdapter(config=config, factors=factors)
    adapter.scales = {m: _scale(config, m, a.shape[0]) for m, (a, _) in factors.items()}
    _check_ranks(adapter, what)
    return adapter


# safetensors dtype names -> torch; LoRA factors are floating point, anything else is refused
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views into one buffer holding the file."""
    return read_safetensors(path, what)[0]


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, as views into one buffer holding the file, and the
    file's metadata.

    Read into memory, never memory-mapped: a mapped file rewritten in place under a running
    process crashes it with SIGBUS. Parsed here (the format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {}},
    then the data) rather than by `safetensors.torch.load`, which copies every tensor into a
    bytes object of its own first; opening a 1024-expert library reads a quarter of a million
    tensors."""
    try:
        data = bytearray(path.stat().st_size)
        with open(path, "rb") as handle:
            if handle.readinto(data) != len(data):
                raise OSError("the file changed while it was read")
        header, metadata, start = _parse_header(data)
        tensors = {}
        for name, (dtype, shape, begin, end) in header.items():
            if not start + end <= len(data):
                raise ValueError(f"tensor {name} lies outside the file")
            tensors[name] = _view(data, dtype, shape, start + begin)
        return tensors, metadata
    except LorlibError as exc:
        raise LorlibError(f"{what}: {exc}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise LorlibError(f"{what}: {path.name} is not a valid safetensors file ({exc})") from None


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


def _read_header(handle) -> tuple[dict, int]:
    """The tensors' header of an open safetensors file, reading only the header's bytes."""
    size = int.from_bytes(handle.read(8), "little")
    header, _, start = _parse_header(size.to_bytes(8, "little") + handle.read(size))
    return header, start


def _read_config(folder: Path, what: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LorlibError(f"{what}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LorlibError(f"{what}: {CONFIG_FILE} is not valid JSON ({exc})") from None
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
        raise LorlibError(f"{what}: rank r must be a positive integer, got {r!r}")
    return config


def _split_factors(tensors: dict[str, torch.Tensor], what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise LorlibError(f"{what}: unexpected tensor {key!r}; only lora_A/lora_B weights of linear layers")
        if not torch.is_floating_point(tensor) or tensor.dim() != 2:
            raise LorlibError(f"{what}: tensor {key} must be a 2-D floating-point matrix")
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    if not halves:
        raise LorlibError(f"{what}: {WEIGHTS_FILE} holds no LoRA weights")
    # One check per dtype over all weights: a call per tensor costs more than the check (240 per
    # adapter), and the largest |w| is NaN or infinite exactly when some weight is (it is 15 times
    # faster than isfinite on bfloat16).
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors.values():
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if not all(math.isfinite(torch.cat(parts).abs().amax()) for parts in by_dtype.values()):
        bad = next(key for key, t in tensors.items() if t.numel() and not math.isfinite(t.abs().amax()))
        raise LorlibError(f"{what}: tensor {bad} contains NaN or Inf")
    factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LorlibError(f"{what}: module {module} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise LorlibError(
                f"{what}: module {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                "which do not share a positive rank"
            )
        factors[module] = (a, b)
    return factors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name or its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_ranks(adapter: LoraAdapter, what: str) -> None:
    for module, rank in adapter.ranks.items():
        expected = _pattern_value(adapter.config.get("rank_pattern"), module, adapter.config["r"])
        if rank != expected:
            raise LorlibError(f"{what}: module {module} has rank {rank} but {CONFIG_FILE} says {expected}")


def write_adapter(folder: Path, adapter: LoraAdapter) -> None:
    """Write the adapter as PEFT does (keys `base_model.model.<module>.lora_A.weight`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in adapter.factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True), encoding="utf-8")


def read_layout(folder: Path) -> tuple[dict[str, int], set[str]]:
    """Rank per adapted module and the dtypes of the weights, from the safetensors header alone
    (no tensor is read). Only for sizing buffers before `read_adapter` loads and checks them."""
    what = f"adapter {folder}"
    try:
        with open(folder / WEIGHTS_FILE, "rb") as handle:
            header, _ = _read_header(handle)
    except LorlibError as exc:
        raise LorlibError(f"{what}: {exc}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise LorlibError(f"{what}: {WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    ranks = {
        match["module"]: shape[0]
        for key, (_, shape, _, _) in header.items()
        if (match := _KEY.fullmatch(key)) and match["ab"] == "A" and shape
    }
    return ranks, {_DTYPE_NAMES[dtype] for dtype, _, _, _ in header.values()}


@dataclass(frozen=True)
class Spans:
    """Where tensors lie in a weights file: absolute byte offset, byte count and dtype of each,
    as compact arrays (a many-expert library keeps one per expert)."""

    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    dtypes: list[torch.dtype]


def factor_spans(folder: Path, modules: list[str]) -> Spans:
    """The spans of A then B of each of `modules`, in that order, from the header alone: for
    reading an adapter that `read_adapter` has already checked again, piece by piece (MBC reads
    each expert in column blocks)."""
    try:
        with open(folder / WEIGHTS_FILE, "rb") as handle:
            header, start = _read_header(handle)
        places = [header[f"base_model.model.{m}.lora_{ab}.weight"] for m in modules for ab in "AB"]
    except (LorlibError, OSError, ValueError, TypeError, KeyError) as exc:
        raise LorlibError(f"adapter {folder}: {WEIGHTS_FILE} could not be read ({exc})") from None
    return Spans(
        np.array([start + begin for _, _, begin, _ in places], dtype=np.int64),
        np.array([end - begin for _, _, begin, end in places], dtype=np.int64),
        [dtype for dtype, _, _, _ in places],
    )


def read_spans(folder: Path, spans: Spans, first: int, stop: int) -> list[torch.Tensor]:
    """Tensors `first`..`stop - 1` of `spans`, flattened, reading only their bytes (positional
    reads, no memory map)."""
    out = []
    try:
        with open(folder / WEIGHTS_FILE, "rb") as handle:
            for i in range(first, stop):
                data = bytearray(int(spans.sizes[i]))
                handle.seek(int(spans.offsets[i]))
                if handle.readinto(data) != len(data):
                    raise OSError("the file is shorter than its header says")
                out.append(torch.frombuffer(data, dtype=spans.dtypes[i]) if data else torch.empty(0))
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
