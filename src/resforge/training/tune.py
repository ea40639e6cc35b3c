"""`resforge tune`: a hyperparameter search with Optuna, each trial a training run of its own.

TPE samples the chosen part of the space; the median rule or Hyperband stops weak trials from their
per-epoch validation (the trainer reports each epoch to the trial). The study lives in an Optuna
storage: by default an SQLite file in the search's folder, so a killed search resumes where it
stopped; several processes given the same `--storage` URL (an RDB such as PostgreSQL or MySQL, or a
shared SQLite file on one machine) share one study, which is how a search spreads over machines.
The best trial's config is written as a recipe file that `resforge train --config` takes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..config import CHOICES, Config, TrainConfig, config_for, resolve_key
from ..errors import ConfigError, DataError
from ..io import write_json, write_text
from .trainer import Trainer

log = logging.getLogger("resforge")

# what --space names, and how a trial samples it (Optuna's distributions)
SPACE: dict[str, Callable[[Any], Any]] = {
    "lr": lambda t: t.suggest_float("lr", 1e-4, 0.5, log=True),
    "weight_decay": lambda t: t.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    "batch_size": lambda t: t.suggest_categorical("batch_size", [16, 32, 64, 128]),
    "label_smoothing": lambda t: t.suggest_float("label_smoothing", 0.0, 0.2),
    "mixup": lambda t: t.suggest_float("mixup", 0.0, 0.5),
    "cutmix": lambda t: t.suggest_float("cutmix", 0.0, 1.0),
    "drop_path_rate": lambda t: t.suggest_float("drop_path_rate", 0.0, 0.2),
    "warmup_epochs": lambda t: t.suggest_int("warmup_epochs", 0, 5),
}
DEFAULT_SPACE = ("lr", "weight_decay", "label_smoothing")
TRIALS = 20  # finished trials a new search asks for unless told
METRICS = CHOICES["train.metric"]  # what a search optimises: the metric that picks each trial's best epoch
PRUNERS = ("median", "hyperband", "none")
STATE_FILE = "tune.json"
HEARTBEAT_S = 10  # how often a process records that its running trial is alive (Optuna's heartbeat)
GRACE_S = 120  # a running trial without a heartbeat for this long is abandoned: its process is gone
RETRIES = 2  # times an abandoned trial's parameters are tried again (a trial that kills its process would loop)


def check_space(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SPACE]
    if unknown or not names:
        raise ConfigError(f"--space takes names among {', '.join(SPACE)}, got {', '.join(unknown) or 'nothing'}")
    return names


class ReportEpochs:
    """A trainer callback that reports each epoch's validation metric to the trial and stops a pruned one."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric

    def __call__(self, event: str, trainer: Any) -> None:
        import optuna

        if event != "epoch_end":
            return
        row = trainer.history[-1]
        self.trial.report(row[self.metric], step=row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {row[self.metric]:.4g} at epoch {row['epoch']}")


def _pruner(name: str, epochs: int) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> Any:
    """The Optuna storage at `url`, opened (a bad URL, a missing folder or driver is a ConfigError), with Optuna's
    heartbeat: a running trial is failed as abandoned, and its parameters queued again, only once its process has
    stopped recording that it is alive, never because another process shares the study."""
    import warnings

    import optuna
    import sqlalchemy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks the heartbeat and its retry experimental
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)

    def abandoned(study: Any, trial: Any) -> None:
        log.info("trial %d stopped recording its heartbeat (its process is gone): failed, and its parameters tried "
                 "again (up to %d times)", trial.number, RETRIES)
        retry(study, trial)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                              heartbeat_stale_trial_callback=abandoned)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:  # a bad URL or folder; a driver not installed
        cause = getattr(e, "orig", None) or e.__cause__ or e
        raise ConfigError(f"the study storage {_without_password(url)} cannot be opened: "
                          f"{str(cause).splitlines()[0]}") from None


def _without_password(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return repr(url)


def open_study(state: dict[str, Any], epochs: int) -> Any:
    import optuna

    direction = "minimize" if state["metric"].endswith("loss") else "maximize"
    sampler = optuna.samplers.TPESampler(seed=state.get("seed"), n_startup_trials=min(5, state["trials"]))
    return optuna.create_study(study_name=state["study"], storage=open_storage(state["storage"]),
                               direction=direction, sampler=sampler, pruner=_pruner(state["pruner"], epochs),
                               load_if_exists=True)


def search(out: Path, state: dict[str, Any], train: Callable[..., dict[str, Any]], make_config: Callable[..., Config],
           time_limit: float | None = None) -> Any:
    """Run trials until the study holds `state["trials"]` finished ones (or `time_limit` minutes pass).

    `make_config(overrides)` builds (and so checks) a trial's config; `train(config, run_dir, callbacks)`
    trains it and returns the trainer's summary.
    """
    import optuna

    epochs = make_config({}).train.epochs
    study = open_study(state, epochs)

    def objective(trial: Any) -> float:
        params = {name: SPACE[name](trial) for name in state["space"]}
        run_dir = out / "trials" / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = make_config(params)
        summary = train(cfg, run_dir, [ReportEpochs(trial, state["metric"])])
        best = max(summary["history"], key=lambda r: -r[state["metric"]] if state["metric"].endswith("loss")
                   else r[state["metric"]])
        return best[state["metric"]]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop = optuna.study.MaxTrialsCallback(state["trials"], states=finished)
    if sum(t.state in finished for t in study.trials) < state["trials"]:
        study.optimize(objective, callbacks=[stop], timeout=time_limit * 60 if time_limit else None,
                       catch=(ConfigError,))
    write_outputs(out, study, state)
    return study


def write_outputs(out: Path, study: Any, state: dict[str, Any]) -> None:
    """summary.md, Optuna's plots (PNG), and the best trial's config as best.yaml."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    names = state["space"]
    lines = [f"# tune {state['data']}", "", f"Study `{state['study']}` in `{state['storage']}`, metric "
             f"{state['metric']} ({study.direction.name.lower()}), {len(trials)} trials.", "",
             "| trial | state | " + f"{state['metric']} | " + " | ".join(names) + " | epochs |",
             "|---:|---|---:|" + "---:|" * len(names) + "---:|"]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else (
            f"({list(t.intermediate_values.values())[-1]:.4f})" if t.intermediate_values else "-")
        cells = [_fmt(t.params.get(n)) for n in names]
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | " + " | ".join(cells) +
                     f" | {len(t.intermediate_values)} |")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        write_text(out / "best.yaml", best_recipe(Path(best.user_attrs["run_dir"]) / "config.yaml"))
        lines += ["", f"Best: trial {best.number}, {state['metric']} {best.value:.4f}, " +
                  ", ".join(f"{k} {_fmt(v)}" for k, v in best.params.items()) +
                  f" (run: {best.user_attrs.get('run_dir')}); its config: `best.yaml` "
                  "(`resforge train --config best.yaml`)."]
    lines += _plots(out, study, len(complete), len(names))
    write_text(out / "summary.md", "\n".join(lines) + "\n")


def best_recipe(config_yaml: Path) -> str:
    """The best trial's config as it trained (the auto recipe's choices resolved), without what names
    that one run: a file for `resforge train DATA --config`."""
    cfg = yaml.safe_load(config_yaml.read_text())
    cfg.get("data", {}).pop("root", None)
    for key in ("name", "project", "resume"):
        cfg.get("train", {}).pop(key, None)
    return "# the best trial of a resforge tune search: resforge train DATA --config best.yaml\n" + yaml.safe_dump(
        cfg, sort_keys=False)


def _plots(out: Path, study: Any, complete: int, params: int) -> list[str]:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    wanted = [("history", ovm.plot_optimization_history, 1), ("importance", ovm.plot_param_importances, 2),
              ("parallel", ovm.plot_parallel_coordinate, 2)]
    lines = [""]
    for name, plot, needed in wanted:
        if complete < needed or (name == "importance" and params < 2):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            ax = plot(study)
        fig = (ax if hasattr(ax, "figure") else ax.flat[0]).figure
        path = out / "plots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        lines.append(f"![{name}](plots/{name}.png)")
    return lines


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def run_search(data: str | os.PathLike | None, options: dict[str, Any], *, trials: int | None,
               space: list[str] | None, storage: str | None, study: str | None, pruner: str,
               time_limit: float | None, name: str | None, project: str | os.PathLike, resume: str | os.PathLike | None,
               model: str | None, recipe: str | None, config: str | os.PathLike | None, seed: int | None
               ) -> dict[str, Any]:
    """A search on `data` (each trial a training run with `options`), or the one in `resume` continued. Writes
    `<project>/<name>/`: the study (SQLite unless `storage`), trials/, summary.md, plots/, best.yaml. `resume`
    continues a killed search (to `trials` finished ones, default as first asked); processes given one `storage`
    URL and `study` name share the study. `time_limit`: minutes for this process."""
    if time_limit is not None and not time_limit > 0:
        raise ConfigError(f"--time-limit must be a positive number of minutes, got {time_limit:g}")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if resume is not None:
        if data is not None or options or model or recipe or config or space:
            raise ConfigError("resuming a search continues it as it was set: give only --trials or --time-limit")
        out = Path(resume)
        state = read_state(out)
        state["trials"] = trials or state["trials"]
    else:
        if data is None:
            raise ConfigError("give the image folder to search on (or --resume DIR)")
        if not Path(data).is_dir():
            raise DataError(f"{data}: no such folder of images")
        out = default_dir(project, name, data)
        if (out / STATE_FILE).is_file() and storage is None:
            raise ConfigError(f"{out} already holds a search: continue it with --resume {out}, or give another "
                              "--name")
        metric = options.get("metric", options.get("train.metric", TrainConfig.metric))  # each trial's best epoch too
        state = new_state(str(data), options, space or list(DEFAULT_SPACE), metric, trials or TRIALS, pruner,
                          storage, study, out, seed)
        state.update(model=model, recipe=recipe, config=str(config) if config else None)
        config_for(state["data"], model, recipe, config, options)  # a bad option fails before the folder is made
        if storage is not None:
            open_storage(storage)  # and so does a storage that cannot be opened
        write_state(out, state)

    def make_config(params: dict[str, Any]) -> Config:
        return config_for(state["data"], state["model"], state["recipe"], state["config"],
                          {**state["options"], **params})

    def train_trial(cfg: Config, run_dir: Path, callbacks: list[Any]) -> dict[str, Any]:
        run_dir.mkdir(parents=True, exist_ok=True)
        return Trainer(cfg, run_dir=run_dir, callbacks=callbacks, progress=False).fit()

    found = search(out, state, train_trial, make_config, time_limit)
    done = [x for x in found.trials if x.value is not None and x.state.name == "COMPLETE"]
    result = {"dir": out, "trials": len(found.trials), "complete": len(done),
              "pruned": sum(x.state.name == "PRUNED" for x in found.trials)}
    if done:
        result.update(best_value=found.best_value, best_params=found.best_params, best_config=out / "best.yaml")
        log.info("best of %d trials: %s %.4f with %s; summary %s, config %s", len(found.trials), state["metric"],
                 found.best_value, found.best_params, out / "summary.md", out / "best.yaml")
    return result


def new_state(data: str, options: dict[str, Any], space: list[str], metric: str, trials: int, pruner: str,
              storage: str | None, study: str | None, out: Path, seed: int | None) -> dict[str, Any]:
    """What a search is, written to tune.json so that --resume takes it up."""
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be {' or '.join(METRICS)}, got {metric!r}")
    check_space(space)
    clashes = [k for k in options if resolve_key(k) in {resolve_key(n) for n in space}]
    if clashes:
        raise ConfigError(f"{', '.join(clashes)} is searched (--space): do not fix it too")
    return {"data": str(data), "options": options, "space": space, "metric": metric, "trials": trials,
            "pruner": pruner, "storage": storage or f"sqlite:///{(out / 'study.db').resolve()}",
            "study": study or out.name, "seed": seed}


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{out} holds no search to resume ({STATE_FILE} is missing)")
    return json.loads(path.read_text())


def write_state(out: Path, state: dict[str, Any]) -> None:
    write_json(out / STATE_FILE, state)


def default_dir(project: str | os.PathLike, name: str | None, data: str | os.PathLike) -> Path:
    return Path(project) / (name or f"tune-{Path(data).resolve().name}")
