"""The explorer's API, driven with gradio_client against a running app on a tiny library."""

import base64
import json
import os

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio_client  # noqa: E402
from conftest import library_snapshot  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ENDPOINTS = {
    "/open_library",
    "/route",
    "/compare",
    "/clusters",
    "/import_adapters",
    "/import_hub",
    "/export_merge",
    "/download_csv",
    "/explain",
    "/route_batch",
    "/download_evaluation",
    "/download_adaptation",
    "/download_insight",
    "/download_json",
    "/download_html",
    "/export_expert",
    "/export_library",
    "/build",
    "/cancel_build",
    "/evaluate",
    "/cancel_evaluate",
    "/health",
    "/insight",
    "/transfer",
    "/routing_stats",
    "/cancel_insight",
    "/per_task",
    "/expert_detail",
}


@pytest.fixture
def client(explorer_url):
    return gradio_client.Client(explorer_url, verbose=False)


def _plot(value) -> dict:
    return json.loads(value["plot"])


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, list):
        return np.asarray(value)
    flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
    shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
    return flat.reshape(shape)


def test_the_ui_never_imports_torch():
    """The UI talks to a worker; only the worker touches the model."""
    import subprocess
    import sys

    code = (
        "import sys, lorlib_ui.app.layout, lorlib_ui.app.figures, lorlib_ui.worker.api; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_event_has_a_named_endpoint(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) >= ENDPOINTS


def _layer_weights(plot) -> np.ndarray:
    """The layer heatmap's weights, layers x experts: its panels (one per module type) stacked."""
    panels = [_array(h["z"]) for h in _plot(plot)["data"] if h["type"] == "heatmap"]
    assert panels, "no heatmap"
    return np.concatenate(panels)


def test_route_returns_text_and_layer_heatmap(client, tiny_routed):
    text, note, plot, *_ = client.predict("the quick brown", "arrow", 2, 1.0, 4, api_name="/route")
    assert isinstance(text, str) and "first token after" in note
    z = _layer_weights(plot)
    assert z.shape == (len(tiny_routed.modules), len(tiny_routed.experts))
    assert np.allclose(z.sum(axis=1), 1.0, atol=1e-4)  # mean weights over tokens: each layer's row sums to 1


def test_route_through_one_expert(client, tiny_routed):
    _, _, plot, *_ = client.predict("the quick brown", "expert:task2", 2, 1.0, 3, api_name="/route")
    z = _layer_weights(plot)
    # the experts this router cannot use are left out: one column, all the weight at every layer
    assert all(list(_array(h["x"])) == ["task2"] for h in _plot(plot)["data"] if h["type"] == "heatmap")
    assert z.shape == (len(tiny_routed.modules), 1) and np.allclose(z, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "arrow", 2, 1.0, 4), "the prompt is empty"),
        (("hi", "nonsense", 2, 1.0, 4), "unknown router"),
        (("hi", "arrow", 9, 1.0, 4), "top-k must be between 1 and the number of experts"),
    ],
)
def test_bad_route_input_is_a_visible_error_and_the_app_keeps_serving(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/route")
    assert client.predict(api_name="/health")["up"]


def test_clusters_and_k_out_of_range(client, tiny_library):
    scatter, focus, similarity, silhouette, _ = client.predict(2, "cluster", "all clusters", api_name="/clusters")
    # six experts: each has its row in the heatmap, and there is no cluster to pick
    assert focus["value"] == "all clusters" and [c[0] for c in focus["choices"]] == ["all clusters"]
    points = sum(len(_array(trace["x"])) for trace in _plot(scatter)["data"])
    assert points == len(tiny_library.experts)
    with pytest.raises(AppError, match="k must be between 1"):
        client.predict(16, "cluster", "all clusters", api_name="/clusters")


def test_unknown_library_is_refused(client):
    with pytest.raises(AppError, match="no library at /nonexistent"):
        client.predict("/nonexistent", api_name="/open_library")


def test_import_zip_and_refuse_a_malformed_one(client, tiny_library, tiny_base, tmp_path):
    from conftest import make_adapter

    from lorlib_ui.core.archives import zip_folder

    before = library_snapshot(tiny_library.path)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(AppError, match="not a zip archive"):
        client.predict(gradio_client.handle_file(str(tmp_path / "bad.zip")), api_name="/import_adapters")
    assert library_snapshot(tiny_library.path) == before
    archive = zip_folder(make_adapter(tmp_path / "newcomer", tiny_base, seed=7), tmp_path / "newcomer.zip")
    out = client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")
    assert "newcomer" in [row[0] for row in out[1]["data"]]


def test_eight_sessions_at_once_each_get_their_own_routing(explorer_url):
    """Eight clients (eight sessions) route eight prompts at the same time, three times each: no
    errors, and every answer and heatmap is the one its own prompt gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"prompt number {i}: " + "word " * (2 + 3 * i) for i in range(8)]

    def route(client, prompt):
        text, _, plot, *_ = client.predict(prompt, "arrow", 2, 1.0, 4, api_name="/route")
        return text, _array(_plot(plot)["data"][0]["z"])

    alone = gradio_client.Client(explorer_url, verbose=False)
    expected = [route(alone, p) for p in prompts]
    clients = [gradio_client.Client(explorer_url, verbose=False) for _ in prompts]

    def session(i):
        return [route(clients[i], prompts[i]) for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(session, range(8)))
    for (text, z), runs in zip(expected, results):
        for got_text, got_z in runs:
            assert got_text == text and np.allclose(got_z, z, atol=1e-6)
    assert len({z.tobytes() for _, z in expected}) == 8  # the prompts do route differently


def test_expert_detail_returns_the_spectrum_and_the_nearest_experts(client, tiny_library):
    client.predict(str(tiny_library.path), api_name="/open_library")  # fills the session's expert menu
    updates = client.predict("task1", api_name="/expert_detail")  # (value, visible) updates: the view shows
    assert [u["visible"] for u in updates] == [True, True, False, True, True]  # no curve for an import
    summary, norms, _, spectrum, nearest = (u["value"] for u in updates)
    adapter = tiny_library.load_adapter("task1")
    a, b = adapter.factors["model.layers.1.self_attn.v_proj"]
    dense = adapter.scales["model.layers.1.self_attn.v_proj"] * b.double().numpy() @ a.double().numpy()
    v_proj = next(t for t in _plot(norms)["data"] if t["name"] == "v_proj")
    assert np.isclose(_array(v_proj["y"])[1], np.linalg.norm(dense), rtol=1e-5)
    z = _array(_plot(spectrum)["data"][0]["z"])  # rows: q, k, v, o_proj's σ1..σ4; columns: layers 0, 1
    assert z.shape == (16, 2) and np.allclose(z[8:12, 1], np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-5)
    names = [row[0] for row in nearest["data"]]
    assert len(names) == 5 and "task1" not in names and "### task1" in summary
    with pytest.raises(AppError, match="nobody is not in the list of choices"):  # the menu refuses it first
        client.predict("nobody", api_name="/expert_detail")


def test_import_from_the_hub_by_id(client, tiny_library, tiny_base, tmp_path, hub):
    """The hub-id box: the id is fetched through huggingface_hub's cache (offline here), checked and
    stored; an id the hub cannot give is a visible one-line error, the library unchanged."""
    from conftest import make_adapter
    from hub_cache import publish

    folder = make_adapter(tmp_path / "fox", tiny_base, seed=11)
    publish(
        hub,
        "alice/fox-lora",
        {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")},
    )
    before = library_snapshot(tiny_library.path)
    with pytest.raises(AppError, match="hub adapter bob/none: not in the local hub cache"):
        client.predict("alice/fox-lora\nbob/none", api_name="/import_hub")
    assert library_snapshot(tiny_library.path) == before
    out = client.predict("alice/fox-lora", api_name="/import_hub")
    assert "fox-lora" in [row[0] for row in out[1]["data"]]


def test_the_route_tab_downloads_a_static_routers_merge(client, tmp_path):
    import zipfile

    download = client.predict("uniform", 0.2, api_name="/export_merge")
    names = zipfile.ZipFile(download["value"] if isinstance(download, dict) else download).namelist()
    assert {"uniform/adapter_config.json", "uniform/adapter_model.safetensors", "uniform/README.md"} <= set(names)
    with pytest.raises(AppError, match="token by token, so it has no fixed merge to export"):
        client.predict("arrow", 0.2, api_name="/export_merge")


def test_the_last_route_downloads_as_csv_json_and_html(client, tiny_routed):
    import pandas as pd

    answer, *_ = client.predict("the quick brown", "arrow", 2, 1.0, 4, api_name="/route")
    view = ("the quick brown", answer, "arrow", 2, 1.0, 4)  # the controls as they are
    table = pd.read_csv(client.predict(*view, api_name="/download_csv")["value"])
    n_tokens = table["token_index"].nunique()
    assert len(table) == n_tokens * len(tiny_routed.modules) and set(tiny_routed.experts) <= set(table.columns)
    assert np.allclose(table[tiny_routed.experts].sum(axis=1), 1.0, atol=1e-4)
    with open(client.predict(*view, api_name="/download_json")["value"]) as handle:
        record = json.load(handle)
    assert np.asarray(record["weights"]).shape == (len(tiny_routed.modules), n_tokens, len(tiny_routed.experts))
    assert len(record["top_experts"]) == n_tokens
    with open(client.predict(*view, api_name="/download_html")["value"]) as handle:
        page = handle.read()
    assert "<h1>Routing with arrow" in page and "the quick brown" in page
    assert '<script src="http' not in page  # plotly.js is inlined: the page opens offline


def test_explain_names_what_each_expert_carried(client, tiny_routed):
    answer, table, gains, credit = client.predict(
        "the quick brown", "", "arrow", "uniform", 2, 1.0, 4, 0.2, api_name="/explain"
    )
    rows = table["data"]
    assert (
        answer
        and rows
        and table["headers"][:4] == ["token", "router", "base", "gain"]
        and "uniform" in table["headers"]
    )
    assert all(abs(r[3] - (r[1] - r[2])) < 2e-3 for r in rows)  # the gain is router minus base, per token
    bars = _plot(credit)["data"][0]
    assert bars["orientation"] == "h" and set(_array(bars["y"])) <= set(tiny_routed.experts)
    with pytest.raises(AppError, match="the prompt is empty"):
        client.predict("", "", "arrow", "", 2, 1.0, 4, 0.2, api_name="/explain")


def test_many_prompts_from_an_upload_with_a_row_that_cannot_run(client, tiny_routed, tmp_path):
    import pandas as pd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the quick brown"}\nnot json\n{"prompt": "lazy dog"}\n')
    note, results = client.predict(
        gradio_client.handle_file(str(prompts)), "arrow", 2, 1.0, 3, 0.2, api_name="/route_batch"
    )
    table = pd.read_csv(results["value"], keep_default_na=False)
    assert list(table["row"]) == [1, 2, 3] and list(table["error"]) == ["", "not a JSON object", ""]
    assert "routed 2 prompts; 1 rows could not run" in note
    weights = table[[f"weight:{e}" for e in tiny_routed.experts]].iloc[[0, 2]].astype(float)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(AppError, match="upload a .jsonl or .csv file"):
        client.predict(None, "arrow", 2, 1.0, 3, 0.2, api_name="/route_batch")


def test_empty_tables_say_there_is_nothing_to_download(client):
    for name in ("/download_evaluation", "/download_adaptation"):
        with pytest.raises(AppError, match="nothing to download yet"):
            client.predict(api_name=name)
