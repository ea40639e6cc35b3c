"""Three denial-of-service attacks on `resforge serve`, and what each costs the server: its peak resident
memory, how `/health` answers during the attack, and what the attack itself got back.

  - aspect-ratio bomb: a PNG of 1x200,000 pixels (a few hundred bytes, far under --max-pixels) posted
    `--bombs` times; resizing its short side to the model's size makes its long side millions of pixels;
  - slowloris: `--slow` connections, each sending its headers and then one byte of a 100 kB body a
    second with `?timeout=2`, for `--seconds`; the server runs with `ulimit -n` at `--nofile`, so that
    too many open connections exhaust its file descriptors;
  - metric-label explosion: `--methods` requests with made-up HTTP methods and no API key; the size of
    `/metrics` before and after.

The model is a 1/8-width ResNet-18 taking 28x28 grayscale images (untrained: only its shape matters).
Each attack runs against a fresh server process; `/health` is asked every 50 ms with a 2 s timeout
while it lasts. `--src LABEL=PATH` runs the same attacks against the resforge sources under PATH (for
instance the code before a fix, checked out with `git worktree add`), each as a row of its own.

    python benchmarks/serve_attacks.py [--src before=/tmp/orig/src] [--src after=src]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from resforge.data.transforms import imagenet_stats, make_preprocess
from resforge.models import create_model
from resforge.models.weights import save_model


def build_model(root: Path) -> Path:
    model = create_model("resnet18", num_classes=10, width=0.125, small_input=True, in_chans=1).eval()
    mean, std = imagenet_stats(1)
    pre = make_preprocess(28, 1.0, 1, "bilinear", mean, std)
    return save_model(model, root / "tiny" / "best.safetensors",
                      {"classes": [f"class{i}" for i in range(10)], "preprocess": pre.to_dict()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Server:
    """`resforge serve` from the sources under `src`, in a process of its own, its log in a file."""

    def __init__(self, src: Path, model: Path, log: Path, nofile: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(src)}
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "resforge", "serve", str(model), "--backend", "torch",
                                      "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=log.open("wb"), preexec_fn=limit)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server never became ready:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HealthProbe:
    """Asks /health every 50 ms (2 s timeout) on a new connection each time, while the attack lasts."""

    def __init__(self, url: str):
        self.url, self.times, self.failures, self.stop = url, [], 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                ok = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                self.times.append(1000 * (time.perf_counter() - start))
            else:
                self.failures += 1
            self.stop.wait(0.05)

    def result(self) -> str:
        self.stop.set()
        self.thread.join()
        if not self.times:
            return f"no answer ({self.failures} failed)"
        p50, worst = statistics.median(self.times), max(self.times)
        return f"{p50:.1f} / {worst:.0f} ms" + (f", {self.failures} failed" if self.failures else "")


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def aspect_bomb(server: Server, args: argparse.Namespace) -> str:
    data = png(1, 200_000)
    codes = [httpx.post(f"{server.url}/v1/predict", content=data, timeout=300).status_code
             for _ in range(args.bombs)]
    return f"{len(data)}-byte PNG x{args.bombs}: {', '.join(map(str, codes))}"


def slowloris(server: Server, args: argparse.Namespace) -> str:
    head = (b"POST /v1/predict?timeout=2 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 100000\r\n\r\n")
    conns, refused = [], 0
    for _ in range(args.slow):
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            s.sendall(head)
            s.setblocking(False)
            conns.append(s)
        except OSError:
            refused += 1
    answered, closed, start = {}, set(), time.monotonic()
    while time.monotonic() - start < args.seconds:
        for i, s in enumerate(conns):
            if i in closed:
                continue
            try:
                data = s.recv(65536)
                if data:
                    answered.setdefault(i, (time.monotonic() - start, data.split(b" ", 2)[1].decode()))
                else:
                    closed.add(i)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed.add(i)
                continue
            with contextlib.suppress(OSError):
                s.send(b"\0")
        time.sleep(1)
    for s in conns:
        s.close()
    statuses = sorted({code for _, code in answered.values()})
    when = max((t for t, _ in answered.values()), default=0)
    return (f"{len(conns)} open ({refused} refused): {len(answered)} answered {'/'.join(statuses) or '-'}"
            + (f" by {when:.0f} s" if answered else "") + f", {len(closed)} closed by the server in {args.seconds} s")


def label_explosion(server: Server, args: argparse.Namespace) -> str:
    before = len(httpx.get(f"{server.url}/metrics").content)
    with httpx.Client() as client:
        for i in range(args.methods):
            client.request(f"X{i:04d}", f"{server.url}/v1/predict")
    after = len(httpx.get(f"{server.url}/metrics").content)
    return f"/metrics {before / 1000:.1f} kB -> {after / 1000:.1f} kB"


ATTACKS = {"aspect-ratio bomb": aspect_bomb, "slowloris": slowloris, "metric labels": label_explosion}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", metavar="LABEL=PATH",
                        help="resforge sources to attack (repeatable; default: this checkout's src)")
    parser.add_argument("--work", help="folder for the model and the logs (default: a temporary one)")
    parser.add_argument("--bombs", type=int, default=1, help="aspect-ratio bombs posted (default: 1)")
    parser.add_argument("--slow", type=int, default=120, help="slowloris connections (default: 120)")
    parser.add_argument("--nofile", type=int, default=128, help="the server's ulimit -n under slowloris (default: 128)")
    parser.add_argument("--seconds", type=int, default=20, help="how long slowloris lasts (default: 20)")
    parser.add_argument("--methods", type=int, default=300, help="made-up methods sent (default: 300)")
    args = parser.parse_args()
    sources = [s.split("=", 1) for s in args.src or [f"this checkout={Path(__file__).parents[1] / 'src'}"]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_model(work)
        rows = ["| attack | code | RSS before (MB) | peak RSS (MB) | /health p50 / max | log (kB) | "
                "what the attack got |", "|---|---|---:|---:|---|---:|---|"]
        for name, attack in ATTACKS.items():
            for label, src in sources:
                log = work / f"{label}-{name.replace(' ', '-')}.log"
                server = Server(Path(src).resolve(), model, log, args.nofile if name == "slowloris" else None)
                try:
                    rss = memory_mb(server.proc.pid, "VmRSS")
                    probe = HealthProbe(server.url)
                    outcome = attack(server, args)
                    health = probe.result()
                    peak = memory_mb(server.proc.pid, "VmHWM")
                finally:
                    server.stop()
                rows.append(f"| {name} | {label} | {rss:,.0f} | {peak:,.0f} | {health} | "
                            f"{log.stat().st_size / 1000:,.1f} | {outcome} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
