"""The model record's format: one versioned JSON object, read and written here for every file that carries it.

A saved model's sidecar is the record plus the name and id of its weights file; an exported model
carries the same record (ONNX `metadata_props`, OpenVINO rt_info, a torch.export program's extra
file). Its fields: `classes`, `preprocess` (`data.transforms.Preprocess`, with what it always does
spelled out for readers other than resforge), `input` (a normalised float NCHW tensor, or uint8
NHWC pixels when the preprocessing is inside the graph), `formats` (the image formats it decodes),
`arch` (what rebuilds the network: registry name, spec and transforms), `metrics`, `trained` (where
it came from) and `export`. `runtime.record.ModelInfo` is its typed form.

Older files still load: records of version 1 (exported files, which named the architecture
"model") and the sidecars of the format before this one ("resforge-model", versions 1 and 2).
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError

SCHEMA = "resforge.model"
VERSION = 2  # 2: the sidecar's format too, the architecture under "arch" (1: "model")
OLD_SIDECAR = "resforge-model"  # the sidecar's format before, read up to its version 2
OLD_SIDECAR_VERSION = 2
IMPLIED = {"resize": "shorter_side", "crop": "center", "antialias": True, "scale": 1 / 255}  # what resforge always does


def write(fields: dict[str, Any]) -> dict[str, Any]:
    """The record of `fields` as it is written: schema and version first, the preprocessing spelled out,
    and the input a float tensor of the preprocessed size unless `fields` says it takes pixels."""
    out = {"schema": SCHEMA, "version": VERSION, **{k: v for k, v in fields.items() if k not in ("schema", "version")}}
    pre, given = fields.get("preprocess"), fields.get("input")
    if isinstance(pre, dict) and {"img_size", "in_chans"} <= pre.keys():
        chans, size = pre["in_chans"], pre["img_size"]
        out["preprocess"] = {**pre, **IMPLIED, "channel_order": "RGB" if chans == 3 else "L"}
        if not (isinstance(given, dict) and given.get("kind") == "pixels"):
            out["input"] = {"kind": "tensor", "dtype": "float32", "layout": "NCHW", "size": [chans, size, size]}
    return out


def read(d: Any, source: str) -> dict[str, Any]:
    """A record of any version (or an older sidecar) in the layout `write` gives; CheckpointError names what is
    wrong with it. The preprocessing is checked where it is used (`Preprocess.from_dict`)."""
    if isinstance(d, dict) and d.get("format") == OLD_SIDECAR:
        if not isinstance(d.get("version"), int) or d["version"] > OLD_SIDECAR_VERSION:
            raise CheckpointError(f"{source} is version {d.get('version')} of the sidecar; this resforge reads up "
                                  f"to {OLD_SIDECAR_VERSION}: update resforge")
        d = {"schema": SCHEMA, "version": VERSION, **{k: v for k, v in d.items() if k not in ("format", "version")}}
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise CheckpointError(f"{source}: its metadata is not a resforge model record")
    if not isinstance(d.get("version"), int) or d["version"] > VERSION:
        raise CheckpointError(f"{source} was written by a newer resforge (model record version "
                              f"{d.get('version')!r}; this one reads up to {VERSION}): upgrade resforge")
    if d["version"] == 1:
        d = {**{k: v for k, v in d.items() if k != "model"}, "version": VERSION, "arch": d.get("model")}
    if not (d.get("arch") is None or isinstance(d["arch"], dict)):
        raise CheckpointError(f"{source}: its model record has an unknown model entry")
    return d
