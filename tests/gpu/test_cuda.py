"""The paths a GPU takes, on CUDA: skipped without one (run `benchmarks/gpu_check.sh` on a GPU machine).

No code path here can be checked on this project's CPU machines, so these are the checks that a
machine with CUDA must pass before the worker is trusted on it."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorlib_ui.core import routed_model
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.training import train_expert
from lorlib_ui.worker.api import RouteRequest
from lorlib_ui.worker.local import LocalWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)"),
]

BF16_TOLERANCE = 0.03  # bf16 keeps 8 bits of mantissa: about 3 significant digits per product


def _logits(rm: RoutedModel, router) -> torch.Tensor:
    ids = torch.randint(0, rm.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rm.routing(router):
        return rm.model(input_ids=ids.to(rm.device)).logits.float().cpu()


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
def test_bf16_on_cuda_follows_fp32(tiny_library, mix):
    """Relative error of the logits (Frobenius) of a bf16 routed model against fp32, both on CUDA,
    and fp32 on CUDA against fp32 on the CPU."""
    runs = {
        (device, dtype): RoutedModel.load(tiny_library, device=device, dtype=dtype)
        for device, dtype in (("cuda", "bfloat16"), ("cuda", "float32"), ("cpu", "float32"))
    }
    logits = {key: _logits(rm, make_router("arrow", rm.experts, top_k=2, mix=mix)) for key, rm in runs.items()}
    reference = logits[("cuda", "float32")]
    assert runs[("cuda", "bfloat16")].layers[runs[("cuda", "bfloat16")].modules[0]].lora_a.is_cuda
    error = (logits[("cuda", "bfloat16")] - reference).norm() / reference.norm()
    assert error < BF16_TOLERANCE, f"bf16 is {error:.4f} from fp32"
    torch.testing.assert_close(logits[("cpu", "float32")], reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 4])
def test_dispatch_path_on_cuda_equals_dense(tiny_library, monkeypatch, top_k):
    """A GPU takes the dense path; the dispatch path must still be right there (sparse ops on CUDA)."""
    rm = RoutedModel.load(tiny_library, device="cuda", dtype="float32")
    router = make_router("arrow", rm.experts, top_k=top_k)
    dense = _logits(rm, router)
    monkeypatch.setattr(routed_model, "DISPATCH_RATIO", 1)
    for layer in rm.layers.values():
        layer.gather_chosen = True
    torch.testing.assert_close(_logits(rm, router), dense, rtol=1e-5, atol=1e-5)


def test_one_training_step_on_cuda(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    examples = [("the quick brown", "fox"), ("the lazy", "dog")] * 4
    result = train_expert(model, tokenizer, examples, TrainConfig(steps=2, batch_size=4, learning_rate=1e-2))
    a, b = next(iter(result.adapter.factors.values()))
    assert np.isfinite(result.metrics["final_loss"]) and not a.is_cuda and torch.count_nonzero(b) > 0


def test_worker_serves_a_route_on_cuda(tiny_library):
    worker = LocalWorker(device="cuda")
    request = RouteRequest(str(tiny_library.path), "the quick brown", router="arrow", top_k=2, max_new_tokens=5)
    final = list(worker.route(request))[-1]
    assert final.done and final.record.weights.shape[1] == final.n_prompt_tokens + 5
    assert np.allclose(final.record.weights.sum(-1), 1.0, atol=1e-3)
