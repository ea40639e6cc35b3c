"""The peers `serve_load.py` measures resforge serve against, each serving the same Predictor:

  - litserve: LitServe's documented dynamic batching (`max_batch_size`, `batch_timeout`), one worker;
  - fastapi: a plain FastAPI endpoint that predicts each request on its own (no batching), in
    FastAPI's thread pool.

Both take the image as a multipart file field `files` (what LitServe decodes), as `POST /v1/predict`
does, and answer the top-5.

    python benchmarks/serve_peers.py litserve|fastapi MODEL PORT BACKEND [--max-batch 16] [--max-wait-ms 5]
"""


import argparse

import litserve as ls
import torch
import uvicorn

from resforge.runtime.predictor import Predictor


def top5(predictor: Predictor, probs) -> dict:
    top = probs.topk(min(5, len(predictor.classes)))
    return {"top": [{"class": predictor.classes[c], "prob": p} for p, c in zip(top.values.tolist(),
                                                                                top.indices.tolist())]}


def plain_fastapi(predictor: Predictor, port: int) -> None:
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        data = await (await request.form())["files"].read()

        def infer() -> dict:
            return top5(predictor, predictor(predictor.prepare(data)[None]).softmax(-1)[0])
        return await run_in_threadpool(infer)

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class Classifier(ls.LitAPI):
    """The Predictor as a LitAPI with batching (module level: LitServe pickles it into its worker process)."""

    def __init__(self, model: str, backend: str, max_batch: int, max_wait_ms: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=max_wait_ms / 1000, api_path="/v1/predict")
        self.model, self.backend, self.max_batch = model, backend, max_batch

    def setup(self, device: str) -> None:
        self.predictor = Predictor.load(self.model, self.backend, batch_size=self.max_batch)

    def decode_request(self, request) -> torch.Tensor:  # noqa: ANN001 - unannotated: LitServe passes the form
        return self.predictor.prepare(request["files"].file.read())

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x).softmax(-1)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict:
        return top5(self.predictor, probs)


def litserve(model: str, backend: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    server = ls.LitServer(Classifier(model, backend, max_batch, max_wait_ms), accelerator="cpu",
                          workers_per_device=1, healthcheck_path="/ready")
    server.run(port=port, host="127.0.0.1", log_level="warning", generate_client_file=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=["litserve", "fastapi"])
    ap.add_argument("model")
    ap.add_argument("port", type=int)
    ap.add_argument("backend")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    if args.peer == "fastapi":
        plain_fastapi(Predictor.load(args.model, args.backend), args.port)
    else:
        litserve(args.model, args.backend, args.port, args.max_batch, args.max_wait_ms)


if __name__ == "__main__":
    main()
