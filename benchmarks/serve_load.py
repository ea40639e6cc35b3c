"""Serving ResNet-50 at 224 px over HTTP on this CPU: what the HTTP layer and the batching cost, and how
`resforge serve` compares with LitServe and a plain FastAPI endpoint serving the same Predictor.

  - the model: ResNet-50 trained briefly on scikit-image's photos (inference_cpu.py's model), at 224
    px, on the backend `auto` picks here at batch 16 (every server is given that one backend);
  - the load: closed-loop clients on loopback (each sends its next request when the last is
    answered), 1, 4, 16 and 64 at once, `--duration` seconds after `--warmup` seconds, a JPEG photo
    per request as a multipart file (the form every server takes); requests/s, p50/p99 latency and errors per server;
  - the reference: the same Predictor in this process, offline: img/s from the same JPEG bytes at
    batch 16 (decode + preprocess + infer) and the batch-1 model latency (infer only, and end to end);
  - overload (resforge serve): open-loop Poisson arrivals at twice the rate it served 16 clients,
    for `--overload` seconds: the answers by status, how fast the 503s come back, the p99 of the 200s,
    and /health afterwards;
  - soak (resforge serve): `--soak` requests from 16 clients; the server's resident memory after
    the first 1,000 and at the end.

Each server runs in a process of its own, one after another, alone on the machine.

    python benchmarks/serve_load.py [--work DIR] [--duration 15] [--clients 1,4,16,64]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from inference_cpu import build_model  # noqa: E402

from resforge.data.folder import scan_images  # noqa: E402
from resforge.runtime.measure import sample_batch  # noqa: E402
from resforge.runtime.predictor import Predictor  # noqa: E402
from resforge.timing import timed_calls  # noqa: E402
from resforge.device import cpu_name  # noqa: E402

MAX_BATCH, MAX_WAIT_MS = 16, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(model: Path, backend: str) -> dict[str, list[str]]:
    """Command lines of the servers compared, by name."""
    py = sys.executable
    peers = str(Path(__file__).with_name("serve_peers.py"))
    resforge = [py, "-m", "resforge", "serve", str(model), "--backend", backend, "--max-wait-ms", str(MAX_WAIT_MS)]
    return {"resforge serve": resforge + ["--max-batch", str(MAX_BATCH)],
            "resforge serve, no batching": resforge + ["--max-batch", "1"],
            "LitServe (batching)": [py, peers, "litserve", str(model), "{port}", backend, "--max-batch",
                                    str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS)],
            "plain FastAPI (no batching)": [py, peers, "fastapi", str(model), "{port}", backend]}


@contextlib.contextmanager
def started(command: list[str]) -> Any:
    port = free_port()
    command = [c.replace("{port}", str(port)) for c in command]
    if "resforge" in command[2:4]:
        command += ["--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 600
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{command[:4]} did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def load(url: str, images: list[bytes], clients: int, warmup: float, duration: float) -> dict[str, Any]:
    """Closed-loop clients for warmup + duration seconds; what was answered within the measured window."""
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = i
            while (t0 := time.monotonic()) < stop:
                try:
                    r = http.post(f"{url}/v1/predict", files={"files": ("photo.jpg", images[n % len(images)],
                                                                             "image/jpeg")})
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                t1 = time.monotonic()
                n += clients
                if t0 >= measure_from and t1 <= stop:
                    with lock:
                        if status == "200":
                            latencies.append(t1 - t0)
                        else:
                            errors[status] = errors.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / duration, "p50": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99": float(np.percentile(ms, 99)) if len(ms) else None, "errors": errors}


def open_loop(url: str, images: list[bytes], rate: float, duration: float) -> dict[str, Any]:
    """Poisson arrivals at `rate` per second for `duration` seconds, each sent without waiting for the others."""
    import asyncio

    async def run() -> list[tuple[str, float]]:
        rng = np.random.default_rng(0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            async def one(i: int) -> tuple[str, float]:
                t0 = time.monotonic()
                try:
                    r = await http.post(f"{url}/v1/predict", files={"files": ("photo.jpg", images[i % len(images)],
                                                                                "image/jpeg")})
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                return status, time.monotonic() - t0

            tasks, start, t = [], time.monotonic(), 0.0
            while t < duration:
                t += rng.exponential(1 / rate)
                await asyncio.sleep(max(0.0, start + t - time.monotonic()))
                tasks.append(asyncio.create_task(one(len(tasks))))
            return await asyncio.gather(*tasks)

    answers = asyncio.run(run())
    by_status: dict[str, list[float]] = {}
    for status, seconds in answers:
        by_status.setdefault(status, []).append(1000 * seconds)
    ok, busy = np.array(by_status.get("200", [])), np.array(by_status.get("503", []))
    return {"sent": len(answers), "counts": {k: len(v) for k, v in by_status.items()},
            "p99_200": float(np.percentile(ok, 99)) if len(ok) else None,
            "p99_503": float(np.percentile(busy, 99)) if len(busy) else None,
            "max_503": float(busy.max()) if len(busy) else None,
            "healthy_after": httpx.get(f"{url}/health", timeout=10).status_code == 200
            and httpx.get(f"{url}/ready", timeout=10).status_code == 200}


def server_p99(url: str, status: str) -> float | None:
    """p99 (upper bucket bound) of the server's own request time for answers of `status`, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    buckets = [(float(s.labels["le"]), s.value) for f in families for s in f.samples if s.name == "resforge_request_seconds_bucket"
               and s.labels.get("route") == "/v1/predict" and s.labels.get("status") == status]
    if not buckets or not buckets[-1][1]:
        return None
    total = max(v for _, v in buckets)
    return 1000 * next(le for le, v in sorted(buckets) if v >= 0.99 * total)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def soak(url: str, pid: int, images: list[bytes], total: int, clients: int = 16) -> dict[str, Any]:
    """`total` requests from `clients` closed-loop clients; resident memory after 1,000 and at the end."""
    done, errors, lock, marks = [0], [0], threading.Lock(), {}

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    if done[0] >= total:
                        return
                    n = done[0] = done[0] + 1
                    if n == 1000:
                        marks["warm"] = rss_mb(pid)
                r = http.post(f"{url}/v1/predict", files={"files": ("photo.jpg", images[n % len(images)],
                                                                      "image/jpeg")})
                if r.status_code != 200:
                    with lock:
                        errors[0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": total, "errors": errors[0], "seconds": time.monotonic() - start,
            "rss_warm_mb": marks.get("warm"), "rss_end_mb": rss_mb(pid)}


def offline(model: Path, backend: str, images: list[bytes], duration: float) -> dict[str, float]:
    """The Predictor alone: img/s at batch 16 from JPEG bytes, batch-1 latency (infer, and end to end)."""
    predictor = Predictor.load(model, backend, batch_size=MAX_BATCH)
    batch = (images * MAX_BATCH)[:MAX_BATCH]
    x1 = sample_batch(predictor.info, 1)
    for _ in range(3):
        predictor.predict(batch, batch_size=MAX_BATCH)
        predictor(x1)
    b16 = timed_calls(lambda: predictor.predict(batch, batch_size=MAX_BATCH), duration)
    infer = timed_calls(lambda: predictor(x1), duration)
    e2e = timed_calls(lambda: predictor.predict(images[0]), duration)
    return {"b16_img_s": MAX_BATCH / statistics.median(b16), "b1_ms": 1000 * statistics.median(infer),
            "b1_e2e_ms": 1000 * statistics.median(e2e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/resforge-serve-bench")
    ap.add_argument("--train-minutes", type=float, default=1.0)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds per server and client count")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--only", help="comma-separated server names to run (default: all)")
    ap.add_argument("--overload", type=float, default=30.0, help="seconds of open-loop load at 2x capacity (0: skip)")
    ap.add_argument("--soak", type=int, default=20_000, help="requests of the soak (0: skip)")
    args = ap.parse_args()
    work = Path(args.work)
    model = work / "r50-224" / "best.safetensors"
    data = work / "data" / "photos"
    if not model.is_file():
        model, data = build_model(work, args.train_minutes)
    images = [Path(f).read_bytes() for f in scan_images([data])[:32]]
    backend = Predictor.load(model, "auto", batch_size=MAX_BATCH).backend
    ref = offline(model, backend, images, args.duration / 3)
    counts = [int(c) for c in args.clients.split(",")]
    rows, extra = {}, {}
    for name, command in servers(model, backend).items():
        if args.only and name not in args.only.split(","):
            continue
        with started(command) as (url, pid):
            for c in counts:
                print(f"{name}: {c} clients", file=sys.stderr, flush=True)
                rows[(name, c)] = load(url, images, c, args.warmup, args.duration)
            if name == "resforge serve" and args.overload and (name, 16) in rows:
                rate = 2 * rows[(name, 16)]["rps"]
                print(f"{name}: open loop at {rate:.0f} req/s", file=sys.stderr, flush=True)
                extra["overload"] = {"rate": rate, **open_loop(url, images, rate, args.overload),
                                     "server_503_ms": server_p99(url, "503")}
            if name == "resforge serve" and args.soak:
                print(f"{name}: soak of {args.soak} requests", file=sys.stderr, flush=True)
                extra["soak"] = soak(url, pid, images, args.soak)
    report(rows, ref, counts, backend, args)
    report_extra(extra, args)


def report(rows: dict, ref: dict[str, float], counts: list[int], backend: str, args: argparse.Namespace) -> None:
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, backend {backend}, ResNet-50 at 224 px, "
          f"{args.duration:g} s per cell after {args.warmup:g} s\n")
    print(f"Offline Predictor: {ref['b16_img_s']:.1f} img/s at batch {MAX_BATCH} from JPEG bytes; batch 1: "
          f"{ref['b1_ms']:.1f} ms infer, {ref['b1_e2e_ms']:.1f} ms end to end\n")
    print("| server | clients | req/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|---|")
    for (name, c), r in rows.items():
        p50 = f"{r['p50']:.1f}" if r["p50"] is not None else "-"
        p99 = f"{r['p99']:.1f}" if r["p99"] is not None else "-"
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {name} | {c} | {r['rps']:.1f} | {p50} | {p99} | {errors} |")
    ours, lit = rows.get(("resforge serve", 16)), rows.get(("LitServe (batching)", 16))
    one = rows.get(("resforge serve", 1))
    print("\n| goal | target | measured | met |\n|---|---|---:|---|")
    if ours:
        ratio = ours["rps"] / ref["b16_img_s"]
        print(f"| served at 16 clients / offline batch {MAX_BATCH} | ≥ 0.9× | {ratio:.2f}× | "
              f"{'yes' if ratio >= 0.9 else '**no**'} |")
    if one:
        bound = ref["b1_ms"] + 5
        print(f"| p50 at 1 client | ≤ {bound:.1f} ms (batch-1 infer + 5) | {one['p50']:.1f} ms | "
              f"{'yes' if one['p50'] <= bound else '**no**'} |")
    if ours and lit:
        print(f"| req/s at 16 clients against LitServe | ≥ 1.0× | {ours['rps'] / lit['rps']:.2f}× | "
              f"{'yes' if ours['rps'] >= lit['rps'] else '**no**'} |")
        print(f"| p99 at 16 clients against LitServe | ≤ 1.0× | {ours['p99'] / lit['p99']:.2f}× | "
              f"{'yes' if ours['p99'] <= lit['p99'] else '**no**'} |")


def report_extra(extra: dict[str, Any], args: argparse.Namespace) -> None:
    if o := extra.get("overload"):
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(o["counts"].items()))
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"\n**Overload** (resforge serve): open-loop Poisson arrivals at {o['rate']:.0f} req/s (2x what 16 "
              f"clients got) for {args.overload:g} s: {o['sent']} sent; answers {counts}; 503s back in p99 "
              f"{fmt(o['p99_503'])} ms (max {fmt(o['max_503'])}) at the client, p99 <= {fmt(o['server_503_ms'])} ms "
              f"in the server; p99 of the 200s {fmt(o['p99_200'])} ms; "
              f"healthy and ready afterwards: {'yes' if o['healthy_after'] else '**no**'}")
    if s := extra.get("soak"):
        growth = s["rss_end_mb"] - s["rss_warm_mb"]
        print(f"\n**Soak** (resforge serve): {s['requests']:,} requests from 16 clients in {s['seconds']:.0f} s, "
              f"{s['errors']} errors; resident memory {s['rss_warm_mb']:.0f} MB after 1,000, {s['rss_end_mb']:.0f} "
              f"MB at the end ({growth:+.1f} MB; goal < 50: {'met' if growth < 50 else '**missed**'})")


if __name__ == "__main__":
    main()
