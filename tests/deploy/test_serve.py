"""`resforge serve`: answers equal to the Predictor's, batching, overload, deadlines, limits, keys, metrics,
graceful shutdown, and the page driven in a real browser."""

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import pytest
from helpers import CHROMIUM, browser_page, running, wait_ready
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from resforge import ConfigError
from resforge.cli import main
from resforge.data.folder import scan_images
from resforge.runtime.predictor import Predictor
from resforge.deploy.serve import ServeOptions, create_app


class Gated:
    """A runner that waits for its gate, counting the batches it sees: requests pile up while it waits."""

    def __init__(self, runner):
        self.runner, self.gate, self.entered, self.calls = runner, threading.Event(), threading.Event(), []

    def close(self):
        """From now on each batch waits for the gate (the warm-up went through it open)."""
        self.calls.clear()
        self.entered.clear()
        self.gate.clear()

    def __call__(self, x):
        self.calls.append(len(x))
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.runner(x)

    def __getattr__(self, name):
        return getattr(self.runner, name)


@pytest.fixture(scope="module")
def predictor(photo_run):
    run, _, _ = photo_run
    return Predictor.load(run, "torch", "cpu", "fp32")


@pytest.fixture(scope="module")
def images(photo_run):
    _, _, test = photo_run
    return [(os.path.basename(f), open(f, "rb").read()) for f in scan_images([test])[:6]]


def gated_server(predictor, **options):
    """A server whose model waits for the test's gate (set open during the warm-up)."""
    gated = Gated(predictor.runner)
    gated.gate.set()
    served = Predictor(gated, predictor.info, predictor.source, predictor.model)
    return gated, create_app(served, ServeOptions(**options))


def samples(url, name, headers=None):
    """The samples of one metric in the server's Prometheus text."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def metric(url, name, **labels):
    """The sum of the samples of one metric with these labels (0 when absent)."""
    return sum(s.value for s in samples(url, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def read_all(sock):
    """What the server sends on a raw connection until it closes it (a reset ends it too)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def wait_for(condition, seconds=30):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def test_answers_equal_the_predictors_with_timings_and_metadata(predictor, images):
    app = create_app(predictor, ServeOptions(max_wait_ms=1))
    with running(app) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        meta = httpx.get(f"{url}/v1/metadata").json()
        assert meta["classes"] == predictor.classes and meta["backend"] == "torch"
        assert meta["preprocess"]["img_size"] == 32 and meta["model"]["name"] == "resnet18"
        name, data = images[0]
        one = httpx.post(f"{url}/v1/predict?topk=2", content=data).json()
        expected = predictor.predict(data, topk=2)["top"]
        got = one["predictions"][0]["top"]
        assert [t["class"] for t in got] == [t["class"] for t in expected]
        assert np.allclose([t["prob"] for t in got], [t["prob"] for t in expected], atol=1e-5)
        assert set(one["predictions"][0]["timings_ms"]) == {"preprocess", "queue", "inference", "batch"}
        several = httpx.post(f"{url}/v1/predict", files=[("files", (n, d, "image/jpeg")) for n, d in images[:3]])
        rows = several.json()["predictions"]
        assert [r["name"] for r in rows] == [n for n, _ in images[:3]]
        for (_, d), row in zip(images[:3], rows):
            assert row["top"][0]["class"] == predictor.predict(d)["top"][0]["class"]
            assert len(row["top"]) == min(5, len(predictor.classes))
        assert httpx.get(f"{url}/docs").status_code == 404  # off unless --docs: Swagger UI comes from a CDN
        assert "/v1/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]
        assert httpx.head(f"{url}/health").status_code == 200 and httpx.head(f"{url}/ready").status_code == 200
        part = b'Content-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        form = b"--B\r\n" + part + data + b"\r\n--B--\r\n"
        upper = httpx.post(f"{url}/v1/predict", content=form,
                           headers={"content-type": "Multipart/Form-Data; boundary=B"})  # any letter case
        assert upper.status_code == 200 and upper.json()["predictions"][0]["name"] == "a.jpg"
    with running(create_app(predictor, ServeOptions(docs=True))) as url:
        assert httpx.get(f"{url}/docs").status_code == 200


def test_waiting_requests_leave_in_batches_full_or_timed_out(predictor, images):
    gated, app = gated_server(predictor, max_batch=4, max_wait_ms=1)
    with running(app) as url, ThreadPoolExecutor(8) as pool:
        gated.close()
        first = pool.submit(httpx.post, f"{url}/v1/predict", content=images[0][1])
        assert gated.entered.wait(30)  # the model is busy with the first request
        rest = [pool.submit(httpx.post, f"{url}/v1/predict", content=images[i % 6][1], timeout=60) for i in range(5)]
        wait_for(lambda: metric(url, "resforge_queue_depth") == 5)
        gated.gate.set()
        answers = [f.result() for f in [first, *rest]]
        assert [a.status_code for a in answers] == [200] * 6
        assert gated.calls == [1, 4, 1]  # 4 at once (full), the last alone once it waited max-wait-ms
        assert [a.json()["predictions"][0]["timings_ms"]["batch"] for a in answers[1:]].count(4) == 4
        assert metric(url, "resforge_batches_total", trigger="idle") == 1  # the first: no other was arriving
        assert metric(url, "resforge_batches_total", trigger="full") == 1
        assert metric(url, "resforge_batches_total", trigger="timeout") == 1
        assert metric(url, "resforge_batch_size_count") == 3 and metric(url, "resforge_batch_size_sum") == 6


def test_a_lone_request_does_not_wait_for_a_fuller_batch(predictor, images):
    app = create_app(predictor, ServeOptions(max_batch=16, max_wait_ms=60_000))
    with running(app) as url:
        before = metric(url, "resforge_batches_total", trigger="idle")
        r = httpx.post(f"{url}/v1/predict", content=images[0][1], timeout=30)  # half of max-wait: must not wait it
        assert r.status_code == 200 and r.json()["predictions"][0]["timings_ms"]["queue"] < 30_000
        assert metric(url, "resforge_batches_total", trigger="idle") == before + 1


def test_a_full_queue_answers_503_at_once_and_the_server_goes_on(predictor, images):
    gated, app = gated_server(predictor, queue=2, max_images=2, max_wait_ms=0)
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        gated.close()
        busy = pool.submit(httpx.post, f"{url}/v1/predict", content=images[0][1], timeout=60)
        assert gated.entered.wait(30)
        queued = [pool.submit(httpx.post, f"{url}/v1/predict", content=images[1][1], timeout=60) for _ in range(2)]
        wait_for(lambda: metric(url, "resforge_queue_depth") == 2)
        refused = httpx.post(f"{url}/v1/predict", content=images[2][1])  # answered while the model is still busy
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["error"] and not gated.gate.is_set()
        gated.gate.set()
        assert [f.result().status_code for f in [busy, *queued]] == [200, 200, 200]
        assert httpx.post(f"{url}/v1/predict", content=images[2][1]).status_code == 200


def test_a_request_past_its_deadline_is_dropped_before_the_model_with_504(predictor, images):
    gated, app = gated_server(predictor, max_wait_ms=0)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        gated.close()
        busy = pool.submit(httpx.post, f"{url}/v1/predict", content=images[0][1], timeout=60)
        assert gated.entered.wait(30)
        late = pool.submit(httpx.post, f"{url}/v1/predict?timeout=2", content=images[1][1], timeout=60)
        wait_for(lambda: metric(url, "resforge_queue_depth") == 1)
        time.sleep(2.1)  # it was queued, so its 2 s began before now: the deadline passes while it waits
        gated.gate.set()
        assert busy.result().status_code == 200
        answer = late.result()
        assert answer.status_code == 504 and "deadline" in answer.json()["error"]
        assert gated.calls == [1]  # the late image never reached the model


def test_a_failing_model_answers_500_in_json_and_the_server_goes_on(predictor, images):
    gated, app = gated_server(predictor, max_wait_ms=0)
    with running(app) as url:
        real = gated.runner
        gated.runner = lambda x: (_ for _ in ()).throw(RuntimeError("out of memory"))
        r = httpx.post(f"{url}/v1/predict", content=images[0][1])
        assert r.status_code == 500 and r.json()["error"] == "the model failed on this batch: out of memory"
        gated.runner = real
        assert httpx.post(f"{url}/v1/predict", content=images[0][1]).status_code == 200


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


def png(width, height, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_limits_and_bad_input_get_one_json_error_each(predictor, images):
    app = create_app(predictor, ServeOptions(max_bytes=200_000, max_images=2, max_pixels=1_000_000, max_wait_ms=0))
    good = images[0][1]
    bomb = png(4000, 4000, "1")  # 16 megapixels declared, a few kB sent
    assert len(bomb) < 200_000
    cases = [
        (dict(content=b"\0" * 300_000), 413, "over the limit of 200,000"),
        (dict(files=[("files", (f"{i}.jpg", good)) for i in range(3)]), 413, "3 images in one request"),
        (dict(content=bomb), 413, "pixels is over the limit of 1,000,000"),
        (dict(content=png(1, 2000)), 413, "1x2000 pixels is over the aspect-ratio limit of 20"),  # resized: 72 k
        (dict(content=b"hello, not an image"), 415, "not an image"),
        (dict(content=EPS), 415, "not an image in a format accepted here (JPEG, PNG, WEBP, BMP, TIFF, GIF)"),
        (dict(content=png(64, 64)[:60]), 400, "corrupt or truncated"),
        (dict(content=b""), 400, "no body"),
        (dict(content=b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
              headers={"content-type": "multipart/form-data; boundary=b"}), 400, "holds no file"),
    ]
    with running(app) as url:
        for kwargs, status, message in cases:
            r = httpx.post(f"{url}/v1/predict", **kwargs)
            assert r.status_code == status, (message, r.text)
            assert message in r.json()["error"] and "Traceback" not in r.text
        chunked = httpx.post(f"{url}/v1/predict", content=iter([b"\0" * 150_000] * 2))  # no content-length
        assert chunked.status_code == 413 and "over the limit" in chunked.json()["error"]
        # urllib (as requests) sends the whole body before it reads: it reads the 413, not a reset
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v1/predict", b"\0" * 20_000_000), timeout=60)
        assert refused.value.code == 413 and "over the limit" in json.loads(refused.value.read())["error"]
        for method, path, status in (("GET", "/v1/predict", 405), ("GET", "/nowhere", 404),
                                     ("POST", "/v1/predict?topk=0", 422), ("POST", "/v1/predict?topk=x", 422)):
            r = httpx.request(method, f"{url}{path}", content=good if method == "POST" else None)
            assert r.status_code == status and r.json()["error"], (path, r.text)
        assert httpx.post(f"{url}/v1/predict", content=good).status_code == 200  # still serving
        assert metric(url, "resforge_requests_total", route="/v1/predict", method="POST", status="413") == 6
        assert metric(url, "resforge_requests_total", route="/v1/predict", method="POST", status="200") == 1
        assert metric(url, "resforge_request_seconds_count", route="/v1/predict") >= 15
        assert metric(url, "resforge_request_seconds_count", route="/v1/predict", status="413") == 6


def test_an_api_key_guards_every_route_but_health(predictor, images):
    with pytest.raises(ConfigError, match="needs --api-key|give --api-key"):
        ServeOptions(host="0.0.0.0").check()
    ServeOptions(host="0.0.0.0", api_key="k").check()
    app = create_app(predictor, ServeOptions(api_key="s3cret"))
    key = {"x-api-key": "s3cret"}
    with running(app, key) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/", "/ready", "/v1/metadata", "/metrics", "/docs"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert httpx.post(f"{url}/v1/predict", content=images[0][1]).status_code == 401
        assert httpx.get(f"{url}/v1/metadata", headers={"x-api-key": "wrong"}).status_code == 401
        basic = base64.b64encode(b"anyone:s3cret").decode()
        for headers in (key, {"authorization": "Bearer s3cret"}, {"authorization": f"Basic {basic}"}):
            assert httpx.get(f"{url}/v1/metadata", headers=headers).status_code == 200
        assert httpx.post(f"{url}/v1/predict", content=images[0][1], headers=key).status_code == 200
        for i in range(30):  # made-up methods, without the key: they share one label value
            assert httpx.request(f"X{i}", f"{url}/v1/predict").status_code == 401
        requests = samples(url, "resforge_requests_total", key)
        assert {s.labels["method"] for s in requests} == {"GET", "POST", "other"}
        assert sum(s.value for s in requests if s.labels["method"] == "other") == 30


def test_a_browser_on_an_allowed_origin_can_call_a_server_with_a_key(predictor, images):
    app = create_app(predictor, ServeOptions(api_key="s3cret", cors=["http://app.example"]))
    with running(app, {"x-api-key": "s3cret"}) as url:
        preflight = {"origin": "http://app.example", "access-control-request-method": "POST",
                     "access-control-request-headers": "x-api-key"}
        allowed = httpx.options(f"{url}/v1/predict", headers=preflight)  # browsers send it without the key
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        other = httpx.options(f"{url}/v1/predict", headers={**preflight, "origin": "http://elsewhere.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        origin = {"origin": "http://app.example"}
        keyless = httpx.post(f"{url}/v1/predict", content=images[0][1], headers=origin)  # a 401 it can read
        assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == "http://app.example"
        answer = httpx.post(f"{url}/v1/predict", content=images[0][1], headers={**origin, "x-api-key": "s3cret"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"


def test_a_request_must_arrive_in_full_before_its_deadline(predictor):
    app = create_app(predictor, ServeOptions(timeout=1))  # and a connection 1 + GRACE_S seconds for its headers
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        body = socket.create_connection(("127.0.0.1", port), timeout=30)
        body.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
        head = socket.create_connection(("127.0.0.1", port), timeout=30)
        head.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # its headers never end
        answer = read_all(body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive in full before its deadline" in answer
        assert read_all(head) == b""  # closed, unanswered
        assert metric(url, "resforge_requests_total", route="/v1/predict", status="408") == 1


def test_connections_over_the_cap_are_answered_503_at_once(predictor):
    app = create_app(predictor, ServeOptions(max_connections=3))
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        for s in held:  # each one answered, and kept open
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        extra = socket.create_connection(("127.0.0.1", port), timeout=30)
        answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"its limit (--max-connections)" in answer
        for s in held:
            s.close()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)


def test_a_client_gone_mid_body_is_counted_499_in_one_line(predictor, caplog):
    with running(create_app(predictor, ServeOptions())) as url:
        caplog.set_level(logging.INFO)
        logging.getLogger("uvicorn").addHandler(caplog.handler)  # uvicorn's loggers do not propagate
        try:
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
            wait_for(lambda: metric(url, "resforge_arriving") == 1)
            s.close()
            wait_for(lambda: metric(url, "resforge_requests_total", route="/v1/predict", status="499") == 1)
        finally:
            logging.getLogger("uvicorn").removeHandler(caplog.handler)
    gone = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(gone) == 1 and not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text


def test_metadata_names_an_ensembles_members_and_shows_no_path(predictor, tmp_path):
    members = [{"source": str(tmp_path / "runs" / name / "best.safetensors"), "model": predictor.info.arch}
               for name in ("a", "b")]
    info = replace(predictor.info, arch={"name": "ensemble", "members": members, "weights": [0.5, 0.5]},
                   metrics={"top1": 0.9, "data": str(tmp_path / "data")})  # what `ensemble` records
    served = Predictor(predictor.runner, info, str(tmp_path / "ensemble.onnx"), predictor.model)
    with running(create_app(served, ServeOptions())) as url:
        text = httpx.get(f"{url}/v1/metadata").text
    assert str(tmp_path) not in text
    meta = json.loads(text)
    assert [m["source"] for m in meta["model"]["members"]] == ["a/best.safetensors", "b/best.safetensors"]
    assert meta["metrics"] == {"top1": 0.9} and meta["formats"] == ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]


def test_failed_accepts_are_logged_once_per_interval(caplog):
    from resforge.deploy.serve.connections import ACCEPT_LOG_S, AcceptErrors

    now = [0.0]
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(AcceptErrors(clock=lambda: now[0]))
    failure = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    try:
        for _ in range(500):  # asyncio retries once a second; a burst here, on a fake clock
            loop.call_exception_handler(failure)
            now[0] += ACCEPT_LOG_S / 1000
        now[0] = 2 * ACCEPT_LOG_S
        loop.call_exception_handler(failure)
        loop.call_exception_handler({"message": "something else"})  # asyncio's own handler, as before
    finally:
        loop.close()
    ours = [r.getMessage() for r in caplog.records if r.name == "resforge"]
    assert len(ours) == 2 and all("cannot accept connections: [Errno 24] Too many open files" in m for m in ours)
    assert "(1 time(s)" in ours[0] and "(500 time(s) since the last report)" in ours[1]
    assert any(r.name == "asyncio" and "something else" in r.getMessage() for r in caplog.records)


def start_cli(*args, preexec_fn=None):
    """`resforge serve ... --port 0` in a process of its own: (process, base URL, what it logged before)."""
    proc = subprocess.Popen([sys.executable, "-m", "resforge", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if m := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
            return proc, m.group(1), "".join(lines)
    proc.wait(30)
    raise AssertionError("the server never said where it listens:\n" + "".join(lines))


def test_sigterm_answers_the_queued_requests_then_exits_0(photo_run, images):
    run, _, _ = photo_run
    proc, url, _ = start_cli(str(run), "--backend", "torch", "--max-batch", "16", "--max-wait-ms", "3000")
    port = int(url.rsplit(":", 1)[1])
    try:
        wait_ready(url)
        # A request still sending its body: the batcher waits (up to max-wait-ms) for it to join the batch.
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 10)
        wait_for(lambda: metric(url, "resforge_arriving") == 1)
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(httpx.post, f"{url}/v1/predict", content=images[i][1], timeout=60)
                       for i in range(3)]
            wait_for(lambda: metric(url, "resforge_queue_depth") == 3)
            proc.send_signal(signal.SIGTERM)
            assert [f.result().status_code for f in pending] == [200, 200, 200]
        slow.close()
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_sigterm_answers_a_slow_client_in_json_and_ends_the_wait(photo_run):
    run, _, _ = photo_run
    low = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))  # ulimit -n 128
    proc, url, logged = start_cli(str(run), "--backend", "torch", "--timeout", "120", preexec_fn=low)
    try:
        wait_ready(url)
        cap = httpx.get(f"{url}/v1/metadata").json()["limits"].get("max_connections")
        slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60)
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 10)
        wait_for(lambda: metric(url, "resforge_arriving") == 1)
        proc.send_signal(signal.SIGTERM)  # the first: no new connection; the slow one has up to 120 s

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health")
            except httpx.TransportError:
                return True
            return False

        wait_for(refused)
        proc.send_signal(signal.SIGTERM)  # the second: no more waiting
        answer = read_all(slow)
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b'{"error": "the server is shutting down"}')
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # the descriptor limit caps connections below it (the default asks for 512)
    from resforge.deploy.serve.connections import ACCEPT_BACKLOG, FD_RESERVE

    assert cap is not None and cap <= 128 - FD_RESERVE - 3 * ACCEPT_BACKLOG
    assert f"at most {cap} connections at once" in logged


def test_cli_refuses_bad_input_with_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RESFORGE_API_KEY", raising=False)
    cases = [([str(tmp_path / "nowhere")], "nowhere"),
             ([str(tmp_path), "--host", "0.0.0.0"], "give --api-key"),
             ([str(tmp_path), "--max-batch", "0"], "--max-batch must be a positive"),
             ([str(tmp_path), "--max-images", "100"], "must not exceed --queue")]
    for args, message in cases:
        assert main(["serve", *args, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_cli_refuses_a_device_or_backend_it_lacks_before_it_says_it_serves(photo_run, capsys, caplog):
    import onnxruntime
    import torch

    run, _, _ = photo_run
    cases = [(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else []
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        cases.append((["--backend", "tensorrt"], "TensorRT is not available here"))
    caplog.set_level(logging.INFO, logger="resforge")
    for args, message in cases:
        assert main(["serve", str(run), *args, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not [r for r in caplog.records if r.getMessage().startswith("serving")], args


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is missing: `make test` installs it (as root)")
def test_the_page_shows_what_the_api_answers_in_a_real_browser(predictor, photo_run, tmp_path):
    _, _, test = photo_run
    files = scan_images([test])[:2]
    app = create_app(predictor, ServeOptions(max_wait_ms=1))
    with running(app) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_function("document.querySelector('#model').dataset.backend === 'torch'")
        assert predictor.classes[0] in page.text_content("#model")
        page.set_input_files("#files", files)
        page.wait_for_selector(".result:nth-child(2) .top li")
        for f in files:
            card = page.locator(f".result[data-file='{os.path.basename(f)}']")
            shown = card.locator(".top li").first.get_attribute("data-class")
            with open(f, "rb") as fh:
                api_top1 = httpx.post(f"{url}/v1/predict", content=fh.read()).json()["predictions"][0]["top"][0]
            assert shown == api_top1["class"]
            assert card.locator(".top li").count() == min(5, len(predictor.classes))
            assert f"{100 * api_top1['prob']:.1f}%" in card.locator(".top li").first.text_content()
        assert page.text_content("#error") == ""
