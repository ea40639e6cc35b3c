"""The `resforge` command line: argument parsing only; every command calls the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import ResforgeError

log = logging.getLogger("resforge")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .models.resnet import ACTIVATIONS, NORMS, VARIANTS

    g = p.add_argument_group("model options")
    g.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    g.add_argument("--in-chans", type=int, default=3, help="input channels, 1 for grayscale (default: 3)")
    g.add_argument("--variant", choices=VARIANTS, default=None,
                   help="v1.5: stride on the 3x3 (default); v1: stride on the first 1x1 (paper, Keras); "
                        "d: deep stem + avg-pool shortcut")
    g.add_argument("--small-input", action="store_true", help="3x3 stride-1 stem, no max-pool (images <= 64 px)")
    g.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default: 1.0)")
    g.add_argument("--act", choices=list(ACTIVATIONS), default="relu", help="activation (default: relu)")
    g.add_argument("--norm", choices=NORMS, default="batchnorm", help="normalisation (default: batchnorm)")
    g.add_argument("--se", action="store_true", help="squeeze-and-excitation in every block")
    g.add_argument("--pretrained", metavar="PATH_OR_URL",
                   help="weights: torchvision/timm .pth, safetensors or Keras .h5, local or http(s)")


def _model_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(num_classes=args.num_classes, in_chans=args.in_chans, small_input=args.small_input,
              width=args.width, act=args.act, norm=args.norm, se=args.se, pretrained=args.pretrained)
    if args.variant:
        kw["variant"] = args.variant
    return kw


def cmd_models(args: argparse.Namespace) -> None:
    from .models import describe_model, list_models

    for name in list_models():
        print(f"{name:<18} {describe_model(name)}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .models import create_model, summarize

    kwargs = _model_kwargs(args)
    if kwargs["pretrained"] is None:  # nothing to load: count on the meta device, instantly
        with torch.device("meta"):
            model = create_model(args.model, **kwargs)
    else:
        model = create_model(args.model, **kwargs)
    print(summarize(model, args.img_size, args.model).table())


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="resforge",
        description="Train, evaluate, compress, export and serve ResNet image classifiers.",
        epilog="Run 'resforge COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"resforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        return p

    add("models", cmd_models, "list the model names create_model and --model accept")

    p = add("info", cmd_info, "parameters, MACs and per-stage output shapes of a model",
            "Count a model's parameters and multiply-accumulates at an input size, stage by stage. "
            "Counted on the model itself (torch's FlopCounterMode), not looked up.")
    p.add_argument("model", help="model name (see 'resforge models')")
    p.add_argument("--img-size", type=int, default=224, help="square input size in pixels (default: 224)")
    _model_options(p)

    add("demo", cmd_demo, "run the main job on the bundled Fashion-MNIST sample")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except ResforgeError as e:
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resforge: interrupted", file=sys.stderr)
        return 130
    return 0
