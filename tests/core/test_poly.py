"""Learned (Poly) routers: how they are stored in a library, and how `poly:NAME` routes."""

import pytest
import torch
from conftest import library_snapshot, relative_error, routed_logits

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.learned_routers import (
    LearnedRouter,
    learned_routers,
    read_learned_router,
    remove_learned_router,
    store_learned_router,
)
from lorlib_ui.core.library import Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router, menu


def _store(library, name, mixed, logits_of, factors=None):
    """A learned router over `mixed` whose logits at every layer are `logits_of(layer)`."""
    rm = RoutedModel.load(library, device="cpu")
    tensors = {}
    subset = [rm.experts.index(x) for x in mixed]
    for module, layer in rm.layers.items():
        tensors[f"{module}.logits"] = torch.tensor(logits_of(module), dtype=torch.float32)
        if factors is not None:
            e, r = layer.n_experts, layer.rank
            tensors[f"{module}.lora_a"] = layer.lora_a.view(e, r, -1)[subset].float() * factors
            tensors[f"{module}.lora_bt"] = layer.lora_bt.view(e, r, -1)[subset].float()
    method = "poly-full" if factors is not None else "poly-router"
    record = LearnedRouter(name, method, list(mixed), [library.expert(x).weights_hash for x in mixed])
    return store_learned_router(library, record, tensors)


def test_one_hot_logits_reproduce_that_expert_exactly(tiny_library):
    mixed = ["task1", "task3", "task4"]
    _store(tiny_library, "only-task3", mixed, lambda _: [-1e4, 0.0, -1e4])
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    poly = routed_logits(rm, make_router("poly:only-task3", rm.experts))
    alone = routed_logits(rm, make_router("expert:task3", rm.experts))
    assert relative_error(poly, alone) < 1e-6


def test_weights_are_a_softmax_over_the_mixed_experts_per_layer(tiny_library):
    mixed = ["task0", "task2"]
    logits = {}

    def per_layer(module):
        logits[module] = [0.3 * len(module) % 2.0, -0.5]
        return logits[module]

    _store(tiny_library, "mix", mixed, per_layer)
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    from lorlib_ui.core.generation import generate

    record = generate(rm, "the fox", make_router("poly:mix", rm.experts), max_new_tokens=2).record
    for i, module in enumerate(record.modules):
        expected = torch.tensor(logits[module]).softmax(0).numpy()
        weights = record.weights[i]  # (tokens, experts), the same for every token
        assert weights[:, [0, 2]] == pytest.approx(expected.reshape(1, 2).repeat(len(record.tokens), 0), abs=1e-6)
        assert weights[:, [1, 3, 4, 5]].max() == 0
    assert record.router == "poly:mix"


def test_poly_full_with_untouched_factors_equals_poly_router(tiny_library):
    mixed = ["task0", "task1", "task5"]
    _store(tiny_library, "frozen", mixed, lambda m: [0.1, 0.7, -0.2])
    _store(tiny_library, "full", mixed, lambda m: [0.1, 0.7, -0.2], factors=1.0)
    _store(tiny_library, "full-doubled", mixed, lambda m: [0.1, 0.7, -0.2], factors=2.0)
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    frozen = routed_logits(rm, make_router("poly:frozen", rm.experts))
    assert relative_error(routed_logits(rm, make_router("poly:full", rm.experts)), frozen) < 1e-6
    doubled = routed_logits(rm, make_router("poly:full-doubled", rm.experts))  # its own factors are used
    assert relative_error(doubled, frozen) > 1e-4


def test_a_learned_router_refuses_once_an_expert_it_mixes_changes_or_goes(tiny_library, tiny_adapters):
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.library import expert_from_adapter

    _store(tiny_library, "mix", ["task0", "task1"], lambda _: [0.0, 0.0])
    library = Library.open(tiny_library.path)
    replacement = read_adapter(tiny_adapters[5])
    library.add_experts([(expert_from_adapter("task1", replacement, library.base_model), replacement)], force=True)
    router = make_router("poly:mix", library.names)
    assert "mixes expert task1, which has changed since" in library.derived.lacks_for(router)
    rm = RoutedModel.load(library, device="cpu")
    with pytest.raises(LorlibError, match="has changed since"):
        routed_logits(rm, router)
    library.remove_expert("task0")
    assert "task0, which is no longer in the library" in Library.open(library.path).derived.lacks_for(router)


def test_storing_is_atomic_replacing_needs_force_and_old_files_are_swept(tiny_library):
    first = _store(tiny_library, "mix", ["task0", "task1"], lambda _: [0.0, 1.0])
    before = library_snapshot(tiny_library.path)
    with pytest.raises(LorlibError, match="already has a learned router 'mix'"):
        _store(tiny_library, "mix", ["task0", "task1"], lambda _: [1.0, 0.0])
    assert library_snapshot(tiny_library.path) == before
    library = Library.open(tiny_library.path)
    tensors = read_learned_router(library, "mix")[1]
    record = LearnedRouter("mix", "poly-router", ["task0", "task1"], learned_routers(library)["mix"].hashes)
    second = store_learned_router(library, record, {k: -v for k, v in tensors.items()}, force=True)
    assert second.file != first.file and second.content != first.content
    assert sorted(p.name for p in (tiny_library.path / "routers").iterdir()) == [second.file.split("/")[1]]
    remove_learned_router(library, "mix")
    assert not list((tiny_library.path / "routers").iterdir()) and learned_routers(Library.open(library.path)) == {}


def test_unknown_learned_routers_are_refused_in_one_line(tiny_library):
    router = make_router("poly:nothing", tiny_library.names)
    assert "has no learned router 'nothing' (learned routers: none" in tiny_library.derived.lacks_for(router)
    with pytest.raises(LorlibError, match="invalid learned router name"):
        make_router("poly:../x", tiny_library.names)


def test_menus_offer_each_learned_router_with_the_experts_it_mixes(tiny_library):
    specs, _ = menu(tiny_library.names, tiny_library.groups(), learned={"mix": ["task0", "task1"]})
    assert "poly:mix" in specs and "poly:NAME" not in specs
    specs, _ = menu(tiny_library.names, tiny_library.groups())
    assert not any(s.startswith("poly:") for s in specs)
