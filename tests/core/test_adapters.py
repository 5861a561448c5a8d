import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter, read_layout
from lorlib_ui.core.errors import LorlibError


@pytest.fixture
def adapter_copy(tmp_path, tiny_adapters):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_adapters[0], folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_reads_peft_adapter(tiny_adapters):
    adapter = read_adapter(tiny_adapters[0])
    assert len(adapter.factors) == 8 and adapter.rank == 4
    a, b = adapter.factors["model.layers.0.self_attn.q_proj"]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    assert adapter.scales["model.layers.0.self_attn.q_proj"] == 8 / 4  # lora_alpha=2r


def test_rslora_and_alpha_pattern_scales(adapter_copy):
    _edit_config(adapter_copy, use_rslora=True, alpha_pattern={"v_proj": 16})
    adapter = read_adapter(adapter_copy)
    assert adapter.scales["model.layers.1.self_attn.q_proj"] == pytest.approx(8 / math.sqrt(4))
    assert adapter.scales["model.layers.1.self_attn.v_proj"] == pytest.approx(16 / math.sqrt(4))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:100]), "not a valid safetensors"),
        (lambda f: (f / WEIGHTS_FILE).unlink(), "adapter_model.safetensors is missing"),
        (lambda f: (f / CONFIG_FILE).unlink(), "adapter_config.json is missing"),
        (lambda f: (f / CONFIG_FILE).write_text("{oops"), "not valid JSON"),
        (lambda f: (f / CONFIG_FILE).write_bytes(b"\xff\xfe\x00bad"), "not valid JSON"),
        (lambda f: _edit_config(f, peft_type="IA3"), "IA3 adapter; only LoRA"),
        (lambda f: _edit_config(f, peft_type="PREFIX_TUNING"), "PREFIX_TUNING adapter; only LoRA"),
        (lambda f: _edit_config(f, r=0), "rank r must be a positive integer"),
        (lambda f: _edit_config(f, r=8), "has rank 4 but adapter_config.json says 8"),
        (lambda f: _edit_config(f, use_dora=True), "DoRA is not supported"),
        (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save is not supported"),
    ],
)
def test_bad_adapters_are_refused(adapter_copy, mutate, message):
    mutate(adapter_copy)
    with pytest.raises(Exception, match=message) as info:
        read_adapter(adapter_copy)
    assert type(info.value).__name__ == "LorlibError"
    assert "\n" not in str(info.value)


def _rewrite_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.__setitem__(next(iter(t)), torch.full_like(next(iter(t.values())), float("nan"))), "NaN or Inf"),
        (lambda t: t.__setitem__(next(iter(t)), torch.full_like(next(iter(t.values())), float("inf"))), "NaN or Inf"),
        (lambda t: t.pop(next(k for k in t if "lora_B" in k)), "not both A and B"),
        (lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(3, 3)), "unexpected tensor"),
        (lambda t: t.clear(), "holds no LoRA weights"),
    ],
)
def test_bad_weights_are_refused(adapter_copy, change, message):
    _rewrite_tensors(adapter_copy, change)
    with pytest.raises(Exception, match=message):
        read_adapter(adapter_copy)


F32_2X2 = {"dtype": "F32", "shape": [2, 2]}


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a valid safetensors"),
        ((10**9).to_bytes(8, "little") + b"{}", "not a valid safetensors"),
        (_safetensors({"x": 1})[:-3] + b"\xff\xfe}", "not a valid safetensors"),
        (
            _safetensors({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),
            "outside the file",
        ),
        (_safetensors({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16), "wrong size"),
        (_safetensors({"x": {"dtype": "I64", "shape": [1, 1], "data_offsets": [0, 8]}}, b"\0" * 8), "floating-point"),
        (_safetensors({"x": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}, b"\0" * 8), "not a valid"),
        (_safetensors({"x": {"dtype": "F32", "shape": [1, 1]}}, b"\0" * 4), "not a valid"),
    ],
)
def test_malformed_safetensors_are_one_line_errors(adapter_copy, content, message):
    """The header is parsed here (not by safetensors): every malformation is a LorlibError."""
    (adapter_copy / WEIGHTS_FILE).write_bytes(content)
    readers = [read_adapter] if message == "outside the file" else [read_adapter, read_layout]  # a header alone
    for read in readers:
        with pytest.raises(LorlibError, match=message) as info:
            read(adapter_copy)
        assert "\n" not in str(info.value)


def test_tensors_read_by_the_parser_equal_safetensors_own(adapter_copy):
    from lorlib_ui.core.adapters import read_safetensors

    ours, _ = read_safetensors(adapter_copy / WEIGHTS_FILE, "x")
    theirs = load_file(adapter_copy / WEIGHTS_FILE)
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_pickled_weights_are_refused_without_unpickling(adapter_copy, tmp_path):
    (adapter_copy / WEIGHTS_FILE).unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("unpickled",))

    torch.save({"x": Evil()}, adapter_copy / "adapter_model.bin")
    with pytest.raises(Exception, match="weights are pickled"):
        read_adapter(adapter_copy)
    assert not marker.exists()


def test_real_peft_ia3_adapter_is_refused(tmp_path, tiny_base):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(Exception, match="IA3 adapter; only LoRA adapters"):
        read_adapter(tmp_path / "ia3")


def test_factor_spans_read_back_exactly_the_factors(tiny_adapters):
    """MBC's piece-by-piece reads: A then B of each module asked for, in that order."""
    from lorlib_ui.core.adapters import factor_spans, read_spans

    folder = tiny_adapters[0]
    factors = read_adapter(folder).factors
    modules = sorted(factors)[::-1][:5]  # any order, any subset
    pieces = read_spans(folder, factor_spans(folder, modules), 0, 2 * len(modules))
    expected = [t.reshape(-1) for m in modules for t in factors[m]]
    assert len(pieces) == len(expected)
    for got, want in zip(pieces, expected):
        assert torch.equal(got, want)
    with pytest.raises(LorlibError, match=r"adapter .*: it adapts no module model\.nowhere$"):
        factor_spans(folder, [modules[0], "model.nowhere"])
