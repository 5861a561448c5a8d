"""The explorer's browser UI (Gradio): five tabs over one `Worker`.

It knows nothing of models or torch: every event asks the worker and draws what comes back with
`lorlib_ui.figures`. Every event has a named API endpoint, so `gradio_client` can drive the app
as the browser does. A user's mistake (an empty prompt, a bad path, a malformed upload, k out of
range) shows as a visible error and the app keeps serving.
"""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from lorlib_ui import figures
from lorlib_ui.errors import LorlibError
from lorlib_ui.worker import JobRequest, RouteRequest, Worker

CONCURRENCY = 8  # events of one kind served at once; model work still queues at the worker's lock
ROUTERS = ["arrow", "arrow@private", "arrow@cluster", "uniform@private", "mean_delta", "base"]
POLL_S = 0.5

INTRO = (
    "**lorlib** explores a *library* of LoRA experts over one language model (Ostapenko et al., 2024). "
    "Each expert was trained on one task; **Arrow** routes every token, at every adapted layer, to the "
    "experts whose main direction its hidden state points along, with no extra training."
)
HELP = {
    "library": "The experts of the open library. *private* experts learned one task each; *cluster* experts "
    "learned the tasks of one MBC cluster; the *shared* expert learned all tasks at once.",
    "clusters": "Each point is an expert, placed by UMAP so that experts with similar weights sit close. "
    "MBC groups experts by the cosine similarity of their weights; move k to regroup them. The silhouette "
    "curve suggests a k; the adjusted Rand index says how well clusters match the known task families.",
    "route": "Type a prompt and pick a router. The heatmap shows, for every adapted layer, how much weight "
    "each expert got on average over the tokens; below, pick one layer to see each token's weights and the "
    "text coloured by each token's top expert.",
    "build": "Train one expert per task of the embedded BIG-bench data (or your own file) into the open "
    "library. Experts already there are skipped; each finished expert is saved at once.",
    "evaluate": "Compare routers zero-shot on the library's held-out tasks (no expert saw them): exact "
    "match of the answer, and multiple-choice accuracy where the task has options.",
}


def _error(exc: Exception) -> gr.Error:
    message = str(exc) if isinstance(exc, LorlibError) else f"unexpected {type(exc).__name__}: {exc}"
    return gr.Error(message, print_exception=not isinstance(exc, LorlibError))


def experts_frame(info) -> pd.DataFrame:
    rows = []
    for e in info.experts:
        metrics = e.get("metrics") or {}
        rows.append(
            {
                "name": e["name"],
                "kind": e["kind"],
                "family": e.get("family") or "",
                "cluster": e.get("cluster") or "",
                "tasks": ", ".join(e.get("tasks") or []),
                "rank": e["rank"],
                "targets": ", ".join(e["target_modules"]),
                "steps": metrics.get("steps", ""),
                "final loss": round(metrics["final_loss"], 3) if "final_loss" in metrics else "",
            }
        )
    return pd.DataFrame(
        rows, columns=["name", "kind", "family", "cluster", "tasks", "rank", "targets", "steps", "final loss"]
    )


def evaluation_frame(evaluation: dict | None) -> pd.DataFrame:
    rows = []
    for r in (evaluation or {}).get("summary", []):
        rows.append(
            {
                "router": r["router"],
                "tasks": r["tasks"],
                "exact match %": round(100 * r["exact_match"], 1),
                "answer log-lik.": round(r["loglik"], 3),
                "multiple choice %": "" if r["mc_accuracy"] is None else round(100 * r["mc_accuracy"], 1),
            }
        )
    return pd.DataFrame(rows, columns=["router", "tasks", "exact match %", "answer log-lik.", "multiple choice %"])


def build_app(worker: Worker, library: str, tasks_by_family: dict[str, list[str]] | None = None) -> gr.Blocks:
    """The explorer over `worker`, opening `library` first."""
    tasks_by_family = tasks_by_family or {}

    with gr.Blocks(title="lorlib: LoRA library explorer") as app:
        gr.Markdown(f"# lorlib: LoRA library explorer\n{INTRO}")
        path = gr.State(library)
        with gr.Row():
            path_box = gr.Textbox(library, label="Library folder", scale=4)
            open_btn = gr.Button("Open", scale=1)
        status = gr.Markdown()
        record_state = gr.State(None)

        with gr.Tabs():
            with gr.Tab("Library", id="library"):
                gr.Markdown(HELP["library"])
                table = gr.Dataframe(interactive=False, wrap=True, label="Experts")
                with gr.Row():
                    upload = gr.File(label="Import PEFT adapters (zip)", file_types=[".zip"], type="filepath")
                    import_btn = gr.Button("Import")
                with gr.Row():
                    expert_pick = gr.Dropdown([], label="Expert", allow_custom_value=False)
                    export_btn = gr.Button("Download expert")
                    export_lib_btn = gr.Button("Download library")
                    download = gr.File(label="Download", interactive=False)

            with gr.Tab("Clusters", id="clusters"):
                gr.Markdown(HELP["clusters"])
                with gr.Row():
                    k_slider = gr.Slider(1, 16, value=4, step=1, label="k (number of clusters)")
                    colour = gr.Radio(["cluster", "family"], value="cluster", label="Colour by")
                ari = gr.Markdown()
                scatter = gr.Plot(label="UMAP of experts", show_label=False)
                with gr.Row():
                    similarity = gr.Plot(label="Similarity", show_label=False)
                    silhouette = gr.Plot(label="Silhouette", show_label=False)

            with gr.Tab("Route", id="route"):
                gr.Markdown(HELP["route"])
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask something...")
                        example_pick = gr.Dropdown([], label="Examples from held-out tasks", allow_custom_value=False)
                        with gr.Row():
                            router = gr.Dropdown(
                                ROUTERS, value="arrow@private", label="Router", allow_custom_value=True
                            )
                            compare_router = gr.Dropdown(
                                ROUTERS, value="base", label="Compare with", allow_custom_value=True
                            )
                        with gr.Row():
                            top_k = gr.Slider(1, 16, value=4, step=1, label="top-k")
                            temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.1, label="temperature")
                            max_new = gr.Slider(1, 256, value=32, step=1, label="max new tokens")
                        with gr.Row():
                            route_btn = gr.Button("Route", variant="primary")
                            compare_btn = gr.Button("Compare two routers")
                        answer = gr.Textbox(label="Generated text", lines=4, interactive=False)
                        timing = gr.Markdown()
                    with gr.Column(scale=3):
                        layer_plot = gr.Plot(label="Routing per layer", show_label=False)
                with gr.Row():
                    module_pick = gr.Dropdown([], label="Layer", allow_custom_value=False)
                coloured = gr.HighlightedText(
                    label="Tokens coloured by their top expert at this layer", show_legend=True
                )
                token_plot = gr.Plot(label="Tokens x experts", show_label=False)
                with gr.Row():
                    compare_a = gr.Textbox(label="Router A", lines=4, interactive=False)
                    compare_b = gr.Textbox(label="Router B", lines=4, interactive=False)
                with gr.Row():
                    compare_plot_a = gr.Plot(show_label=False)
                    compare_plot_b = gr.Plot(show_label=False)

            with gr.Tab("Build", id="build"):
                gr.Markdown(HELP["build"])
                families = gr.Dropdown(sorted(tasks_by_family), multiselect=True, label="Families (embedded data)")
                tasks = gr.Dropdown(
                    sorted(t for ts in tasks_by_family.values() for t in ts), multiselect=True, label="or tasks"
                )
                data_file = gr.File(label="or your own data file", file_types=[".jsonl", ".gz", ".csv", ".parquet"])
                with gr.Row():
                    steps = gr.Slider(1, 500, value=60, step=1, label="steps per expert")
                    rank = gr.Slider(1, 32, value=4, step=1, label="rank")
                    shared = gr.Checkbox(value=False, label="also train the shared expert")
                build_targets = gr.Dropdown(  # choices follow the open library; the worker checks the names
                    [],
                    multiselect=True,
                    allow_custom_value=True,
                    label="adapted modules (MBC clusters only experts that adapt the same modules at the same rank)",
                    elem_id="build-targets",
                )
                with gr.Row():
                    build_btn = gr.Button("Build", variant="primary")
                    cancel_build = gr.Button("Cancel")
                build_status = gr.Markdown()

            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown(HELP["evaluate"])
                eval_routers = gr.CheckboxGroup(
                    ["base", "uniform", "arrow", "arrow-cluster", "shared", "oracle"],
                    value=["base", "uniform", "arrow", "arrow-cluster", "shared", "oracle"],
                    label="Routers",
                )
                eval_limit = gr.Slider(1, 200, value=20, step=1, label="test rows per task")
                with gr.Row():
                    eval_btn = gr.Button("Evaluate", variant="primary")
                    cancel_eval = gr.Button("Cancel")
                eval_status = gr.Markdown()
                eval_plot = gr.Plot(show_label=False)
                eval_table = gr.Dataframe(interactive=False, label="Results")
        job_state = gr.State(None)

        # ---- handlers ---------------------------------------------------------------------------
        def open_library(folder: str):
            try:
                info = worker.library(folder)
                examples = worker.examples(folder)
            except Exception as exc:
                raise _error(exc) from None
            names = [e["name"] for e in info.experts]
            n_task = sum(e["kind"] in ("private", "imported") for e in info.experts)
            has_private = any(e["kind"] == "private" for e in info.experts)
            modules_note = f"{len(names)} experts on {info.base_model}"
            routers = [*ROUTERS, *(f"expert:{name}" for name in names)]  # or one expert alone
            held = f"; held out: {', '.join(info.held_out)}" if info.held_out else ""
            return (
                info.path,
                f"Opened **{info.path}**: {modules_note}{held}.",
                experts_frame(info),
                gr.Dropdown(choices=names, value=names[0] if names else None),
                gr.Dropdown(choices=[(f"{t}: {p[:60]}", p) for t, p in examples], value=None),
                # a slider needs max > min: with fewer than 2 experts, the worker explains the refusal
                gr.Slider(1, max(n_task, 2), value=min(max(len(info.held_out), 2), max(n_task, 1)), step=1),
                evaluation_frame(info.evaluation),
                figures.evaluation_bars((info.evaluation or {}).get("summary", [])),
                gr.Dropdown(choices=routers, value="arrow@private" if has_private else "arrow"),
                gr.Dropdown(choices=routers, value="base"),
                gr.Slider(1, max(len(names), 2), value=min(4, max(len(names), 1)), step=1),
                gr.Dropdown(choices=info.modules, value=info.new_targets),
                gr.Slider(value=info.new_rank),
            )

        open_outputs = [path, status, table, expert_pick, example_pick, k_slider, eval_table, eval_plot, router]
        open_outputs += [compare_router, top_k, build_targets, rank]

        def clusters(folder: str, k: int, colour_by: str):
            try:
                view = worker.clusters(folder, int(k))
            except Exception as exc:
                raise _error(exc) from None
            note = "" if view.ari is None else f"Adjusted Rand index against the task families: **{view.ari:.2f}**"
            return (
                figures.cluster_scatter(view, colour_by),
                figures.similarity_heatmap(view),
                figures.silhouette_curve(view),
                note,
            )

        cluster_inputs, cluster_outputs = [path, k_slider, colour], [scatter, similarity, silhouette, ari]
        # Any change of k: a drag, a number typed into the box (clamped when it leaves), a new library.
        k_slider.change(clusters, cluster_inputs, cluster_outputs, api_name="clusters", trigger_mode="always_last")
        colour.input(clusters, cluster_inputs, cluster_outputs, api_visibility="private")

        def redraw(event):
            """After `event` opened or changed the library: the cluster view, once the rest is drawn
            (k may not have changed; when it did, the worker computes the embedding only once)."""
            return event.success(clusters, cluster_inputs, cluster_outputs, api_visibility="private")

        redraw(open_btn.click(open_library, path_box, open_outputs, api_name="open_library"))
        redraw(app.load(open_library, path_box, open_outputs, api_visibility="private"))

        def route(folder, text, spec, k, temp, max_tokens):
            request = RouteRequest(folder, text, spec, int(k), float(temp), max_new_tokens=int(max_tokens))
            try:
                for update in worker.route(request):
                    if not update.done:
                        yield update.text, f"first token after {update.first_token_s:.2f} s", gr.skip(), None, gr.skip()
                        continue
                    record = update.record
                    note = f"first token after {update.first_token_s:.2f} s, done in {update.total_s:.2f} s"
                    if update.truncated:
                        note += " (the prompt was cut to fit the model's context)"
                    default = record.modules[len(record.modules) // 2] if record.modules else None
                    choices = [(figures.short_module(m), m) for m in record.modules]
                    yield (
                        update.text,
                        note,
                        figures.layer_heatmap(record),
                        record,
                        gr.Dropdown(choices=choices, value=default),
                    )
            except Exception as exc:
                raise _error(exc) from None

        route_btn.click(
            route,
            [path, prompt, router, top_k, temperature, max_new],
            [answer, timing, layer_plot, record_state, module_pick],
            api_name="route",
        )

        def layer_detail(record, module):
            if record is None or not module:
                return None, None
            pairs, colours = figures.token_colours(record, module)
            return gr.HighlightedText(pairs, color_map=colours), figures.token_heatmap(record, module)

        module_pick.change(layer_detail, [record_state, module_pick], [coloured, token_plot], api_visibility="private")
        example_pick.change(lambda p: p or gr.skip(), example_pick, prompt, api_visibility="private")

        def compare(folder, text, spec_a, spec_b, k, temp, max_tokens):
            outputs = []
            try:
                for spec in (spec_a, spec_b):
                    request = RouteRequest(folder, text, spec, int(k), float(temp), max_new_tokens=int(max_tokens))
                    final = list(worker.route(request))[-1]
                    outputs.append((final.text, figures.layer_heatmap(final.record)))
            except Exception as exc:
                raise _error(exc) from None
            (text_a, plot_a), (text_b, plot_b) = outputs
            return text_a, text_b, plot_a, plot_b

        compare_btn.click(
            compare,
            [path, prompt, router, compare_router, top_k, temperature, max_new],
            [compare_a, compare_b, compare_plot_a, compare_plot_b],
            api_name="compare",
        )

        def import_zip(folder, archive):
            if not archive:
                raise gr.Error("choose a zip file of PEFT adapter folders first")
            try:
                names = worker.import_archive(folder, archive)
            except Exception as exc:
                raise _error(exc) from None
            gr.Info(f"imported {', '.join(names)}")
            return open_library(folder)

        redraw(import_btn.click(import_zip, [path, upload], open_outputs, api_name="import_adapters"))

        def export(folder, expert=None):
            try:
                return worker.export(folder, expert)
            except Exception as exc:
                raise _error(exc) from None

        export_btn.click(export, [path, expert_pick], download, api_name="export_expert")
        export_lib_btn.click(lambda folder: export(folder), path, download, api_name="export_library")

        def run_job(request: JobRequest, progress: gr.Progress):
            try:
                job_id = worker.submit(request)
            except Exception as exc:
                raise _error(exc) from None
            yield job_id, "queued"
            while (state := worker.job(job_id)).state in ("queued", "running"):
                progress(state.fraction, desc=state.message)
                yield job_id, f"**{state.state}**: {state.message}"
                time.sleep(POLL_S)
            if state.state == "failed":
                raise gr.Error(state.message)
            yield job_id, f"**{state.state}**: {state.message}"

        def build(folder, fams, task_list, upload_file, n_steps, r, modules, with_shared, progress=gr.Progress()):  # noqa: B008 (Gradio fills it in)
            if not modules:
                raise gr.Error("pick at least one module to adapt")
            options = {"steps": int(n_steps), "rank": int(r), "targets": list(modules), "shared": bool(with_shared)}
            if upload_file:
                options["data"] = upload_file
            if task_list:
                options["tasks"] = list(task_list)
            elif fams:
                options["families"] = list(fams)
            elif not upload_file:
                raise gr.Error("pick families or tasks, or upload a data file")
            yield from run_job(JobRequest("build", folder, options), progress)

        built = build_btn.click(
            build,
            [path, families, tasks, data_file, steps, rank, build_targets, shared],
            [job_state, build_status],
            api_name="build",
        )
        redraw(built.then(open_library, path, open_outputs, api_visibility="private"))  # also after a cancel

        def evaluate(folder, names, limit, progress=gr.Progress()):  # noqa: B008 (Gradio fills it in)
            if not names:
                raise gr.Error("pick at least one router")
            yield from run_job(JobRequest("evaluate", folder, {"routers": list(names), "limit": int(limit)}), progress)

        eval_btn.click(evaluate, [path, eval_routers, eval_limit], [job_state, eval_status], api_name="evaluate").then(
            open_library, path, open_outputs, api_visibility="private"
        )

        def cancel(job_id):
            if job_id:
                worker.cancel(job_id)
            return "cancelling..." if job_id else "no job to cancel"

        cancel_build.click(cancel, job_state, build_status, api_name="cancel_build", queue=False)
        cancel_eval.click(cancel, job_state, eval_status, api_name="cancel_evaluate", queue=False)
        gr.Button("health", visible=False).click(
            lambda: worker.health(), None, gr.JSON(visible=False), api_name="health"
        )
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve the explorer: bound to `host` only, no share link, system fonts (nothing fetched from
    outside), several events at once. `block=False` returns once it serves (tests, benchmarks)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=CONCURRENCY)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        theme=theme,
        footer_links=["api"],
        prevent_thread_lock=not block,
        quiet=not block,
    )
