"""Detectors over resforge's ResNets: torchvision's Faster R-CNN, Mask R-CNN, RetinaNet and FCOS, whose RPN,
ROI heads, anchors, losses and NMS are used as they are; only the backbone is ours.

The backbone is any registry ResNet (depths 18-152, `-d`, wide, ResNeXt, any width), its C2-C5 maps fed to
torchvision's feature pyramid exactly as torchvision's `*_resnet50_fpn` builders wire theirs, so their
checkpoints load key for key and the outputs match. Each detector is a subclass of torchvision's class
that records how it was built (`spec()`), so a saved detector is rebuilt from its sidecar like a
classifier. Labels are 1..K for K classes; 0 is the background, as in torchvision.

Under bf16 autocast, torchvision makes its anchors in the feature maps' dtype and decodes boxes in the heads'
output dtype: bf16's 8-bit mantissa places a coordinate between 256 and 512 px on a 2-px grid, which ruins
localisation in training and at inference. So the pyramid's maps and the heads' outputs are cast to float32
(`_float_outputs`): the convolutions and fully connected layers still run in bf16, anchors, box coding, losses
and post-processing in float32.
"""

from __future__ import annotations

import copy
import math
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.models.detection import fcos, faster_rcnn, mask_rcnn, retinanet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.poolers import initLevelMapper

from ..errors import ConfigError
from ..options import convert, option
from .resnet import ResNet

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
HEADS = ("v1", "v2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectorSpec:
    """A detector's options beside its backbone's (`ModelSpec`)."""

    heads: str = option("v1", "torchvision's heads: v1 (the paper's), or v2 (batch-norm FPN, a deeper RPN head and a "
                              "4-conv box head: fasterrcnn and maskrcnn)", choices=HEADS)
    fpn_channels: int = option(256, "channels of every pyramid level", gt=0)
    frozen_bn: bool = option(False, "fix the backbone's batch-norm statistics and scales (suits a pretrained "
                                    "backbone; from scratch, train them)")
    anchor_sizes: list[float] | None = option(None, "one anchor size (px) per pyramid level, 5 levels (default: "
                                                    "torchvision's, 32-512; 8-128 for fcos)", nargs=5,
                                            metavar="PX")
    rois: int = option(512, "fasterrcnn, maskrcnn: proposals sampled per image to train the box head", gt=0)
    box_width: int = option(1024, "fasterrcnn, maskrcnn: width of the box head's fully connected layers", gt=0)
    mask_width: int = option(256, "maskrcnn: channels of the mask head's convolutions", gt=0)


def checked_spec(**options: Any) -> DetectorSpec:
    """The detector options of these keywords, converted and checked (a ConfigError names the option)."""
    spec = DetectorSpec(**options)
    hints = typing.get_type_hints(DetectorSpec)
    for f in dataclasses.fields(spec):
        setattr(spec, f.name, convert(f.name, hints[f.name], getattr(spec, f.name), f.metadata,
                                      f.metadata.get("choices")))
    if spec.anchor_sizes is not None and (len(spec.anchor_sizes) != 5 or min(spec.anchor_sizes) <= 0):
        raise ConfigError(f"anchor_sizes takes 5 positive sizes (one per pyramid level), not {spec.anchor_sizes}")
    return spec


CHOICES = {f.name: f.metadata["choices"] for f in dataclasses.fields(DetectorSpec) if "choices" in f.metadata}


def _frozen(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen(child)
    return module


def _pyramid(body: ResNet, levels: Sequence[int], extra: nn.Module, channels: int,
             norm: type[nn.Module] | None) -> BackboneWithFPN:
    """torchvision's FPN over the backbone's stages `levels` (1-4), as `_resnet_fpn_extractor` wires it."""
    names = [body.feature_info[i - 1]["name"] for i in levels]
    pyramid = BackboneWithFPN(body, {name: str(k) for k, name in enumerate(names)},
                              [body.feature_info[i - 1]["channels"] for i in levels], channels, extra, norm)
    pyramid.__dict__["resnet"] = body  # the body holds its stages, not the ResNet itself
    return pyramid


class Detector:
    """What resforge asks of a detector, mixed into torchvision's classes: `spec()` rebuilds it, `parts()` names
    the backbone's stages and the rest (the pyramid and the heads) as the head."""

    detector: ClassVar[str]
    backbone: BackboneWithFPN

    def __init__(self, *, num_classes: int, backbone: str = "resnet50", backbone_options: dict[str, Any] | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 min_size: int = 800, max_size: int = 1333, **options: Any):
        """`num_classes` counts the background; `backbone` is a registry name built with `backbone_options`
        (`ModelSpec`'s, or a pruned network's widths); images are normalised by `image_mean`/`image_std` and
        resized to a shorter side of `min_size` (a longer one of at most `max_size`) inside; `options` are
        `DetectorSpec`'s."""
        pyramid, kw, spec = _setup(self.detector, num_classes, backbone, backbone_options, image_mean, image_std,
                                   min_size, max_size, options)
        super().__init__(pyramid, **kw)  # torchvision's class, next in the order
        self._spec, self.model_name, self.transforms = spec, self.detector, []
        # the ResNet whose stages the pyramid's body holds (the same modules, not registered twice): it reads
        # the widths pruning leaves and counts the backbone's MACs
        self.__dict__["resnet"] = pyramid.resnet
        if isinstance(self, faster_rcnn.FasterRCNN):  # Mask R-CNN too
            strides = [info["reduction"] for info in pyramid.resnet.feature_info]
            for pool in (self.roi_heads.box_roi_pool, self.roi_heads.mask_roi_pool):
                if pool is not None:
                    _fixed_scales(pool, strides)
        self.pretrained_cfg: dict[str, Any] = {}  # where starting weights came from, as create_model records it
        for module in self.box_sources():
            module.register_forward_hook(_float_outputs)

    def box_sources(self) -> list[nn.Module]:
        """The modules whose outputs become anchors, box deltas, scores and masks: the pyramid and the heads'
        last layers."""
        if isinstance(self, faster_rcnn.FasterRCNN):  # Mask R-CNN too
            heads = self.roi_heads
            return [self.backbone, self.rpn.head, heads.box_predictor] + (
                [heads.mask_predictor] if heads.has_mask() else [])
        return [self.backbone, self.head]

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        self.resnet.training = mode  # its modules are the body's; its own flag follows, as if it were a child
        return self

    def spec(self) -> dict[str, Any]:
        options = self.resnet.spec()
        options.pop("num_classes")
        return {**self._spec, "backbone_options": options}

    @property
    def num_classes(self) -> int:
        """Object classes, the background not counted."""
        return self._spec["num_classes"] - 1

    @property
    def body(self) -> nn.Module:
        return self.backbone.body

    @property
    def stem_conv(self) -> nn.Conv2d:
        """The first convolution: the one whose input channels follow the backbone's `in_chans`."""
        return next(m for m in self.body.modules() if isinstance(m, nn.Conv2d))

    def class_layers(self) -> list[nn.Module]:
        """The layers whose shapes follow the class count: fresh when weights for other classes are loaded."""
        if isinstance(self, faster_rcnn.FasterRCNN):  # Mask R-CNN too
            heads = self.roi_heads
            return [heads.box_predictor] + ([heads.mask_predictor.mask_fcn_logits] if heads.has_mask() else [])
        return [self.head.classification_head.cls_logits]

    def parts(self) -> dict[str, list[nn.Module]]:
        body = self.body
        stages = {name: [m] for name, m in body.named_children() if name.startswith("layer")}
        stem = [m for name, m in body.named_children() if name not in stages]
        head = [m for name, m in self.named_children() if name != "backbone"] + [self.backbone.fpn]
        return {"stem": stem, **stages, "head": head}


def _fixed_scales(pool: MultiScaleRoIAlign, strides: list[int]) -> None:
    """The pooler's level scales set from the backbone's strides. torchvision infers them from the first batch it
    sees, as 2^round(log2(feature height / image height)) with the padded feature against the unpadded image,
    and keeps them: a first tiny, elongated image (34 px tall, padded to 64) sets 1/2 where the stride says 1/4,
    for every later image and in an exported graph. These are what it infers for ordinary images."""
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


def _float_outputs(module: nn.Module, inputs: Any, output: Any) -> Any:
    """A forward hook: `output` with its reduced-precision tensors (in dicts, lists, tuples) cast to float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() and output.dtype != torch.float32 else output
    if isinstance(output, dict):
        return type(output)((k, _float_outputs(module, inputs, v)) for k, v in output.items())
    if isinstance(output, (list, tuple)):
        return type(output)(_float_outputs(module, inputs, v) for v in output)
    return output


def _rcnn_parts(body: ResNet, s: DetectorSpec, masks: bool, num_classes: int
                ) -> tuple[BackboneWithFPN, dict[str, Any]]:
    """The pyramid over C2-C5 and the keyword arguments of torchvision's (Mask) R-CNN, for heads v1 or v2: its
    heads built here as its constructors build them, at the spec's widths (torchvision's by default)."""
    v2, c = s.heads == "v2", s.fpn_channels
    pyramid = _pyramid(body, (1, 2, 3, 4), LastLevelMaxPool(), c, nn.BatchNorm2d if v2 else None)
    sizes = s.anchor_sizes or (32, 64, 128, 256, 512)
    anchors = AnchorGenerator(tuple((a,) for a in sizes), ((0.5, 1.0, 2.0),) * 5)
    kw: dict[str, Any] = {"rpn_anchor_generator": anchors, "box_batch_size_per_image": s.rois,
                          "box_predictor": faster_rcnn.FastRCNNPredictor(s.box_width, num_classes)}
    norm = {"norm_layer": nn.BatchNorm2d} if v2 else {}
    if v2:
        kw["rpn_head"] = faster_rcnn.RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2)
        kw["box_head"] = faster_rcnn.FastRCNNConvFCHead((c, 7, 7), [256] * 4, [s.box_width], **norm)
    else:
        kw["box_head"] = faster_rcnn.TwoMLPHead(c * 7 * 7, s.box_width)
    if masks:
        kw["mask_head"] = mask_rcnn.MaskRCNNHeads(c, [s.mask_width] * 4, 1, **norm)
        kw["mask_predictor"] = mask_rcnn.MaskRCNNPredictor(s.mask_width, s.mask_width, num_classes)
    return pyramid, kw


def _one_stage_parts(body: ResNet, s: DetectorSpec, kind: str) -> tuple[BackboneWithFPN, dict[str, Any]]:
    """The pyramid over C3-C5 with P6-P7 from P5, and the anchors of RetinaNet or FCOS."""
    if s.heads != "v1":
        raise ConfigError(f"{kind} has torchvision's v1 heads only (heads v2: fasterrcnn, maskrcnn)")
    pyramid = _pyramid(body, (2, 3, 4), LastLevelP6P7(s.fpn_channels, s.fpn_channels), s.fpn_channels, None)
    if kind == "fcos":  # one anchor a location: the size that places a box on its level
        if s.fpn_channels % 32:
            raise ConfigError(f"fcos's heads normalise in 32 groups: fpn_channels must be a multiple of 32, not "
                              f"{s.fpn_channels}")
        sizes = tuple((a,) for a in (s.anchor_sizes or (8, 16, 32, 64, 128)))
        return pyramid, {"anchor_generator": AnchorGenerator(sizes, ((1.0,),) * 5)}
    sizes = tuple((a, a * 2 ** (1 / 3), a * 2 ** (2 / 3)) for a in s.anchor_sizes) if s.anchor_sizes else \
        tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
    return pyramid, {"anchor_generator": AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)}


def _setup(kind: str, num_classes: int, backbone: str, backbone_options: dict[str, Any] | None,
           image_mean: Sequence[float], image_std: Sequence[float], min_size: int, max_size: int,
           options: dict[str, Any]) -> tuple[BackboneWithFPN, dict[str, Any], dict[str, Any]]:
    """(pyramid, torchvision's keyword arguments, the spec that rebuilds it) of one detector."""
    if num_classes < 2:
        raise ConfigError(f"a detector needs at least one object class besides the background (num_classes "
                          f"{num_classes} counts the background)")
    if not 0 < min_size <= max_size:
        raise ConfigError(f"a detector resizes images to a shorter side of min_size and a longer one of at most "
                          f"max_size: {min_size} and {max_size} do not fit")
    s = checked_spec(**options)
    from .registry import headless_resnet  # the registry registers the detectors: imported here

    body = headless_resnet(backbone, dict(backbone_options or {}), "a detector")
    if s.frozen_bn:
        body = _frozen(body)
    if kind in ("fasterrcnn", "maskrcnn"):
        pyramid, kw = _rcnn_parts(body, s, kind == "maskrcnn", num_classes)
    else:
        pyramid, kw = _one_stage_parts(body, s, kind)
        kw["num_classes"] = num_classes
    kw.update(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std))
    spec = {"num_classes": num_classes, "backbone": backbone, "image_mean": list(image_mean),
            "image_std": list(image_std), "min_size": min_size, "max_size": max_size, **dataclasses.asdict(s)}
    return pyramid, kw, spec


class FasterRCNN(Detector, faster_rcnn.FasterRCNN):
    detector = "fasterrcnn"


class MaskRCNN(Detector, mask_rcnn.MaskRCNN):
    detector = "maskrcnn"


class RetinaNet(Detector, retinanet.RetinaNet):
    detector = "retinanet"


class FCOS(Detector, fcos.FCOS):
    detector = "fcos"


DETECTOR_CLASSES: dict[str, type[nn.Module]] = {c.detector: c for c in (FasterRCNN, MaskRCNN, RetinaNet, FCOS)}


class _ExactResize(GeneralizedRCNNTransform):
    """torchvision's transform whose resize, when traced, sizes the image as eager PyTorch does: the short side
    times min_size / short side, floored in float64. Traced, torchvision hands ONNX's Resize a float32 scale,
    and float32's 200 * (106 / 200) floors to 105: a side a pixel short for many sizes, enough to move every box
    of a weakly trained detector. OpenVINO's CPU plugin runs float64 as float32, so there some sizes (49 px
    against a min_size of 64) still come out a pixel short; the export's parity gate sees it on the run's own
    images."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training or target is not None or self.fixed_size is not None:
            return super().resize(image, target)
        side = torch.onnx.operators.shape_as_tensor(image)[-2:].to(torch.float64)
        ends = torch.cat([side.amin(0, keepdim=True), side.amax(0, keepdim=True)])
        scale = (side.new_tensor([self.min_size[-1], self.max_size]) / ends).amin(0, keepdim=True)
        size = torch.floor(side * scale).to(torch.int64)
        resized = nn.functional.interpolate(image[None], size=(size[0], size[1]), mode="bilinear",
                                            align_corners=False)
        return resized[0], None


class DetectorGraph(nn.Module):
    """A detector as exporters take it: one float C x H x W image (0-1, any size) in; its boxes (x1, y1, x2, y2 in
    the image's pixels), labels (1..K), scores and, for Mask R-CNN, masks (N x 1 x H x W probabilities) out. The
    resize, the normalisation, NMS and the masks' pasting are the detector's own, inside the graph (the resize's
    sizes computed as in eager mode: `_ExactResize`). The graph shares `detector`'s modules (its transform
    aside): put in evaluation mode, so are they."""

    def __init__(self, detector: Detector):
        super().__init__()
        t = detector.transform
        self.detector = copy.copy(detector)
        self.detector._modules = dict(detector._modules, transform=_ExactResize(
            t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size))
        self.outputs = ["boxes", "labels", "scores"] + (["masks"] if isinstance(detector, MaskRCNN) else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = self.detector([image])[0]
        return tuple(found[k] for k in self.outputs)
