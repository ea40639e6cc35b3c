"""`resforge monitor`: a folder of new images judged against a classifier's profile, offline, as the server judges
its stream (`runtime.drift.Monitor`, the folder as one window); or, for a run trained before profiles existed, its
profile made from its recorded validation split.

The comparison is written as `report.md` with its figures, a self-contained `report.html` (the figures and the
strangest images inlined) and `images.csv` (each image's statistics, top class and out-of-distribution score).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..data.folder import scan_images, thumbnail
from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_path, write_csv, write_text
from ..models.weights import resolve_model_path, update_sidecar
from ..report import markdown_table
from ..runtime.drift import MIN_IMAGES, SIGNAL_HELP, Monitor, Signal
from ..runtime.predictor import Predictor
from ..runtime.profile import MIN_PROFILE, STAT_HELP, STATS, Profile, profile_model
from ..runtime.source import open_source

log = logging.getLogger("resforge")

STRANGEST = 16  # images shown in the report


@dataclass
class MonitorReport:
    """A folder against a model's profile: the signals, the alarms and each image's score."""

    model: str
    folder: str
    images: list[str]
    scores: np.ndarray
    flagged: np.ndarray
    signals: list[Signal]
    skipped: dict[str, str]
    out: Path

    @property
    def alarms(self) -> list[Signal]:
        return [s for s in self.signals if s.alarm]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "folder": self.folder, "images": len(self.images),
                "ood_flagged": int(self.flagged.sum()), "alarms": [s.describe() for s in self.alarms],
                "signals": [{"name": s.name, "value": s.value, "threshold": s.threshold, "alarm": s.alarm}
                            for s in self.signals], "skipped": len(self.skipped), "report": str(self.out / "report.md")}


def make_profile(source: str | os.PathLike, data: str | os.PathLike, batch_size: int = 32, device: str = "auto"
                 ) -> Profile:
    """The profile of a saved classifier on its recorded validation split, read from `data` (the folder it was
    trained on, wherever it is now), written into its record."""
    src = open_source(source)
    if src.kind != "torch" or src.info.task != "classify":
        raise ConfigError(f"{source}: a profile is made for a classifier's run or .safetensors (export it after)")
    info = replace(src.info, trained={**src.info.trained, "data": str(data)})
    samples = info.recorded_samples(src.path, "val")
    if len(samples) < MIN_PROFILE:
        raise DataError(f"{source}'s recorded validation split has {len(samples)} image(s) in {data}; a profile needs "
                        f"{MIN_PROFILE}: give the folder the run was trained on")
    predictor = Predictor.load(source, "torch", device, "fp32", batch_size=batch_size)
    profile = profile_model(predictor, [p for p, _ in samples], batch_size)
    update_sidecar(resolve_model_path(source), profile=profile.to_dict())
    return profile


def monitor_folder(source: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike | None = None, *,
                   backend: str = "auto", device: str = "auto", precision: str = "auto", batch_size: int = 32,
                   metadata: dict[str, Any] | None = None) -> MonitorReport:
    """The images of `folder` against the profile of the model at `source`, as one window."""
    predictor = Predictor.load(source, backend, device, precision, batch_size=batch_size, metadata=metadata)
    if predictor.profile is None:
        raise CheckpointError(f"{source} has no monitoring profile (a run trained before profiles, or a file "
                              "exported from one): make it with resforge monitor RUN --profile DATA, then export "
                              "again")
    files = scan_images([folder])
    idx, stats, logits, errors = predictor.observe(files, batch_size, names=files)
    if not idx:
        raise DataError(f"none of the {len(files)} image(s) in {folder} could be read")
    if len(idx) < MIN_IMAGES:
        raise DataError(f"{folder} has {len(idx)} readable image(s); drift is judged on {MIN_IMAGES} or more (predict "
                        "gives each image's out-of-distribution score)")
    mon = Monitor(predictor.profile, predictor.classes, size=len(idx))
    verdicts = mon.observe(stats, logits)
    report = MonitorReport(str(source), str(folder), [files[i] for i in idx],
                           np.array([np.nan if v["score"] is None else v["score"] for v in verdicts], dtype=float),
                           np.array([v["flagged"] for v in verdicts]),
                           mon.signals(), {files[i]: e for i, e in errors.items()},
                           Path(out) if out else _default_out(source, folder))
    _write(report, mon, predictor, stats, logits.numpy())
    return report


def _default_out(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    p = Path(source)
    base = p if p.is_dir() else p.parent
    return base / f"monitor-{Path(folder).resolve().name}"


# -- the report -------------------------------------------------------------------------------------------
def _figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _distributions(mon: Monitor) -> bytes:
    dist, signals = mon.distributions(), {s.name: s for s in mon.signals()}
    panels = [*STATS, "confidence", "classes"]
    fig = Figure(figsize=(12, 7.5))
    for k, name in enumerate(panels):
        ax = fig.add_subplot(3, 3, k + 1)
        d = dist[name]
        labels = d["names"] if name == "classes" else _bin_labels(d["edges"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, d["profile"], 0.4, label="profile (validation)", color="#9aa5b8")
        ax.bar(x + 0.2, d["window"], 0.4, label="these images", color="#2f6fdb")
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
        s = signals.get("classes" if name == "classes" else name)
        alarm = " ALARM" if s is not None and s.alarm else ""
        ax.set_title(f"{name}" + (f": {s.value:.3g} (threshold {s.threshold:.3g}){alarm}" if s else ""),
                     fontsize=8, color="#b00020" if alarm else "black")
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def _bin_labels(edges: list[float]) -> list[str]:
    """Each bin's range; the lowest holds what lies under the validation range, the highest what lies over it."""
    inner = [f"{b:.3g}" if np.isclose(a, b) else f"{a:.3g}-{b:.3g}" for a, b in zip(edges, edges[1:])]
    return ["under"] + inner + ["over"]


def _scores(report: MonitorReport, profile: Profile, score: str) -> bytes:
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    ref = profile.ood[score]["quantiles"]
    ax.hist(report.scores[np.isfinite(report.scores)], bins=40, color="#2f6fdb", alpha=0.8, label="these images")
    ax.axvline(profile.ood[score]["threshold"], color="#b00020",
               label=f"threshold ({profile.ood['rate']:.0%} of validation over it)")
    ax.axvspan(ref[1], ref[-2], color="#9aa5b8", alpha=0.3, label="validation, 5th-95th percentile")
    ax.set_xlabel(f"{score} score (higher: less like the training data)")
    ax.legend(fontsize=7)
    return _figure_png(fig)


def _strangest(report: MonitorReport, predictor: Predictor) -> list[tuple[str, float, bytes]]:
    from PIL import Image

    out = []
    for i in np.argsort(-report.scores)[:STRANGEST]:
        buffer = io.BytesIO()
        Image.fromarray(thumbnail(report.images[i], predictor.info.pre.mode)).save(buffer, format="PNG")
        out.append((report.images[i], float(report.scores[i]), buffer.getvalue()))
    return out


def _write(report: MonitorReport, mon: Monitor, predictor: Predictor, stats: np.ndarray, logits: np.ndarray) -> None:
    out, profile = report.out, mon.profile
    (out / "plots").mkdir(parents=True, exist_ok=True)
    figures = {"drift.png": _distributions(mon), "ood.png": _scores(report, profile, mon.score)}
    for name, png in figures.items():
        with atomic_path(out / "plots" / name) as tmp:
            tmp.write_bytes(png)
    strange = _strangest(report, predictor)
    top = logits.argmax(1)
    write_csv(out / "images.csv", ["path", "top", "ood_score", "flagged", *STATS],
              ([path, predictor.classes[top[i]], f"{report.scores[i]:.4f}", int(report.flagged[i]),
                *(f"{v:.4f}" for v in stats[i])] for i, path in enumerate(report.images)))
    rows = [[s.name, f"{s.value:.4g}", f"{s.threshold:.4g}", "**alarm**" if s.alarm else "",
             STAT_HELP.get(s.name) or SIGNAL_HELP[s.name]] for s in report.signals]
    head = [f"# {Path(report.folder).name} against the profile of {Path(report.model).name}", "",
            f"{len(report.images)} images ({len(report.skipped)} unreadable) against {profile.images} validation "
            f"images; {int(report.flagged.sum())} ({report.flagged.mean():.1%}) scored out of distribution by "
            f"{mon.score} (the profile flags {profile.ood['rate']:.0%} of its own); each signal's threshold keeps "
            f"false alarms under {mon.false_alarm:.0%} for a folder of unchanged images.", "",
            ("**Alarms:** " + "; ".join(s.describe() for s in report.alarms)) if report.alarms else "No alarm.", ""]
    table = markdown_table(["signal", "value", "threshold", "", "what"], rows)
    write_text(out / "report.md", "\n".join(head + [table, "", "![distributions](plots/drift.png)", "",
                                                    "![scores](plots/ood.png)", "",
                                                    "The strangest images are in `report.html`; every image's "
                                                    "score in `images.csv`.", ""]))
    inline = {k: base64.b64encode(v).decode() for k, v in figures.items()}
    cells = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt=""><figcaption>'
                    f'{html.escape(Path(path).name)}<br>{score:.2f}</figcaption></figure>'
                    for path, score, png in strange)
    body = "".join(f"<p>{html.escape(line.replace('**', ''))}</p>" for line in head if line and not
                   line.startswith("#"))
    table_html = "".join(f"<tr{' class=alarm' if s.alarm else ''}><td>{s.name}</td><td>{s.value:.4g}</td>"
                         f"<td>{s.threshold:.4g}</td></tr>" for s in report.signals)
    write_text(out / "report.html", f"""<!doctype html><html lang="en"><meta charset="utf-8">
<title>{html.escape(head[0][2:])}</title>
<style>body{{font:14px system-ui,sans-serif;max-width:70rem;margin:auto;padding:1rem}}td{{padding:0 .6rem}}
.alarm{{color:#b00020;font-weight:bold}}.grid{{display:flex;flex-wrap:wrap;gap:.5rem}}
figure{{margin:0;text-align:center;font-size:11px}}figure img{{width:112px;image-rendering:pixelated}}</style>
<h1>{html.escape(head[0][2:])}</h1>{body}
<table><tr><th>signal</th><th>value</th><th>threshold</th></tr>{table_html}</table>
<img src="data:image/png;base64,{inline['drift.png']}" alt="distributions" style="max-width:100%">
<img src="data:image/png;base64,{inline['ood.png']}" alt="scores">
<h2>The {len(strange)} images least like the training data</h2><div class="grid">{cells}</div></html>
""")
    log.info("%s: %d images, %d flagged out of distribution; %s; report %s", report.folder, len(report.images),
             int(report.flagged.sum()), "alarms: " + "; ".join(s.describe() for s in report.alarms)
             if report.alarms else "no drift alarm", out / "report.md")
