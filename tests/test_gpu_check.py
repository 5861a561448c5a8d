"""benchmarks/bench_gpu.py (issue #32) on the CPU: its routed model made in memory equals the one a
library folder gives, its memory plan at Llama-2-7B's shape, and its dry run (--device cpu --tiny),
so that on a GPU machine the run itself is all that is left (benchmarks/gpu_check.sh)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TARGETS
from transformers import AutoModelForCausalLM

from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.base_model import base_model_info
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
bench = sys.modules["bench_gpu"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(bench)


def _factors(rank: int):
    return lambda module, shape, first, count: bench.random_factors(module, shape, first, count, rank, "cpu")


def test_random_routed_model_equals_the_one_loaded_from_a_library(tmp_path, tiny_base):
    """The same random experts written as a library and opened by RoutedModel.load route to the
    same logits, with the same stacks and prototypes, as random_routed_model made in memory."""
    n, rank = 5, 4
    info = base_model_info(str(tiny_base))
    library = Library.create(tmp_path / "lib", info)
    shapes = {m: s for m, s in info.linear_shapes.items() if m.rsplit(".", 1)[-1] in TARGETS}
    stacks = {m: _factors(rank)(m, s, 0, n) for m, s in shapes.items()}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}
    entries = []
    for j in range(n):
        factors = {m: (a[j], b[j]) for m, (a, b) in stacks.items()}
        adapter = LoraAdapter(config=dict(config), factors=factors, scales=dict.fromkeys(factors, bench.SCALE))
        entries.append((expert_from_adapter(f"e{j}", adapter, info.name), adapter))
    library.add_experts(entries)
    loaded = RoutedModel.load(library, device="cpu", dtype="float32")
    made = bench.random_routed_model(
        AutoModelForCausalLM.from_pretrained(tiny_base).eval(), n, rank, _factors(rank), prototypes="exact"
    )
    assert made.modules == loaded.modules and len(made.groups) == len(loaded.groups)
    for name, layer in made.layers.items():
        other = loaded.layers[name]
        assert layer.lora_a.dtype == other.lora_a.dtype == torch.bfloat16
        assert torch.equal(layer.lora_a, other.lora_a) and torch.equal(layer.lora_bt, other.lora_bt)
        assert torch.equal(layer.scales, other.scales)
        torch.testing.assert_close(layer.prototypes, other.prototypes, rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, made.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for rm in (made, loaded):
        with torch.no_grad(), rm.routing(make_router("arrow", rm.experts, top_k=2)):
            logits.append(rm.model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_memory_plan_at_llama_2_7b():
    """The shape gives Llama-2-7B's parameter count, and the experts' bytes are what their
    stacks hold: on an 80 GB card lorlib fits at 1,024 experts, PEFT's Arrow does not."""
    shape, sizes = bench.SHAPES["7b"], bench.FULL
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(shape.config())
    assert shape.parameters() == sum(p.numel() for p in skeleton.parameters()) == 6_738_415_616
    ours = bench.expected_bytes(shape, sizes, "lorlib_arrow", 1024, 16)
    # 1,024 experts x 32 layers x (q, k, v, o) x (rank 16 x (4096 + 4096) factors, a 4096 prototype,
    # a scale, in bfloat16, and a bool)
    assert ours["own"] == 1024 * 32 * 4 * (16 * 8192 * 2 + 4096 * 2 + 2 + 1)
    assert ours["weights"] == 2 * 6_738_415_616
    capacity = int(79.2 * 2**30 * 0.92)
    assert bench.skip_reason(10, 100, sum(ours.values()), capacity) is None
    peft = sum(bench.expected_bytes(shape, sizes, "peft_arrow", 1024, 16).values())
    assert "GiB" in bench.skip_reason(10, 100, peft, capacity)
    assert "budget" in bench.skip_reason(200, 100, sum(ours.values()), capacity)


def test_a_budget_of_nothing_skips_every_cell_with_a_note(tmp_path):
    out = tmp_path / "none.md"
    threads = torch.get_num_threads()
    try:
        bench.main(["--device", "cpu", "--tiny", "--shapes", "135m", "--budget-s", "0", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.with_suffix(".json").read_text())
    assert {c["status"] for c in record["cells"]} == {"skipped"} and record["agreement"] is None
    assert len(record["cells"]) == 3 * 3  # base, lorlib and PEFT at 4, 8 and 16 experts
    assert all("budget" in c["note"] for c in record["cells"])
    assert "| 135m | peft_arrow | 16 | skipped:" in out.read_text()


def test_the_cpu_dry_run_fills_every_cell(tmp_path):
    """`--device cpu --tiny`, as gpu_check.sh runs it on cuda: a table and a JSON record with
    every shape, method and expert count measured (positive throughputs) or skipped with a note."""
    out = tmp_path / "bench_gpu.md"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    table = out.read_text()
    assert table.strip() == done.stdout.strip()
    cells = {(c["shape"], c["method"], c["experts"]): c for c in record["cells"]}
    for shape in ("7b", "135m"):
        for n in (4, 8, 16):
            for method in ("base", "lorlib_arrow", "peft_arrow"):
                cell = cells[(shape, method, n)]
                assert f"| {shape} | {method} | {n} |" in table
                if cell["status"] == "ok":
                    assert min(cell[k] for k in ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s")) > 0
                    assert len(cell["per_round"]) == 1
                else:
                    assert cell["status"] == "skipped" and cell["note"], cell
    assert cells[("7b", "lorlib_arrow", 16)]["status"] == "ok"
    agreement = record["agreement"]
    assert agreement["token_layers"] == 2 * 4 * 8 * 32  # 2 layers x (q, k, v, o) x 8 x 32 tokens
    assert 0.0 <= agreement["agreement"] <= 1.0 and "top-k set" in table
