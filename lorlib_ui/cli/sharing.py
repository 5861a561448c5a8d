"""The commands that move libraries and experts in and out: import-peft (folders and hub ids),
pull, push, card and export. The hub is reached only by a command that names it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.options import from_namespace, option

LICENSE = "the license the cards declare (a Hub license id; default other)"


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    """PEFT adapters imported as experts (`import-peft`), from folders or the hub."""

    adapters: tuple[str, ...] = option(
        (),
        "adapter folders, or hub ids owner/repo[:subfolder][@revision] (an existing folder wins)",
        positional=True,
        metavar="SOURCE",
    )
    from_file: str | None = option(None, "also import the sources listed in this file, one per line")
    base_model: str | None = option(None, "base model of a new library (default: embedded SmolLM2)")
    name: str | None = option(None, "expert name (one adapter only; default: the folder's or repo's name)")
    kind: str = option(
        "imported",
        "general: general knowledge, which arrow_gks subtracts from the other experts (default imported)",
        choices=("private", "cluster", "shared", "imported", "general"),
    )
    tasks: tuple[str, ...] = option((), "comma-separated tasks the expert was trained on")
    family: str | None = option(None, "the experts' task family")
    force: bool = option(False, "replace experts of the same name")

    def __post_init__(self):
        if not self.adapters and not self.from_file:
            raise LorlibError("name at least one adapter folder or hub id (or --from-file)")
        if self.name and (len(self.adapters) > 1 or self.from_file):
            raise LorlibError("--name can only be used with a single adapter folder")

    def sources(self) -> list[str]:
        """The sources named, those of --from-file after them (blank lines and # comments skipped)."""
        listed = []
        if self.from_file:
            try:
                text = Path(self.from_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise LorlibError(f"cannot read --from-file {self.from_file}: {reason}") from None
            listed = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        return [*self.adapters, *(s for s in listed if s)]


@dataclass(frozen=True, kw_only=True)
class PullOptions:
    """A hub library copied into a folder of your own (`pull`)."""

    ref: str = option(help="the library on the hub: hf://owner/repo or hf://owner/repo@revision", positional=True)
    folder: str = option(help="where the copy goes (absent or an empty folder)", positional=True)


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    """A library published on the hub (`push`)."""

    repo: str = option(help="the hub model repo: owner/repo (created if needed)", positional=True)
    private: bool = option(False, "create the repo private")
    to_folder: str | None = option(None, "write exactly what would be uploaded to this folder, and upload nothing")
    license: str = option("other", LICENSE)


@dataclass(frozen=True, kw_only=True)
class CardOptions:
    """The library's cards, written into it (`card`)."""

    license: str = option("other", LICENSE)


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """A static router's merge, exported for deployment (`export`)."""

    router: str = option(help="uniform, mean_delta, ties or expert:NAME, each optionally @KIND")
    format: str = option(
        "peft", "peft: one LoRA adapter folder; merged: the base model with it folded in", choices=("peft", "merged")
    )
    out: str = option(help="the folder written (absent or empty)")
    mix: str | None = option(None, "outputs (experts side by side, exact) or parameters (the router's default)")
    density: float | None = option(None, "ties: share of each expert's entries kept (default 0.2)")
    base_model: str | None = option(None, "override the library's base model (must fit it)")

    def __post_init__(self):
        if self.format not in ("peft", "merged"):
            raise LorlibError(f"unknown export format {self.format!r}; use peft or merged")


def cmd_import_peft(args) -> None:
    from lorlib_ui.cli.progress import Bars
    from lorlib_ui.core.library import Library, import_adapters
    from lorlib_ui.training.clusters import keep_gram
    from lorlib_ui.training.reporter import Count

    o = from_namespace(ImportOptions, args)
    with Bars("fetched from the hub", "adapter") as bars:
        stored = import_adapters(
            args.library,
            o.sources(),
            names=[o.name] if o.name else None,
            base_model=o.base_model,
            kind=o.kind,
            tasks=list(o.tasks) or None,
            family=o.family,
            force=o.force,
            fetched=lambda done, total: bars.progress(Count(done, total, "")),
        )
    keep_gram(Library.open(args.library))
    for e in stored:
        where = f" from {e.source['hub']}@{e.source['commit'][:12]}" if e.source else ""
        print(f"imported {e.name} (rank {e.rank}, {', '.join(e.target_modules)}){where} into {args.library}")


def cmd_pull(args) -> None:
    from lorlib_ui.core.sharing import pull

    o = from_namespace(PullOptions, args)
    library = pull(o.ref, o.folder)
    print(f"pulled {len(library.experts)} experts of {o.ref} into {library.path}")


def cmd_push(args) -> None:
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.sharing import push, stage

    o = from_namespace(PushOptions, args)
    library = Library.open(args.library)
    if o.to_folder:
        files = stage(library, o.to_folder, o.license)
        print(f"wrote the {len(files)} files that `push` would upload to {o.to_folder}; nothing was uploaded")
        return
    url = push(library, o.repo, private=o.private, license=o.license)
    print(f"pushed {len(library.experts)} experts to {o.repo}: {url}")


def cmd_card(args) -> None:
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.sharing import write_cards

    written = write_cards(Library.open(args.library), from_namespace(CardOptions, args).license)
    print(f"wrote {len(written)} cards in {args.library} (README.md, and one per expert)")


def cmd_export(args) -> None:
    from lorlib_ui.core.export import export
    from lorlib_ui.core.library import Library

    o = from_namespace(ExportOptions, args)
    out = export(Library.open(args.library), o.router, o.out, o.format, o.mix, o.density, o.base_model)
    what = "a PEFT adapter" if o.format == "peft" else "the base model with the merge folded in"
    print(f"exported {o.router} as {what} to {out}", file=sys.stdout)
