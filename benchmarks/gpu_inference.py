"""Inference on a CUDA GPU through `bench`'s own measurement, side by side in one run.

ResNet-50 at 224 px (1000 classes, random weights: speed does not depend on them) on the torch backend:
bf16 and fp16 eager, bf16 compiled (static shapes), bf16 replayed from CUDA graphs, and compiled + CUDA
graphs; onnxruntime's CUDA provider where the installed build has it. Batches already on the GPU, as
`bench --device cuda` times them; latency percentiles at batch 1, throughput at each batch size.
Goals: >= 20,000 img/s at batch 256 compiled; <= 0.6 ms at batch 1 with CUDA graphs.

    python benchmarks/gpu_inference.py [--batch-sizes 1,256] [--duration 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import resforge
from resforge.data.transforms import imagenet_stats, make_preprocess
from resforge.deploy.bench import measure, settings_line, table
from resforge.models import save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,256")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds of timed calls per figure")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = resforge.create_model("resnet50", num_classes=1000)
        pre = make_preprocess(224, 0.875, 3, "bilinear", *imagenet_stats(3))
        path = save_model(model, Path(tmp) / "resnet50.safetensors",
                          {"classes": [f"class{i}" for i in range(1000)], "preprocess": pre.to_dict()})
        variants = [("bf16", False, False), ("fp16", False, False), ("bf16", True, False), ("bf16", False, True),
                    ("bf16", True, True)]
        rows = []
        for precision, compile, graph in variants:
            rows.append(measure(str(path), "torch", precision, sizes, duration=args.duration, warmup=args.warmup,
                                device="cuda", compile=compile, cuda_graph=graph))
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            rows.append(measure(str(path), "onnxruntime", "auto", sizes, duration=args.duration, warmup=args.warmup,
                                device="cuda"))
            ort_note = ""
        else:
            ort_note = (f"onnxruntime {onnxruntime.__version__} here has no CUDA provider "
                        f"({', '.join(onnxruntime.get_available_providers())}): no onnxruntime row.")
    print(f"\n### {torch.cuda.get_device_name()}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
          "ResNet-50 at 224 px\n")
    print(table(rows, sizes))
    print("\n" + settings_line(rows, args.duration, args.warmup).replace("; each model and backend in a process of "
                                                                          "its own", "; all in one process"))
    if ort_note:
        print("\n" + ort_note)


if __name__ == "__main__":
    main()
