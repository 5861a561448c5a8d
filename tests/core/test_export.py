"""Merges you can deploy: the exported PEFT adapter and the merged model compute what the router
does, within 1e-4 in float32; per-token routers are refused in one line."""

import pytest
import torch
from conftest import routed_logits, routing_ids

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.export import export
from lorlib_ui.core.library import Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router


def _log_probs(logits):
    return torch.log_softmax(logits.float(), dim=-1)


def _max_gap(x, y) -> float:
    return (_log_probs(x) - _log_probs(y)).abs().max().item()


@pytest.fixture
def grouped(tiny_library):
    """Three of the tiny experts of kind private, so that @private means something."""
    with tiny_library.edit() as current:
        for e in current.experts[:3]:
            e.kind = "private"
    return Library.open(tiny_library.path)


@pytest.mark.parametrize(
    "spec, mix",
    [
        ("uniform", None),
        ("uniform@private", None),
        ("mean_delta", None),
        ("ties", None),
        ("expert:task4", None),
        ("uniform", "outputs"),
    ],
)
def test_the_exported_adapter_computes_what_the_router_does(grouped, tiny_base, tmp_path, spec, mix):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export(grouped, spec, tmp_path / "out", "peft", mix=mix)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    rm = RoutedModel.load(grouped, device="cpu", dtype="float32")
    settings = {} if mix is None else {"mix": mix}
    expected = routed_logits(rm, make_router(spec, rm.experts, groups=grouped.groups(), **settings))
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        exported = peft_model(input_ids=routing_ids(rm)).logits
    assert _max_gap(exported, expected) < 1e-4
    assert _max_gap(expected, routed_logits(rm, make_router("base", rm.experts))) > 1e-3  # the merge does something


def test_mean_delta_is_exact_at_the_sum_of_the_ranks(grouped, tmp_path):
    from lorlib_ui.core.adapters import read_adapter

    out = export(grouped, "mean_delta@private", tmp_path / "out")
    assert read_adapter(out).rank == sum(grouped.expert(n).rank for n in grouped.groups()["private"])
    assert "the sum of theirs and the merge is exact" in (out / "README.md").read_text()


def test_the_merged_model_loads_with_plain_transformers_and_computes_the_same(grouped, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(grouped, "ties", tmp_path / "merged", "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and not any(
        n.endswith((".bin", ".pt")) for n in names
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rm = RoutedModel.load(grouped, device="cpu", dtype="float32")
    expected = routed_logits(rm, make_router("ties", rm.experts))
    with torch.no_grad():
        got = merged(input_ids=routing_ids(rm)).logits
    assert _max_gap(got, expected) < 1e-4


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "arrow",
            "chooses its experts token by token, so it has no fixed merge to export; deploy it with PEFT's Arrow",
        ),
        ("phatgoose", "token by token"),
        ("base", "applies no expert"),
        ("arrow_nope", "unknown router"),
    ],
)
def test_routers_without_a_fixed_merge_are_refused_in_one_line(tiny_library, tmp_path, spec, message):
    with pytest.raises(LorlibError) as caught:
        export(tiny_library, spec, tmp_path / "out")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_export_never_overwrites(tiny_library, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(LorlibError, match="exists and is not an empty folder"):
        export(tiny_library, "uniform", tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
