"""Soak: 8 sessions for 10 minutes on a served explorer, then SIGTERM; does anything grow or stay behind?

    python benchmarks/bench_soak.py [--sessions 8] [--minutes 10] [--warm-up 5] [--download-ttl 120]

Starts `python app.py` as a user would (the embedded SmolLM2-135M-Instruct), serving a folder of
libraries (`--libraries`): one copy of the shipped library per session and one shared copy. Each
session, in turn and in a loop: routes a held-out prompt (Arrow, 8 new tokens), downloads one
expert, imports an adapter zip into its own library and removes it again (so the library itself
stays the same size), opens the shared library and its own again, and every fifth round downloads
its whole library. Every 10 s it samples the server's RSS (with its children) and the size of the
temporary folders the server made (uploads, Gradio's cache, the worker's downloads). Uploads and
downloads expire after --download-ttl seconds, so the first --warm-up minutes are the warm-up: the
folder fills until the oldest files start to expire.

Reports requests served, errors, p50/p95 latency by request, RSS and temporary disk minute by
minute, and their growth: the mean of the last two minutes' samples against the mean of the two
minutes after the warm-up (single samples swing by a download or two). Then it stops the server
with SIGTERM and lists what it left in the temporary folder (nothing, if the run passes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import defaultdict
from datetime import date
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _folder_size(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else []:
            try:
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
            except OSError:
                continue  # deleted while walking
    return total


def _rss(process: psutil.Process) -> int:
    processes = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running())


def _adapter_zip(library: Path, work: Path) -> Path:
    """A zip of one of the shipped experts under a new name, to import and remove in a loop."""
    source = next(p for p in sorted((library / "experts").iterdir()) if p.is_dir())
    archive = work / "soak-expert.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(source / name, f"soak-expert/{name}")
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warm-up", type=float, default=5, help="minutes before growth is measured")
    parser.add_argument("--download-ttl", type=int, default=120)
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    shipped = ROOT / "assets" / "library"
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    libraries = work / "libraries"
    for name in ["shared", *(f"session{i}" for i in range(args.sessions))]:
        shutil.copytree(shipped, libraries / name)
    archive = _adapter_zip(shipped, work)
    before = set(Path(tempfile.gettempdir()).glob("lorlib-*"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    command = [sys.executable, "app.py", "--library", str(libraries / "shared"), "--libraries", str(libraries)]
    command += ["--port", str(port), "--download-ttl", str(args.download_ttl)]
    log = open(work / "app.log", "w")  # noqa: SIM115 (closed at the end)
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if server.poll() is not None or time.time() > deadline:
            sys.exit(f"the app did not start:\n{(work / 'app.log').read_text()[-3000:]}")
        time.sleep(0.5)
    made = sorted(set(Path(tempfile.gettempdir()).glob("lorlib-*")) - before)
    process = psutil.Process(server.pid)

    probe = Client(url, verbose=False, download_files=str(work / "probe"))
    probe.predict(str(libraries / "shared"), api_name="/open_library")
    while probe.predict(api_name="/health")["busy"]:  # the warm-up loads the model
        time.sleep(1)
    prompts = [p for p in ("What is 19 plus 53?", "#3d55b4", "Is this review positive? The room was lovely.")]

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop = start + 60 * args.minutes

    def timed(kind: str, call):
        begin = time.perf_counter()
        try:
            result = call()
        except Exception as exc:  # counted, not raised: the run goes on
            with lock:
                errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        with lock:
            latencies[kind].append(time.perf_counter() - begin)
        return result

    def session(i: int) -> None:
        downloads = work / f"downloads{i}"
        client = Client(url, verbose=False, download_files=str(downloads))
        own, prompt, round_ = str(libraries / f"session{i}"), prompts[i % len(prompts)], 0
        timed("open", lambda: client.predict(own, api_name="/open_library"))
        while time.perf_counter() < stop:
            round_ += 1
            timed("route", lambda: client.predict(prompt, "arrow@private", 4, 1.0, 8, api_name="/route"))
            timed("export expert", lambda: client.predict("shared", api_name="/export_expert"))
            timed("import", lambda: client.predict(handle_file(str(archive)), api_name="/import_adapters"))
            timed("remove", lambda: client.predict("soak-expert", api_name="/remove_expert"))
            timed("open", lambda: client.predict(str(libraries / "shared"), api_name="/open_library"))
            timed("open", lambda: client.predict(own, api_name="/open_library"))
            if round_ % 5 == 0:
                timed("export library", lambda: client.predict(api_name="/export_library"))
            shutil.rmtree(downloads, ignore_errors=True)  # the client's copies, not the server's
        client.close()

    samples: list[tuple[float, int, int]] = []  # (seconds, RSS, temporary disk)

    def sample() -> None:
        while time.perf_counter() < stop:
            samples.append((time.perf_counter() - start, _rss(process), _folder_size(made)))
            time.sleep(10)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
    threads.append(threading.Thread(target=sample))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    samples.append((wall, _rss(process), _folder_size(made)))
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=120)
    log.close()
    left = [str(p) for p in made if p.exists()]
    left += [str(p) for p in set(Path(tempfile.gettempdir()).glob("lorlib-*")) - before - set(made) if p.exists()]

    mb = 2**20
    zip_mb = sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file()) / mb
    print(
        f"Run {date.today()} on {platform.machine()} with {os.cpu_count()} cores; `python app.py` on the embedded "
        f"SmolLM2-135M-Instruct (float32, CPU), {args.sessions} sessions for {args.minutes:g} min, uploads and "
        f"downloads expiring after {args.download_ttl} s, growth measured after a {args.warm_up:g}-minute warm-up.\n"
    )
    print("| request | served | p50 s | p95 s | max s |")
    print("|---|---:|---:|---:|---:|")
    for kind, values in sorted(latencies.items()):
        q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
        print(f"| {kind} | {len(values)} | {q[49]:.2f} | {q[94]:.2f} | {max(values):.2f} |")
    served = sum(len(v) for v in latencies.values())
    print(f"\n{served} requests served, {len(errors)} errors, in {wall:.0f} s.\n")

    def mean(index: int, begin: float, end: float) -> float:
        window = [s[index] for s in samples if begin <= s[0] < end] or [samples[-1][index]]
        return sum(window) / len(window) / mb

    after, end = 60 * args.warm_up, samples[-1][0]
    print("| minute | server RSS (MB) | temporary disk (MB) |")
    print("|---:|---:|---:|")
    for minute in range(int(end // 60) + 1):
        begin = 60 * minute
        print(f"| {minute} | {mean(1, begin, begin + 60):.0f} | {mean(2, begin, begin + 60):.0f} |")
    print("\n| measure | 2 min after warm-up | last 2 min | growth | peak |")
    print("|---|---:|---:|---:|---:|")
    for index, name in ((1, "server RSS (MB)"), (2, "temporary disk (MB)")):
        first, last = mean(index, after, after + 120), mean(index, end - 120, end + 1)
        peak = max(s[index] for s in samples) / mb
        print(f"| {name} | {first:.0f} | {last:.0f} | {last - first:+.0f} | {peak:.0f} |")
    print(f"\n(one download of the library is {zip_mb:.0f} MB unpacked)")
    print(f"\nSIGTERM: exit code {code}; left behind: {', '.join(left) or 'nothing'}")
    if errors:
        print("\nfirst errors:", *errors[:5], sep="\n  ")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
