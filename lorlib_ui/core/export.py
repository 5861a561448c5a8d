"""Merges you can deploy: a static router's result as one PEFT LoRA, or folded into the base model.

A router whose result is one fixed set of weights (uniform, mean_delta, TIES, one expert, each
also limited to a group with @KIND) is exported exactly as the routed model applies it
(`RoutedModel.merged_adapter`):

- format "peft": a standard PEFT LoRA folder (adapter_config.json, adapter_model.safetensors and
  a card). With mix "outputs" the experts stand side by side, so the rank is the sum of theirs
  and the update is exact (`mean_delta`: the mean of ΔW itself); with mix "parameters" it is the
  largest expert rank (µ, the paper's merge of A's and B's).
- format "merged": the base model with ΔW folded into its weights by PEFT's `merge_and_unload`,
  saved as safetensors with its config, generation config and tokenizer, for plain
  `AutoModelForCausalLM.from_pretrained` (and so for vLLM or TGI).

A per-token router (Arrow, PhatGoose...) has no fixed merge: deploy it with PEFT's Arrow, whose
recipe the library card holds (`lorlib card`). The export lands whole or not at all: it is written
beside its destination and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorlib_ui.core.adapters import write_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import MergeRouter, Router, TaskRouter, make_router

FORMATS = ("peft", "merged")


def exportable(router: Router) -> str | None:
    """Why `router` has no merge to export, in one line; None when it has one."""
    if isinstance(router, TaskRouter):
        return f"router {router.describe()} picks its experts per evaluated task, so it has no merge to export"
    if not isinstance(router, MergeRouter):
        return (
            f"router {router.describe()} chooses its experts token by token, so it has no fixed merge to export; "
            "deploy it with PEFT's Arrow (peft.create_arrow_model), whose recipe is in the library card (`lorlib card`)"
        )
    if not router.applies_experts:
        return f"router {router.describe()} applies no expert: the base model is the export"
    return None


def export(
    library: Library,
    spec: str,
    out: str | Path,
    fmt: str = "peft",
    mix: str | None = None,
    density: float | None = None,
    base_model: str | None = None,
    rm: RoutedModel | None = None,
) -> Path:
    """Write the merge the static router `spec` makes of the library's experts to `out` (absent
    or an empty folder), as a PEFT LoRA or a merged model (`FORMATS`). `rm`: a routed model of
    the library already loaded (the worker's), else one is loaded on the CPU in float32."""
    if fmt not in FORMATS:
        raise LorlibError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorlibError(f"cannot export to {out}: it exists and is not an empty folder")
    settings = {} if mix is None else {"mix": mix}
    router = make_router(spec, library.names, groups=library.groups(), density=density, **settings)
    if (problem := exportable(router)) is not None:
        raise LorlibError(problem)
    rm = rm or RoutedModel.load(library, base_model=base_model, device="cpu", dtype="float32")
    adapter = rm.merged_adapter(router)
    staging = out.with_name(f".{out.name}.export")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        adapter_dir = staging / "adapter" if fmt == "merged" else staging
        write_adapter(adapter_dir, adapter, adapter.stored_config(library.base_model))
        (adapter_dir / "README.md").write_text(adapter_card(library, router, adapter.rank))
        if fmt == "merged":
            _merge(rm, adapter_dir, staging)
            shutil.rmtree(adapter_dir)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except OSError as exc:
        raise LorlibError(f"cannot export to {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _merge(rm: RoutedModel, adapter_dir: Path, into: Path) -> None:
    """The base model with the adapter folded into its weights, saved for plain transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorlib_ui.core.base_model import resolve_base_model

    source = resolve_base_model(rm.library.base_model)
    base = AutoModelForCausalLM.from_pretrained(source, dtype="float32", trust_remote_code=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(into, safe_serialization=True)
    rm.tokenizer.save_pretrained(into)


def adapter_card(library: Library, router: Router, rank: int) -> str:
    """What the exported adapter is: which merge of which experts."""
    used = library.names if router.subset is None else [library.names[i] for i in router.subset]
    exact = (
        f"The experts' updates stand side by side, so its rank ({rank}) is the sum of theirs and the "
        "merge is exact: this adapter applies exactly what the router does."
        if router.mix == "outputs"
        else f"Its rank ({rank}) is the largest of the experts': the merge of their A's and of their s·B's."
    )
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {library.base_model}",
            "tags: [lora, peft, lorlib, merge]",
            "---",
            f"# {router.describe()} over {len(used)} experts",
            "",
            f"A merge exported by lorlib (`lorlib export --router {router.describe()}`) of these experts of "
            f"the library: {', '.join(used)}.",
            "",
            exact,
            "",
        ]
    )
