"""The in-process model worker: the default backend behind the UI.

Routed models are built on first use and rebuilt when the library's manifest changes (after a
build job, an import); the last `max_models` libraries keep theirs (an LRU), so a long-running
app holds a bounded number of models however many libraries it opens. Routing calls take the
worker's lock, so the model serves one request at a time and each gets its own, correct routing
record. Long jobs (build, cluster, evaluate) run one after another on a background thread with
their own model copies (`lorlib_ui.worker.jobs`), so they slow routing down (they share the CPU)
but never block it beyond the lock. How a job trains experts is injected: `trainer_factory`
(by default a `LocalTrainer` on this worker's device; the Ray backend passes its `RayTrainer`).
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.learned_routers import learned_problem, learned_routers, summary
from lorlib_ui.core.library import TASK_KINDS, Library
from lorlib_ui.core.limits import positive_setting
from lorlib_ui.core.prompting import check_max_new_tokens, template_positions
from lorlib_ui.training.trainers import LocalTrainer, Trainer
from lorlib_ui.worker.access import Access
from lorlib_ui.worker.api import (
    ClusterView,
    Example,
    ExpertDetail,
    InsightView,
    JobRequest,
    JobStatus,
    LibraryInfo,
    RouteRequest,
    RouteUpdate,
    Worker,
    download_folder,
    duration,
)
from lorlib_ui.worker.jobs import JobBoard

MAX_MODELS_ENV = "LORLIB_MAX_MODELS"
DEFAULT_MAX_MODELS = 2  # routed models kept: the library on screen and one more
MAX_EMBEDDINGS = 4  # cluster views' embeddings kept (a few MB to a GB each)
MAX_PROMPT_TOKENS_ENV = "LORLIB_MAX_PROMPT_TOKENS"
DEFAULT_MAX_PROMPT_TOKENS = 1024  # one request's prefill, far below SmolLM2's 8,192-token context


def manifest_key(library: Library) -> str:
    return hashlib.sha256(json.dumps(library.manifest(), sort_keys=True).encode()).hexdigest()


def _demo(record) -> dict | None:
    """The stored demo example, if it is one (the manifest is untrusted: plain strings only)."""
    keys = ("task", "prompt", "expected", "router", "answer", "base_answer")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in keys):
        return None
    return {k: record[k][:4000] for k in keys}


def _router(request: RouteRequest, library: Library):
    """The router a request names, with its settings, over the library's experts and groups."""
    from lorlib_ui.core.routers import make_router

    return make_router(
        request.router,
        library.names,
        request.top_k,
        request.temperature,
        request.mix,
        groups=library.groups(),
        density=request.density,
    )


BATCH_ROWS = 8  # prompts of a route-batch request routed at a time (then the model is free again)


def _max_models(value: int | None) -> int:
    value = positive_setting(MAX_MODELS_ENV, DEFAULT_MAX_MODELS) if value is None else value
    if value < 1:
        raise LorlibError(f"the worker must keep at least one routed model, got {value}")
    return value


class LocalWorker(Worker):
    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        base_model: str | None = None,
        trainer_factory: Callable[[], Trainer] | None = None,
        max_models: int | None = None,
        access: Access | None = None,
        max_prompt_tokens: int | None = None,
    ):
        """`trainer_factory`: makes the trainer of each build and cluster job (default: a
        `LocalTrainer` on `device`). `max_models`: routed models kept (default
        $LORLIB_MAX_MODELS, else 2). `access`: which libraries requests may open and whether
        they may write (default: any path, as the command line). `max_prompt_tokens`: the
        longest prompt one route prefills, longer ones are cut from the left (default
        $LORLIB_MAX_PROMPT_TOKENS, else 1024)."""
        self.device, self.dtype, self.base_model = device, dtype, base_model
        self.max_models = _max_models(max_models)
        self.access = access or Access()
        self.max_prompt_tokens = (
            positive_setting(MAX_PROMPT_TOKENS_ENV, DEFAULT_MAX_PROMPT_TOKENS)
            if max_prompt_tokens is None
            else max_prompt_tokens
        )
        if self.max_prompt_tokens < 1:
            raise LorlibError(f"the longest prompt must be at least one token, got {self.max_prompt_tokens}")
        self._lock = threading.Lock()  # one model computation at a time; guards _routed
        self._routed: OrderedDict[str, tuple[str, object]] = OrderedDict()  # path -> (manifest key, RoutedModel)
        self._embeddings: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._embedding_lock = threading.Lock()  # two views of one new library: one computes, one waits
        self._jobs = JobBoard(trainer_factory or (lambda: LocalTrainer(self.device)))
        self._warm_ups: list[threading.Thread] = []
        self._tmp = tempfile.mkdtemp(prefix="lorlib-")  # private (0700): uploads unpack and downloads go here
        self.accept_uploads(self._tmp)  # unpacked uploads: read as data, never opened as libraries

    def accept_uploads(self, folder: str) -> None:
        self.access = replace(self.access, uploads=(*self.access.uploads, str(Path(folder).resolve())))

    def close(self) -> None:
        """Remove the worker's temporary folder (unpacked uploads, download zips): at a clean exit."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _open(self, path: str) -> Library:
        """The library a request names, if this worker may open it (`Access`), checked whole."""
        library = Library.open(self.access.library_path(path))
        self.access.check_data(library)
        return library

    # ---- queries --------------------------------------------------------------------------------
    def health(self) -> dict:
        from lorlib_ui.core.base_model import best_device

        jobs = self._jobs.all()
        return {
            "backend": "local",
            "device": self.device or best_device(),
            "libraries_loaded": list(self._routed),
            "busy": self._lock.locked(),
            "warming_up": any(t.is_alive() for t in self._warm_ups),
            "jobs_running": [j.id for j in jobs if j.state == "running"],
            "jobs_queued": [j.id for j in jobs if j.state == "queued"],
        }

    def warm_up(self, path: str) -> None:
        """Load the library's routed model, route a few tokens through it (torch's first forward
        pass sets up kernels and buffers, about a second on CPU) and compile UMAP (numba, tens of
        seconds on first use), on a background thread, so the first route and cluster view do not
        wait for them."""
        from lorlib_ui.core.generation import generate
        from lorlib_ui.core.routers import make_router
        from lorlib_ui.training.clusters import umap_coords

        def work() -> None:
            try:
                with self._lock:
                    rm = self._routed_model(self._open(path))
                    generate(rm, "Hello", make_router("arrow", rm.experts), max_new_tokens=2)
                umap_coords(np.random.default_rng(0).normal(size=(8, 4)))
            except Exception:  # a bad library shows its error on the first real request
                traceback.print_exc()

        thread = threading.Thread(target=work, name="lorlib-warm-up", daemon=True)
        self._warm_ups = [t for t in self._warm_ups if t.is_alive()] + [thread]
        thread.start()

    def library(self, path: str) -> LibraryInfo:
        from lorlib_ui.training.config import TrainConfig

        library = self._open(path)
        assignment = (library.clusters or {}).get("assignment", {})
        experts = [{**e, "cluster": assignment.get(e["name"])} for e in library.manifest()["experts"]]
        short = [m.rsplit(".", 1)[-1] for m in library.base_shapes]
        task = [e for e in library.experts if e.kind in TASK_KINDS] or library.experts
        targets = Counter(tuple(e.target_modules) for e in task).most_common(1)[0][0] if task else TrainConfig.targets
        rank = Counter(e.rank for e in task).most_common(1)[0][0] if task else TrainConfig.rank
        return LibraryInfo(
            path=str(library.path),
            base_model=library.base_model,
            experts=experts,
            modules=[m for m in dict.fromkeys(short) if short.count(m) > 1],  # per layer: not lm_head
            new_targets=list(targets),
            new_rank=int(rank),
            held_out=list(library.held_out.tasks),
            problems=library.problems,
            fingerprint=library.base_fingerprint,
            demo=_demo(library.extra.get("demo")),
            clusters=library.clusters or {},
            evaluation=library.extra.get("evaluation"),
            history=list(library.extra.get("history", [])),
            adaptation=dict(library.extra.get("adaptation") or {}),
            learned_routers=[asdict(r) for r in learned_routers(library).values()],
            **_router_menu(library),
        )

    def comparisons(self) -> dict[str, bool]:
        from lorlib_ui.core.routers import evaluable

        return evaluable()

    def examples(self, path: str, per_task: int = 2) -> list[Example]:
        from lorlib_ui.analysis.demo import menu_examples
        from lorlib_ui.training.data import load_tasks

        library = self._open(path)
        held = library.held_out
        # opening a library never touches the network: with hub data, only the stored examples
        data = load_tasks(library.data_source()) if held.tasks and held.kind != "hub" else None
        return [Example(**example) for example in menu_examples(library, data, per_task)]

    # ---- routing --------------------------------------------------------------------------------
    def explain(self, request: RouteRequest, answer: str | None = None, compare: str | None = None) -> dict:
        from lorlib_ui.core.explain import explain, explain_ids
        from lorlib_ui.core.generation import generate

        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise LorlibError("the prompt is empty")
        check_max_new_tokens(request.max_new_tokens)
        library = self._open(request.library)
        router = _router(request, library)
        other = _router(replace(request, router=compare), library) if compare else None
        with self._lock:
            rm = self._routed_model(library)
            if answer and answer.strip():
                shown = explain(rm, request.prompt, answer, router, other, chat=request.chat)
            else:
                own = generate(
                    rm,
                    request.prompt,
                    router,
                    request.max_new_tokens,
                    record=False,
                    chat=request.chat,
                    max_prompt_tokens=self.max_prompt_tokens,
                )
                if not own.answer_ids:
                    raise LorlibError(f"router {router.describe()} answers nothing to this prompt; type an answer")
                shown = explain_ids(
                    rm, own.prompt_ids, own.answer_ids, router, other, prompt=request.prompt, answer=own.text
                )
        return shown.to_dict()

    def route_batch(self, request: RouteRequest, file: str) -> Iterator[dict]:
        from lorlib_ui.core.batch import read_prompts, route_prompts, rows_to_csv

        check_max_new_tokens(request.max_new_tokens)
        library = self._open(request.library)
        if not file:
            raise LorlibError("upload a .jsonl or .csv file of prompts first")
        rows = read_prompts(self.access.data_file(str(file)))
        router = _router(request, library)
        if (problem := library.derived.lacks_for(router)) is not None:
            raise LorlibError(problem)
        for start in range(0, len(rows), BATCH_ROWS):  # the model is shared: one batch at a time
            with self._lock:
                rm = self._routed_model(library)
                route_prompts(rm, rows[start : start + BATCH_ROWS], router, request.max_new_tokens, request.chat)
            yield {"done": min(start + BATCH_ROWS, len(rows)), "total": len(rows)}
        out = download_folder(self._tmp) / "routed.csv"
        try:
            out.write_text(rows_to_csv(rows, library.names), encoding="utf-8")
        except OSError as exc:
            raise LorlibError(f"could not write the results ({exc.strerror or exc})") from None
        yield {"done": len(rows), "total": len(rows), "file": str(out), "errors": sum(1 for r in rows if r.error)}

    def _routed_model(self, library: Library):
        """The routed model of a library (as opened now), rebuilt when its manifest changed; the
        least recently used beyond `max_models` are dropped (call under the lock)."""
        from lorlib_ui.core.routed_model import RoutedModel

        key = str(library.path.resolve())
        version = manifest_key(library)
        cached = self._routed.get(key)
        if cached is not None and cached[0] == version:
            self._routed.move_to_end(key)
            return cached[1]
        self._routed.pop(key, None)  # free the old copy before building the new one
        while len(self._routed) >= self.max_models:
            self._routed.popitem(last=False)
        rm = RoutedModel.load(library, base_model=self.base_model, device=self.device, dtype=self.dtype)
        self._routed[key] = (version, rm)
        return rm

    def route(self, request: RouteRequest) -> Iterator[RouteUpdate]:
        from lorlib_ui.analysis.demo import graded
        from lorlib_ui.core.generation import generate

        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise LorlibError("the prompt is empty")
        check_max_new_tokens(request.max_new_tokens)
        library = self._open(request.library)
        router = _router(request, library)
        start = time.perf_counter()
        updates: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with self._lock:
                    rm = self._routed_model(library)  # the one opening of this request, passed down
                    result = generate(
                        rm,
                        request.prompt,
                        router,
                        max_new_tokens=request.max_new_tokens,
                        chat=request.chat,
                        on_token=lambda text: updates.put(("text", text)),
                        max_prompt_tokens=self.max_prompt_tokens,
                    )
                    n = len(result.prompt_ids)  # the UI may leave the chat template's tokens out
                    template = template_positions(rm.tokenizer, request.chat, n, result.truncated)
                    result.record = replace(result.record, template=template)
                updates.put(("done", result))
            except Exception as exc:  # handed to the caller's thread
                updates.put(("error", exc))

        threading.Thread(target=work, name="lorlib-route", daemon=True).start()
        first = None
        while True:
            kind, value = updates.get()
            if kind == "error":
                raise value
            if first is None:
                first = time.perf_counter() - start
            if kind == "text":
                yield RouteUpdate(value, first_token_s=first)
                continue
            yield RouteUpdate(
                value.text,
                done=True,
                record=value.record,
                n_prompt_tokens=len(value.prompt_ids),
                truncated=value.truncated,
                prompt_limit=self.max_prompt_tokens,
                first_token_s=first,
                total_s=time.perf_counter() - start,
                answer_tokens=len(value.answer_ids),
                correct=None if request.expected is None else graded(value.text, request.expected),
            )
            return

    # ---- clusters --------------------------------------------------------------------------------
    def _embedding(self, path: str, library: Library) -> dict:
        """The library's MBC embedding from the LRU: {"experts", "embedding"}, and "coords" (UMAP)
        and "silhouette" once a cluster view has needed them. Call under the embedding lock."""
        from lorlib_ui.training.clusters import embed_library

        cache_key = (str(Path(path).resolve()), manifest_key(library))
        if cache_key not in self._embeddings:
            experts, embedding = embed_library(library)
            self._embeddings[cache_key] = {"experts": experts, "embedding": embedding}
            while len(self._embeddings) > MAX_EMBEDDINGS:
                self._embeddings.popitem(last=False)
        self._embeddings.move_to_end(cache_key)
        return self._embeddings[cache_key]

    def clusters(self, path: str, k: int) -> ClusterView:
        from lorlib_ui.training.clusters import task_experts, umap_coords
        from lorlib_ui.training.mbc import adjusted_rand_index, check_k, mbc_cluster, silhouette_by_k

        library = self._open(path)
        n = len(task_experts(library))
        check_k(k, n)
        with self._embedding_lock:
            entry = self._embedding(str(library.path), library)
            if "coords" not in entry:  # an expert view may have embedded the library without them
                entry["coords"] = umap_coords(entry["embedding"].vectors)
                entry["silhouette"] = silhouette_by_k(entry["embedding"], range(2, min(n - 1, 16) + 1))
            experts, embedding, coords, silhouette = (
                entry[key] for key in ("experts", "embedding", "coords", "silhouette")
            )
        labels = mbc_cluster(embedding, k).tolist()
        order = sorted(range(n), key=lambda i: (labels[i], i))
        families = [e.family for e in experts]
        known = all(families) and len(set(families)) > 1
        return ClusterView(
            names=[e.name for e in experts],
            kinds=[e.kind for e in experts],
            families=families,
            tasks=[list(e.tasks) for e in experts],
            labels=labels,
            k=k,
            coords=coords,
            similarity=embedding.similarity[np.ix_(order, order)],
            clustered=[experts[i].name for i in order],
            silhouette=silhouette,
            ari=adjusted_rand_index(labels, families) if known else None,
        )

    # ---- one expert --------------------------------------------------------------------------------
    def expert_detail(self, path: str, name: str) -> ExpertDetail:
        from lorlib_ui.core.spectrum import expert_spectrum

        library = self._open(path)
        expert = library.expert(name)  # an unknown name: a one-line error naming it
        adapter = library.load_adapter(name)
        order = [m for m in library.base_shapes if m in adapter.factors]  # as the model runs them
        spectrum = expert_spectrum(adapter, order + sorted(set(adapter.factors) - set(order)))
        nearest, note = self._nearest(str(library.path), library, expert)
        metrics = {key: value for key, value in expert.metrics.items() if key != "loss_curve"}
        curve = expert.metrics.get("loss_curve")
        return ExpertDetail(
            name=expert.name,
            kind=expert.kind,
            tasks=list(expert.tasks),
            family=expert.family,
            modules=spectrum.modules,
            norms=spectrum.norms.tolist(),
            singular_values=[values.tolist() for values in spectrum.singular_values],
            nearest=nearest,
            loss_curve=[float(x) for x in curve] if curve else None,
            metrics=metrics,
            nearest_note=note,
        )

    def _nearest(self, path: str, library: Library, expert, count: int = 5) -> tuple[list[tuple[str, float]], str]:
        """The `count` experts most similar to `expert` by the cosine of their MBC embeddings (the
        cluster view's, from the same cache), or none and why."""
        if expert.kind not in TASK_KINDS:
            return (
                [],
                f"no nearest experts: MBC embeds private and imported experts, and {expert.name} is {expert.kind}",
            )
        try:
            with self._embedding_lock:
                entry = self._embedding(path, library)
        except LorlibError as exc:  # too few experts, or experts MBC cannot compare
            return [], f"no MBC similarity: {exc}"
        names, similarity = entry["embedding"].names, entry["embedding"].similarity
        row = similarity[names.index(expert.name)]
        others = sorted((i for i in range(len(names)) if names[i] != expert.name), key=lambda i: -row[i])
        return [(names[i], float(row[i])) for i in others[:count]], ""

    # ---- imports ---------------------------------------------------------------------------------
    # ---- judging routing ------------------------------------------------------------------------
    def insight(self, path: str) -> InsightView:
        """Stale results are kept, marked with what changed, where nothing fresh replaces them."""
        from lorlib_ui.analysis.evaluation import held_out_tasks, seen_tasks
        from lorlib_ui.analysis.routing_stats import load_routing, routing_seconds, stale_routing
        from lorlib_ui.analysis.transfer import stale_transfer, transfer_seconds
        from lorlib_ui.core.derived import Changes

        library = self._open(path)
        matrix, changed = stale_transfer(library)
        routing = load_routing(library)
        stale, recompute = {}, {}
        for spec, (entry, since) in stale_routing(library).items():
            if spec not in routing and all(isinstance(entry.get(k), dict) for k in ("all", "content")):
                routing[spec] = entry
                stale[spec] = since.describe()
                routed = len(entry["all"].get("tasks", []))
                recompute[spec] = duration(routing_seconds(routed, entry.get("limit"))) + " on a CPU"
        if matrix and changed.retrained:
            named = ", ".join(changed.retrained[:3]) + (" ..." if len(changed.retrained) > 3 else "")
            whose = "its" if len(changed.retrained) == 1 else "their"
            stale["transfer"] = f"{Changes(retrained=changed.retrained).describe()} ({named}: {whose} old weights)"
        if matrix and changed:
            cells = len(matrix.tasks) * (len(changed.retrained) + len(changed.added))
            recompute["transfer"] = duration(transfer_seconds(cells, int(matrix.rows.max()) or None)) + " on a CPU"
        families = dict(zip(matrix.tasks, matrix.families)) if matrix else {}
        for entry in routing.values():
            families |= dict(zip(entry["all"]["tasks"], entry["all"]["families"]))
        tasks = sorted(families, key=lambda t: (families[t] or "", t))
        assignment = (library.clusters or {}).get("assignment", {})
        groups = {  # a task expert's MBC cluster; other experts go by kind, after them
            e.name: next((assignment[t] for t in [e.name, *e.tasks] if t in assignment), e.kind)
            if e.kind in TASK_KINDS
            else e.kind
            for e in library.experts
        }
        kinds_last = {e.name: e.kind not in TASK_KINDS for e in library.experts}
        experts = sorted(library.names, key=lambda n: (kinds_last[n], groups[n], n))
        held, seen = set(held_out_tasks(library)), set(seen_tasks(library))
        sets = (("held-out", held), ("seen", seen), ("all", held | seen))
        return InsightView(
            tasks=tasks,
            families=[families[t] for t in tasks],
            experts=experts,
            groups=[groups[n] for n in experts],
            transfer=matrix.to_dict() if matrix else None,
            routing=routing,
            routers=_router_menu(library)["routers"],
            stale=stale,
            recompute=recompute,
            unscored=list(changed.added) if matrix else [],
            task_set=next((name for name, members in sets if tasks and set(tasks) <= members), None),
        )

    def import_adapters(self, path: str, folders: list[str], force: bool = False) -> list[str]:
        from lorlib_ui.core.library import import_adapters
        from lorlib_ui.training.clusters import keep_gram

        self.access.check_writable()
        library = self._open(path)
        stored = import_adapters(library.path, folders, force=force)
        keep_gram(Library.open(library.path))  # so that the cluster view computes only the new experts' rows
        return [e.name for e in stored]

    def import_archive(self, path: str, archive: str, force: bool = False) -> list[str]:
        from lorlib_ui.core.archives import adapter_folders, safe_extract

        self.access.check_writable()
        library = self._open(path)  # refuse before unpacking anything
        with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
            folders = adapter_folders(safe_extract(archive, Path(tmp) / "unpacked"))
            return self.import_adapters(str(library.path), [str(f) for f in folders], force=force)

    def import_hub(self, path: str, sources: list[str], force: bool = False) -> list[str]:
        from lorlib_ui.core.hub import HubSource
        from lorlib_ui.core.library import import_adapters
        from lorlib_ui.training.clusters import keep_gram

        self.access.check_writable()
        self.access.check_hub()
        library = self._open(path)
        parsed = [HubSource.parse(s.strip()) if isinstance(s, str) else None for s in sources]
        if not sources:
            raise LorlibError("no hub ids given")
        if None in parsed:
            bad = next((s for s, p in zip(sources, parsed) if p is None), "")
            hint = "write owner/repo, owner/repo:subfolder, each optionally @revision"
            raise LorlibError(f"{str(bad)[:100]!r} is not a hub id: {hint}")
        stored = import_adapters(library.path, parsed, force=force)
        keep_gram(Library.open(library.path))
        return [e.name for e in stored]

    def export_merge(self, path: str, router: str, mix: str | None = None, density: float | None = None) -> str:
        from lorlib_ui.core.archives import zip_folder
        from lorlib_ui.core.export import export

        library = self._open(path)
        folder = download_folder(self._tmp)
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in router)
        with self._lock:
            out = export(library, router, folder / name, mix=mix, density=density, rm=self._routed_model(library))
        try:
            return str(zip_folder(out, folder / f"{name}.zip"))
        except OSError as exc:
            raise LorlibError(f"could not write the download ({exc.strerror or exc})") from None

    def remove_expert(self, path: str, name: str) -> None:
        self.access.check_writable()
        self._open(path).remove_expert(name)

    def export(self, path: str, expert: str | None = None) -> str:
        from lorlib_ui.core.archives import zip_folder

        library = self._open(path)
        folder = library.path / library.expert(expert).path if expert else library.path
        name = f"{expert or library.path.name}.zip"
        out = download_folder(self._tmp) / name
        try:
            return str(zip_folder(folder, out))
        except OSError as exc:
            raise LorlibError(f"could not write the download ({exc.strerror or exc})") from None

    # ---- jobs ------------------------------------------------------------------------------------
    def submit(self, job: JobRequest) -> str:
        self.access.check_writable()  # every job writes its results into the library
        job = replace(job, library=self.access.library_path(job.library))
        if job.kind != "build" or Path(job.library).exists():  # build may create a library
            self._open(job.library)
        if job.options.get("data"):
            job = replace(job, options={**job.options, "data": self.access.data_file(job.options["data"])})
        return self._jobs.submit(job)

    def end_session(self, owner: str) -> None:
        self._jobs.end_session(owner)

    def job(self, job_id: str) -> JobStatus:
        return self._jobs.status(job_id)

    def cancel(self, job_id: str) -> None:
        self._jobs.cancel(job_id)


def _lacks_keys(library: Library, spec: str, lacking: dict[str, list[str]], measured: dict) -> str | None:
    """The menu's line for a router that lacks a key set for some of its experts, saying why
    where the keys went stale (experts added or retrained since they were computed) and about how
    long computing the missing ones takes, as measured in this library; None for other routers."""
    from lorlib_ui.core.routers import KEY_COMMANDS, plan_router

    try:
        plan = plan_router(spec, library.names, groups=library.groups())
    except LorlibError:
        return None
    kind = plan.router.needs
    short = [x for x in plan.experts if x in set(lacking.get(kind, []))]
    if not short:
        return None
    if (kind, *short) not in measured:  # routers over the same experts share what their files say
        measured[(kind, *short)] = library.derived.key_changes(kind, short)
    since = measured[(kind, *short)]
    if kind not in measured:
        measured[kind] = library.derived.seconds_per_expert(kind)
    per_expert = measured[kind]
    why = f" (keys stale: {since.describe(added='added or replaced')})" if since else ""
    those = "that one" if len(short) == 1 else f"those {len(short)}"
    took = f" ({duration(len(short) * per_expert)} for {those})" if per_expert else ""
    command = KEY_COMMANDS.get(kind, kind)
    return f"needs {kind} for {len(short)} of its {len(plan.experts)} experts{why}: run `{command}`{took}"


def _router_menu(library: Library) -> dict:
    """What the app's router menus offer for a library (from the registry): the specs it can run
    with a line about each, and those it cannot run yet with what they lack (and, where their
    keys went stale, why, and about how long computing them takes)."""
    from lorlib_ui.core.derived import KEY_SETS
    from lorlib_ui.core.routers import explain, menu

    lacking = {kind: library.derived.lacking(kind) for kind in KEY_SETS}
    learned = {name: r for name, r in learned_routers(library).items() if learned_problem(library, name) is None}
    mixed = {name: r.experts for name, r in learned.items()}
    routers, missing = menu(library.names, library.groups(), lacking, mixed)
    measured: dict = {}  # key set -> seconds per expert, (key set, *experts) -> why they lack it: read once
    missing = {spec: _lacks_keys(library, spec, lacking, measured) or line for spec, line in missing.items()}
    notes = {s: explain(s) for s in routers} | {f"poly:{name}": summary(r) for name, r in learned.items()}
    return {"routers": routers, "router_notes": notes, "routers_missing": missing}
