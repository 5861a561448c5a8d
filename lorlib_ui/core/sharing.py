"""Libraries in and out of the Hugging Face Hub: pull, push and the cards that say what they hold.

`pull` copies a hub library (its read-only snapshot, `lorlib_ui.core.hub`) into a folder of your
own. `push` lays out what a library publishes in a folder (`stage`) and uploads that folder with
`HfApi.upload_folder`; `--to-folder` stops after the layout, so what would be uploaded can be
read file by file. What travels:

- the manifest, with what is private to this machine taken out (the command history, local
  paths of training data; held-out data named by a local path travels as a copy inside);
- every expert's two PEFT files and its card, so that `PeftModel.from_pretrained(base, repo,
  subfolder="experts/NAME")` works;
- all derived data (prototypes, the MBC Gram matrix, gates and activations, the transfer matrix,
  routing statistics, learned routers): each is keyed by the weights hashes it was computed from,
  so it is as valid there as here, and anything stale is recomputed on use;
- the library card, README.md: the Hub's model-card header (library_name, base_model, tags,
  license, datasets where known), then the experts, the MBC clusters, the stored evaluation with
  its intervals, and how to route the library with lorlib or with PEFT's own Arrow.

`write_cards` writes the same cards into a local library (`lorlib card`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.atomic import atomic_write_text, fsync_dir
from lorlib_ui.core.derived import KINDS
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.hub import SNAPSHOT_MARK, HubLibrary, HubSource, hub_error
from lorlib_ui.core.library import MANIFEST, Expert, Library

CARD = "README.md"
TAGS = ["lora", "peft", "arrow", "mixture-of-experts", "lorlib"]
_PRIVATE_KEYS = ("history",)  # commands run on this machine, with its paths


# ---- pull ------------------------------------------------------------------------------------------
def pull(ref: str, folder: str | Path) -> Library:
    """Copy the hub library `ref` (hf://owner/repo[@revision]) into `folder`, which must not
    exist or be empty; the copy is whole or absent, and is an ordinary library."""
    hub = HubLibrary.parse(ref)
    if hub is None:
        raise LorlibError(f"{ref!r} is not a hub library: write hf://owner/repo, or hf://owner/repo@revision")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise LorlibError(f"cannot pull into {folder}: it exists and is not an empty folder")
    snapshot = Library.open(ref)  # fetched, then checked whole as any library
    staging = folder.with_name(f".{folder.name}.pull")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(snapshot.path, staging, ignore=shutil.ignore_patterns(SNAPSHOT_MARK))
        (staging / ".lock").touch()
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
        fsync_dir(folder.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LorlibError(f"cannot pull into {folder}: {exc.strerror or exc}") from None
    library = Library.open(folder)
    library.record_history(f"pull {snapshot.snapshot_of}", 0.0)
    return library


# ---- push ------------------------------------------------------------------------------------------
def stage(library: Library, into: str | Path, license: str = "other", repo: str | None = None) -> list[str]:
    """Lay out in `into` (absent or empty) exactly what `push` uploads to `repo` (the cards name
    it); returns its files, sorted."""
    into = Path(into)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise LorlibError(f"cannot write the upload to {into}: it exists and is not an empty folder")
    manifest = public_manifest(library)
    files: dict[str, Path] = {}  # path in the repo -> file of the library
    for e in library.experts:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            files[f"{e.path}/{name}"] = library.path / e.path / name
        for kind in (k for k in KINDS.values() if k.shape == "per_expert"):
            if (library.path / e.path / kind.file).is_file():
                files[f"{e.path}/{kind.file}"] = library.path / e.path / kind.file
    for kind in KINDS.values():
        if kind.shape == "tensors" and (library.path / kind.file).is_file():
            files[kind.file] = library.path / kind.file
        if kind.shape == "named":
            for entry in (library.extra.get(kind.name) or {}).values():
                files[entry["file"]] = library.path / entry["file"]
    for entry in (library.extra.get("side_files") or {}).values():
        files[entry["file"]] = library.path / entry["file"]
    held = library.held_out
    if held.kind in ("inside", "path"):
        source = Path(held.source(library.path))
        if not source.is_file():
            raise LorlibError(f"library {library.path}: its held-out data {held.data} is missing, so it cannot travel")
        name = held.data if held.kind == "inside" else f"held_out_data{''.join(source.suffixes[-2:])}"
        files[name] = source
        manifest["held_out"] = {**held.to_manifest(), "data": name}
    try:
        into.mkdir(parents=True, exist_ok=True)
        for target, source in files.items():
            (into / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, into / target)  # regular files: the library refuses links on opening
        (into / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for e in library.experts:
            (into / e.path / CARD).write_text(expert_card(library, e, license, repo))
        (into / CARD).write_text(library_card(library, license, repo))
    except OSError as exc:
        raise LorlibError(f"cannot write the upload to {into}: {exc.strerror or exc}") from None
    return sorted(p.relative_to(into).as_posix() for p in into.rglob("*") if p.is_file())


def public_manifest(library: Library) -> dict:
    """The manifest as it travels: without this machine's history and local paths."""
    manifest = {k: v for k, v in library.manifest().items() if k not in _PRIVATE_KEYS}
    for entry in manifest["experts"]:
        data = (entry.get("training") or {}).get("data")
        if isinstance(data, str) and os.path.isabs(data):
            entry["training"] = {**entry["training"], "data": PurePosixPath(data).name}
    return manifest


def push(library: Library, repo: str, private: bool = False, license: str = "other", workdir: Path | None = None):
    """Publish the library as the hub model repo `repo` (created if needed): `stage`, then one
    `HfApi.upload_folder` commit. Returns the commit's URL."""
    import tempfile

    from huggingface_hub import HfApi

    if not _is_repo_id(repo):
        raise LorlibError(f"{repo!r} is not a hub repo id: write owner/repo")
    with tempfile.TemporaryDirectory(prefix="lorlib-push-", dir=workdir) as tmp:
        stage(library, Path(tmp) / "upload", license, repo)
        try:
            api = HfApi()
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo, folder_path=Path(tmp) / "upload", commit_message=f"lorlib: {len(library.experts)} experts"
            )
        except Exception as exc:  # huggingface_hub's errors, and those of the HTTP client under it
            raise hub_error(exc, f"push to {repo}") from None
    return str(getattr(info, "commit_url", info))


# ---- cards -----------------------------------------------------------------------------------------
def write_cards(library: Library, license: str = "other") -> list[str]:
    """Write (or refresh) the library's card and every expert's, in the library; returns them."""
    written = []
    with library.locked() as current:
        for e in current.experts:
            atomic_write_text(current.path / e.path / CARD, expert_card(current, e, license))
            written.append(f"{e.path}/{CARD}")
        atomic_write_text(current.path / CARD, library_card(current, license))
        written.append(CARD)
    return written


def _header(base_model: str, license: str, datasets: list[str], tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="peft", base_model=base_model, license=license, tags=tags, datasets=datasets or None
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _datasets(library: Library, experts: list[Expert]) -> list[str]:
    """The hub datasets the experts were trained on or the library holds out, where they are hub ids."""
    names = {(e.training or {}).get("data") for e in experts} | {library.held_out.data}
    return sorted(n for n in names if isinstance(n, str) and _is_repo_id(n) and not os.path.exists(n))


def _is_repo_id(text: str) -> bool:
    source = HubSource.parse(text)
    return source is not None and not source.subfolder and source.revision is None


def _cell(value) -> str:
    text = "-" if value in (None, "", []) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def library_card(library: Library, license: str = "other", repo: str | None = None) -> str:
    """README.md of a library's repo (`repo`: owner/repo, where it is known)."""
    name = library.snapshot_of or library.path.name
    lines = [
        _header(library.base_model, license, _datasets(library, library.experts), TAGS),
        f"# {name}: a library of {len(library.experts)} LoRA experts",
        "",
        f"LoRA experts over `{library.base_model}`, built and stored by lorlib as standard PEFT adapters "
        "(one folder per expert under `experts/`), with a manifest (`manifest.json`) that says what each "
        "expert is, for routing them with Arrow (Ostapenko et al., 2024, “Towards Modular LLMs by Building "
        "and Reusing a Library of LoRAs”).",
        "",
        "## Experts",
        "",
        "| expert | kind | tasks | family | rank | modules | training steps | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in library.experts:
        kind = e.kind + (" (general)" if e.general and e.kind != "general" else "")
        steps = (e.metrics or {}).get("steps") or (e.training or {}).get("steps")
        cells = [e.name, kind, ", ".join(e.tasks), e.family, e.rank, ", ".join(e.target_modules), steps]
        lines.append("| " + " | ".join(map(_cell, cells)) + f" | {_number((e.metrics or {}).get('final_loss'))} |")
    lines += _clusters_section(library) + _evaluation_section(library) + _usage_section(library, repo)
    return "\n".join(lines) + "\n"


def _clusters_section(library: Library) -> list[str]:
    members = (library.clusters or {}).get("members") or {}
    if not members:
        return []
    lines = ["", "## MBC clusters", ""]
    lines.append(
        f"{len(members)} clusters of the task experts by the similarity of their weights (model-based "
        f"clustering, seed {library.clusters.get('seed', '-')}); each has one expert trained on its tasks."
    )
    lines.append("")
    for cluster, tasks in members.items():
        lines.append(f"- **{cluster}**: {', '.join(tasks)}")
    return lines


def _evaluation_section(library: Library) -> list[str]:
    evaluation = library.extra.get("evaluation") or {}
    summary = evaluation.get("summary") or []
    if not summary:
        return []
    lines = ["", "## Evaluation", ""]
    split = evaluation.get("split", "test")
    lines.append(
        f"Zero-shot, on the {split} rows of {summary[0].get('tasks', '?')} held-out tasks (at most "
        f"{evaluation.get('limit', '?')} per task), as `lorlib evaluate` stored it; 95% bootstrap intervals "
        "over examples in brackets."
    )
    lines += ["", "| router | exact match | log-likelihood | multiple-choice accuracy |", "|---|---|---|---|"]
    for row in summary:
        cells = [
            f"{_number(row.get(m))} [{_number((row.get(f'{m}_ci') or [None, None])[0])}, "
            f"{_number((row.get(f'{m}_ci') or [None, None])[1])}]"
            for m in ("exact_match", "loglik", "mc_accuracy")
        ]
        lines.append(f"| {_cell(row.get('router'))} | " + " | ".join(cells) + " |")
    return lines


def _usage_section(library: Library, repo_id: str | None) -> list[str]:
    repo_id = repo_id or _repo_of(library)
    repo = f"hf://{repo_id}"
    first = library.experts[0].path if library.experts else "experts/NAME"
    targets = sorted({t for e in library.experts for t in e.target_modules}) or ["q_proj", "v_proj"]
    shown = ", ".join(repr(e.path) for e in library.experts[:3]) + (", ..." if len(library.experts) > 3 else "")
    return [
        "",
        "## Route it with lorlib",
        "",
        "```",
        f"python -m lorlib_ui route {repo} --router arrow --prompt 'What is 12 + 30?'",
        f"python -m lorlib_ui pull {repo} my-library    # a copy you can extend",
        "```",
        "",
        "## Use it with PEFT",
        "",
        "Each expert loads alone:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{library.base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{first}")',
        "```",
        "",
        "and PEFT's own Arrow (`create_arrow_model`) routes all of them. It finds its prototypes by "
        "power iteration where lorlib computes them exactly, so its routing may differ a little:",
        "",
        "```python",
        "from peft import ArrowConfig, create_arrow_model",
        "",
        f"experts = [{shown}]  # every expert's folder",
        "model = create_arrow_model(",
        "    base,",
        f'    task_specific_adapter_paths=[f"{repo_id}/{{e}}" for e in experts],',
        "    arrow_config=ArrowConfig(top_k=4, router_temperature=1.0),",
        ")",
        "```",
        "",
        f"(The experts adapt {', '.join(targets)}; Arrow needs every expert to adapt the same modules.)",
    ]


def _repo_of(library: Library) -> str:
    """owner/repo of a hub library's snapshot; a placeholder for a local library."""
    return (library.snapshot_of or "hf://OWNER/REPO").removeprefix("hf://").split("@")[0]


def expert_card(library: Library, expert: Expert, license: str = "other", repo: str | None = None) -> str:
    """README.md of one expert's folder (`repo`: owner/repo, where it is known)."""
    training = expert.training or {}
    metrics = expert.metrics or {}
    tags = [*TAGS[:2], f"lorlib-{expert.kind}"]
    lines = [
        _header(library.base_model, license, _datasets(library, [expert]), tags),
        f"# {expert.name}",
        "",
        f"A LoRA expert of kind **{expert.kind}**{' (marked general)' if expert.general else ''} "
        f"over `{library.base_model}`: rank {expert.rank}, alpha {expert.alpha:g}, adapting "
        f"{', '.join(expert.target_modules)}.",
        "",
        f"- tasks: {', '.join(expert.tasks) or '-'}",
        f"- family: {expert.family or '-'}",
        f"- training: {_cell(training.get('steps'))} steps, learning rate {_cell(training.get('learning_rate'))}, "
        f"batch {_cell(training.get('batch_size'))}, seed {_cell(training.get('seed'))}",
        f"- final loss: {_number(metrics.get('final_loss'))} (first {_number(metrics.get('first_loss'))})",
        f"- weights hash: `{expert.weights_hash}`",
    ]
    if expert.source:
        lines.append(f"- imported from `{expert.source.get('hub')}` at commit `{expert.source.get('commit')}`")
    if note := training.get("card_note"):
        lines += ["", note]
    lines += [
        "",
        "It is one expert of a lorlib library (the manifest one folder up says what the others are).",
        "Load it alone with PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        f'model = PeftModel.from_pretrained(base, "{repo or _repo_of(library)}", subfolder="{expert.path}")',
        "```",
    ]
    return "\n".join(lines) + "\n"
