"""Security: what the app binds, what it serves, where uploads go, which files lorlib reads."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, library_snapshot

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library

ROOT = Path(__file__).resolve().parents[2]


def _listeners(port: int) -> set[str]:
    """Addresses (as the kernel writes them) listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                out.add(address)
    return out


@contextmanager
def _app_process(library: Path, tmp_path: Path, *extra: str):
    """`python app.py` as a user starts it; yields (url, process) and stops it with SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "app.py", "--library", str(library), "--port", str(port), "--device", "cpu", *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert process.poll() is None and time.time() < deadline, (tmp_path / "app.log").read_text()[-3000:]
        time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}/", process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert "gradio.live" not in (tmp_path / "app.log").read_text()  # no share link, ever


@pytest.fixture
def app_process(tiny_library, tmp_path):
    with _app_process(tiny_library.path, tmp_path) as served:
        yield served


def _temporary_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("lorlib-*"))


def test_a_clean_exit_leaves_no_temporary_files(tiny_library, tmp_path):
    """After SIGTERM: no upload, no download, no worker folder is left behind."""
    from gradio_client import Client

    before = _temporary_folders()
    with _app_process(tiny_library.path, tmp_path) as (url, process):
        client = Client(url, verbose=False)
        client.predict(str(tiny_library.path), api_name="/open_library")
        assert Path(client.predict(api_name="/export_library")).stat().st_size > 0
        made = _temporary_folders() - before
        assert {p.name.split("-")[1] for p in made} >= {"uploads"} and len(made) >= 2, made
    assert process.returncode == 0, (tmp_path / "app.log").read_text()[-2000:]
    assert not [p for p in made if p.exists()], "left behind after SIGTERM"


def test_the_app_binds_loopback_and_keeps_uploads_private(app_process, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = app_process
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert _listeners(port) <= {"0100007F", "0000000000000000FFFF00000100007F"}, _listeners(port)
    # uploads land in the app's own temporary folder (app.py: lorlib-uploads-*), this user's only
    name = f"marker-{uuid.uuid4().hex}.zip"
    (tmp_path / name).write_bytes(b"not a zip at all")
    with pytest.raises(AppError, match="not a zip archive"):
        Client(url, verbose=False).predict(handle_file(str(tmp_path / name)), api_name="/import_adapters")
    (upload,) = Path(tempfile.gettempdir()).glob(f"lorlib-uploads-*/**/{name}")
    folder = Path(tempfile.gettempdir()) / upload.relative_to(tempfile.gettempdir()).parts[0]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "route",
    [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=../../../../etc/passwd",
        "gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "file=/etc/passwd",
        "gradio_api/file={library}/manifest.json",
        "gradio_api/file={home}/.ray/auth_token",
    ],
)
def test_the_app_serves_no_other_file(explorer_url, tiny_library, route):
    """Nothing on the machine is served but the app's own assets and what an event returned."""
    path = route.format(library=tiny_library.path, home=Path.home())
    try:
        with urllib.request.urlopen(explorer_url + path, timeout=10) as response:
            body = response.read()
        status = response.status
    except urllib.error.HTTPError as exc:
        status, body = exc.code, b""
    assert status in (400, 403, 404) and b"root:" not in body and b'"experts"' not in body, (status, body[:200])


def _crafted(tiny_library, tmp_path, folder: str) -> Path:
    path = tmp_path / "crafted"
    shutil.copytree(tiny_library.path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["experts"][0]["path"] = folder
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("folder", ["../../../etc", "/etc", "experts/../../outside", "experts/task0/../.."])
def test_a_manifest_cannot_point_outside_its_library(tiny_library, tmp_path, folder, capsys):
    from conftest import run

    from lorlib_ui.worker.local import LocalWorker

    path = _crafted(tiny_library, tmp_path, folder)
    with pytest.raises(LorlibError, match="which is not in its experts/"):
        Library.open(path)
    with pytest.raises(LorlibError, match="which is not in its experts/"):
        LocalWorker(device="cpu").export(str(path), "task0")
    code, _, err = run(capsys, "info", path)
    assert code == 1 and "which is not in its experts/" in err


def test_a_symlinked_expert_folder_is_refused(tiny_library, tmp_path):
    path = _crafted(tiny_library, tmp_path, "experts/task0")
    shutil.rmtree(path / "experts" / "task0")
    (path / "experts" / "task0").symlink_to("/etc")
    with pytest.raises(LorlibError, match="experts/task0 is a link"):
        Library.open(path)


def test_remote_code_is_never_run(tmp_path, tiny_base):
    """A base model folder that asks for its own modelling code (auto_map) is not trusted."""
    from lorlib_ui.core.base_model import load_base_model

    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_base, evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "RAN"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    before = library_snapshot(evil)
    model, _ = load_base_model(str(evil), device="cpu")  # transformers' own Llama, not evil.py
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()
    assert library_snapshot(evil) == before


def test_auth_file_asks_for_a_login(tiny_library, tmp_path):
    """--auth-file: Gradio's login; without it, no endpoint answers."""
    from gradio_client import Client

    users = tmp_path / "users.txt"
    users.write_text("# the class\nteacher:s3cret-words\n")
    with _app_process(tiny_library.path, tmp_path, "--auth-file", str(users)) as (url, _):
        for route in ("config", "gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + route, timeout=10)
            assert refused.value.code == 401
        with pytest.raises(Exception):  # noqa: B017 (gradio_client's error for a refused login varies)
            Client(url, verbose=False, auth=("teacher", "wrong"))
        client = Client(url, verbose=False, auth=("teacher", "s3cret-words"))
        assert client.predict(api_name="/health")["up"]


@pytest.mark.parametrize("content", ["", "no colon here\n", ":empty-user\n"])
def test_a_bad_auth_file_is_one_line(tmp_path, content):
    users = tmp_path / "users.txt"
    users.write_text(content)
    result = subprocess.run(
        [sys.executable, "app.py", "--auth-file", str(users)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "user:password" in result.stderr and "Traceback" not in result.stderr
