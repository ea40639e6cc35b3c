"""The training loop: a folder in, a run directory out, whatever the task.

`Trainer` builds a run in the order the data dictates (the task's scan, the auto recipe, the model,
the preprocessing, the task's datasets, the loaders, the optimiser step) and `fit` runs it: each epoch
trains (`_train_epoch`: the four calls of `step.Step` top to bottom, with the NaN check, the EMA update
and the callback events), validates the model (and its EMA) through the task, appends a row to
`metrics.csv`, saves `best.safetensors` when the chosen metric improves, and rewrites `last.ckpt`
atomically for `--resume` (`resume.py`). What is task-specific is asked of `self.task` (`tasks/`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .. import __version__, timing
from ..config import Config, validate
from ..data.folder import ImageFolderScan
from ..data.gpu_decode import Prefetcher, check_augment
from ..data.loader import CACHE_AUTO_BYTES, cache_bytes, dataset_stats, make_loader, resolve_workers
from ..data.transforms import Preprocess, imagenet_stats, make_preprocess
from ..device import autocast, resolve_amp, resolve_device, seed_everything, to_device
from ..errors import ConfigError, TrainingError
from ..models import ResNet, save_model
from ..models.weights import arch_record, build_from_arch
from ..tasks import Task, task_for
from . import budget as _budget
from . import distributed
from .budget import TimeBudget
from .checkpoint import RunLock, rng_state, save_checkpoint
from .optim import Schedule, default_lr, freeze, set_train_mode
from .padding_taps import guard_padding_taps
from .resume import read_run, restore
from .rundir import new_run_dir, prepare_run_dir, write_metrics
from .sparsity import GradualMagnitude, mark_sparse
from .step import Step, update_ema

log = logging.getLogger("resforge")

Callback = Callable[[str, "Trainer"], None]
SYNC_EVERY = 10  # batches between the host's waits for the device: the progress figures and the loss check


class Trainer:
    """One training run. Build it from a config (or `Trainer.resume(run_dir)`), then call `fit()`.

    Set-up runs in the order the data dictates: the folder is scanned (or its recorded split read
    back), the auto recipe fills in what the user left open, then the model, the loaders and the
    optimiser are built from the resolved config.
    """

    def __init__(self, cfg: Config, *, run_dir: str | os.PathLike | None = None, callbacks: list[Callback] = (),
                 progress: bool = True, split_csv: str | os.PathLike | None = None,
                 state: dict[str, Any] | None = None, task: Task | None = None):
        validate(cfg)
        if not cfg.data.root:
            raise ConfigError("no data folder given")
        self.cfg = cfg
        self.task = task or task_for(cfg)
        if "train.metric" not in cfg.user_set:
            cfg.train.metric = self.task.metrics[0]
        elif cfg.train.metric not in self.task.metrics:
            raise ConfigError(f"train.metric {cfg.train.metric} is not a figure of {self.task.name}: "
                              f"{' or '.join(self.task.metrics)}")
        self.state = state  # a checkpoint being resumed: its architecture and preprocessing are the run's
        # a saved model to start from: a classifier's architecture and input options become the run's
        self.init_model = self.task.adopt_init(cfg) if cfg.model.init_from and state is None else None
        self.callbacks = list(callbacks)
        self.world = distributed.join()
        self.progress = progress and self.world.main
        self.device = distributed.device_for(self.world, resolve_device(cfg.train.device))
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        if cfg.data.decode == "gpu":  # before the folder is scanned
            if self.device.type != "cuda":
                raise ConfigError(f"data.decode gpu decodes on the training GPU, and this run trains on "
                                  f"{self.device}: use data.decode cpu")
            check_augment(cfg.augment)
        if self.init_model is None and state is None:
            with torch.device("meta"):  # a bad model option fails now, not after the whole folder is decoded
                self.task.build_model(cfg, 2, pretrained=False)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.run_dir = Path(run_dir) if run_dir else None
        self.lock: RunLock | None = None

        survey = (self._survey(split_csv), cfg) if self.world.main else None
        self.scan, self.cfg = self.world.broadcast(survey)  # one scan (and recipe) for every process
        self.classes = self.scan.classes
        if self.world.distributed:
            self._check_world()
        self.memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        self.model = self._build_model()
        self.pre = self._build_preprocess()
        self._setup_data()
        self._setup_optim()

        self.epoch, self.step = 0, 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"score": None, "epoch": None, "weights": None}
        self.bad_epochs = 0
        self.finished = False
        self.stop_step: int | None = None  # where the time limit ends the run, once planned

    # -- set-up -----------------------------------------------------------------------------------
    def _survey(self, split_csv: str | os.PathLike | None) -> ImageFolderScan:
        """The task's scan of the folder (or the recorded split), then the auto recipe fills in the config."""
        cfg = self.cfg
        self.scan = self.task.scan(cfg, split_csv)
        if not self.scan.val:
            raise ConfigError("no validation images: set data.val_split above 0 or add a val folder")
        self.classes = self.scan.classes
        if cfg.recipe == "auto" and cfg.auto is None:
            cfg.auto = self.task.fit_recipe(cfg, self.scan, pace=self._pace)
            validate(cfg)
            if "data.val_split" in cfg.auto:
                self.scan = self.scan.resplit(cfg.data.val_split, cfg.data.split_seed)
        return self.scan

    def _check_world(self) -> None:
        """The global batch must split evenly among the processes, and the training split hold one."""
        size, batch, n = self.world.size, self.cfg.data.batch_size, len(self.scan.train)
        if batch % size:
            raise ConfigError(f"data.batch_size {batch} is the global batch, split among {size} processes: give "
                              f"a multiple of {size}, or a number of processes that divides {batch}")
        if n < batch:
            raise ConfigError(f"the training split has {n} images, fewer than one global batch of {batch}: "
                              "lower data.batch_size")

    def _build_model(self) -> ResNet:
        if self.state is not None and "arch" in self.state:  # the checkpoint's own architecture (pruned, ...)
            model = build_from_arch(self.state["arch"], str(self.run_dir / "last.ckpt"))
        elif self.init_model is not None:
            model, meta = self.init_model
            if meta["classes"] != self.classes and not hasattr(model, "reset_classifier"):
                raise ConfigError(f"--init {self.cfg.model.init_from} knows other classes ({', '.join(meta['classes'])})"
                                  f" than this folder ({', '.join(self.classes)}), and a {self.task.name} model "
                                  "keeps its head: start from a classification run, or train on the same classes")
            if meta["classes"] != self.classes:
                log.info("--init model has %d classes (%s), this folder %d: a new classifier head",
                         len(meta["classes"]), ", ".join(meta["classes"][:5]), len(self.classes))
                model.reset_classifier(len(self.classes))
        else:
            model = self.task.build_model(self.cfg, len(self.classes))
        model = model.to(self.device, memory_format=self.memory_format)
        if self.cfg.train.sync_bn and self.world.distributed:
            model = distributed.sync_batchnorm(model, self.device)
        return model

    def _pace(self, cfg: Config, steps: int = 2) -> float:
        """Training images/s of the model `cfg` describes, timed through the run's own `Step` (criterion and
        penalties included) on random batches on this device. The RNG is left as it was, so the run's own
        initialisation does not depend on whether this was asked."""
        d = cfg.data
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.init_model is not None:
                model = build_from_arch(arch_record(self.init_model[0]), str(cfg.model.init_from))
                if model.num_classes != len(self.classes):
                    model.reset_classifier(len(self.classes))
            else:
                model = self.task.build_model(cfg, len(self.classes), pretrained=False)
            model = model.to(self.device, memory_format=fmt).train()
            criterion = self.task.criterion(cfg, self.classes, None, self.device, self.amp_dtype, fmt)
            step = Step.build(model, model, cfg.optim, default_lr(cfg.optim, d.batch_size), criterion, self.device,
                              self.amp_dtype, fmt, self.task.batch_transform(cfg, len(self.classes)),
                              call=self.task.train_call)
            x, y = self.task.random_batch(cfg, len(self.classes), self.device)

            def one_step() -> None:
                loss, _ = step.compute_loss(*step.prepare_batch(x, y))
                step.backward(loss, first=True)
                step.optimizer_step(1.0)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            times = timing.timed_calls(one_step, 0, min_calls=steps, warmup=1)  # the first warms up kernels
        return d.batch_size / min(times)

    def _build_preprocess(self) -> Preprocess:
        if self.state is not None and "preprocess" in self.state:
            return Preprocess.from_dict(self.state["preprocess"])
        d = self.cfg.data
        mean, std = imagenet_stats(d.in_chans)
        pretrained = self.model.pretrained_cfg
        if d.normalize == "auto" and self.init_model is not None:  # the statistics the saved model was fed
            mean, std = self.init_model[1]["preprocess"]["mean"], self.init_model[1]["preprocess"]["std"]
        elif d.normalize == "auto" and "mean" in pretrained:
            mean, std = imagenet_stats(d.in_chans, pretrained["mean"], pretrained["std"])
        elif d.normalize == "none":
            mean, std = [0.0] * d.in_chans, [1.0] * d.in_chans
        pre = make_preprocess(d.img_size, d.crop_pct, d.in_chans, d.interpolation, mean, std)
        if d.normalize == "dataset":
            pre.mean, pre.std = dataset_stats(self.scan.train, pre)
        return pre

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        pin = self.device.type == "cuda"
        sets = self.task.datasets(cfg, self.scan, self.pre, self.device)
        self.train_set, self.val_set, self.decoder = sets.train, sets.val, sets.decoder
        on_gpu = self.decoder is not None
        cached = bool(sets.cacheable) and (d.cache == "on" or (d.cache == "auto" and cache_bytes(
            [s for ds in sets.cacheable for s in ds.samples], self.scan.sizes, self.pre) < CACHE_AUTO_BYTES))
        if cached:
            for ds in sets.cacheable:
                ds.build_cache(self.progress)
        workers = resolve_workers(d.workers, cached and not on_gpu, self.world.local_size)
        shard = dict(rank=self.world.rank, world=self.world.size)
        self.train_loader = make_loader(self.train_set, d.batch_size, train=True, workers=workers,
                                        seed=cfg.train.seed, pin_memory=pin and not on_gpu,
                                        collate_fn=sets.train_collate, **shard)
        self.val_loader = make_loader(self.val_set, d.batch_size, train=False, workers=workers,
                                      seed=cfg.train.seed, pin_memory=pin, collate_fn=sets.val_collate, **shard)

    def train_batches(self) -> Any:
        """The training loader, its batches decoded on the GPU a step ahead when data.decode is gpu."""
        return self.train_loader if self.decoder is None else Prefetcher(self.train_loader, self.decoder)

    def _setup_optim(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        if o.freeze and not self.cfg.model.pretrained:
            log.warning("freezing %s of a randomly initialised model: those layers will never learn; "
                        "give --pretrained weights (or no --freeze)", ", ".join(o.freeze))
        self.frozen = freeze(self.model, o.freeze)
        self.lr = default_lr(o, self.cfg.data.batch_size)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / o.accum_steps)
        self.schedule = Schedule.create(o, t.epochs, self.steps_per_epoch)
        self.ema = AveragedModel(self.model, use_buffers=True) if t.ema else None
        self._setup_sparsity()
        for handle in getattr(self, "tap_hooks", []):
            handle.remove()
        cpu_bf16 = self.device.type == "cpu" and self.amp_dtype == torch.bfloat16
        self.tap_hooks = guard_padding_taps(self.model) if cpu_bf16 else []
        self.eval_model = torch.compile(self.model) if t.compile else self.model
        self.ddp = distributed.data_parallel(self.model, self.device) if self.world.distributed else None
        if self.ddp is None:
            forward = self.eval_model
        else:
            forward = torch.compile(self.ddp) if t.compile else self.ddp
        criterion = self.task.criterion(self.cfg, self.classes, self.pre, self.device, self.amp_dtype,
                                        self.memory_format)
        self.stepper = Step.build(self.model, forward, o, self.lr, criterion, self.device, self.amp_dtype,
                                  self.memory_format, self.task.batch_transform(self.cfg, len(self.classes)),
                                  self.decoder, self.task.train_call)

    def _setup_sparsity(self) -> None:
        """Gradual magnitude pruning as a callback; only epochs at the final sparsity may be the best."""
        t = self.cfg.train
        self.callbacks = [cb for cb in self.callbacks if not isinstance(cb, GradualMagnitude)]
        if not t.sparsity:
            self.best_allowed = lambda: True
            return
        sparsifier = GradualMagnitude(t.sparsity, t.sparsity_scope)
        self.callbacks.append(sparsifier)
        self.best_allowed = lambda: sparsifier.reached(self)
        mark_sparse(self.model, t.sparsity, t.sparsity_scope)

    def model_changed(self) -> None:
        """The model's parameters were replaced (pruned, factorised): rebuild what holds or copies them."""
        self.model.to(self.device, memory_format=self.memory_format)
        self._setup_optim()

    # -- resume -----------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
               callbacks: list[Callback] = (), progress: bool = True, task: Task | None = None) -> Trainer:
        """Continue a run from its `last.ckpt`; only the options in `resume.RESUMABLE` may change.

        A run stopped before its first checkpoint starts again from its `config.yaml`, on the split
        it recorded. Either way the run is locked against a second process for as long as it trains.
        """
        run_dir = Path(run_dir)
        world = distributed.join()
        lock = None
        try:
            if world.main:  # its files are read once, by the process that writes them
                lock, state, cfg = read_run(run_dir, overrides)
            state, cfg = world.broadcast((state, cfg) if world.main else None)
            split = run_dir / "split.csv"
            trainer = cls(cfg, run_dir=run_dir, callbacks=callbacks, progress=progress,
                          split_csv=split if split.is_file() else None, state=state, task=task)
            if state is not None:
                restore(trainer, state)
                trainer.state = None
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.lock = lock
        return trainer

    @property
    def time_spent(self) -> float:
        """Seconds the run has trained so far, in every session (what its time limit counts)."""
        return sum(r["epoch_time_s"] for r in self.history)

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.stepper.optimizer.state_dict(), "scaler": self.stepper.scaler.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                "finished": self.finished, "rng": rng_state(), "config": self.cfg.to_dict(),
                "arch": arch_record(self.model), "preprocess": self.pre.to_dict(),
                "data": {"classes": self.classes}, "version": __version__}

    # -- the loop ---------------------------------------------------------------------------------
    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            cb(event, self)

    def _train_epoch(self, epoch: int, budget: TimeBudget | None) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, step = self.cfg, self.stepper
        accum = cfg.optim.accum_steps
        set_train_mode(self.model, self.frozen)
        self.train_loader.sampler.set_epoch(epoch)
        n_batches = len(self.train_loader)
        figures = self.task.train_figures
        totals = torch.zeros(1 + len(figures), dtype=torch.float64, device=self.device)  # loss x images, figures
        pending: list[tuple[int, int, torch.Tensor]] = []  # (batch, step, loss) not yet checked to be finite
        seen, first_step = 0, self.step
        bar = tqdm(self.train_batches(), total=n_batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=None if self.progress else True, unit="batch")
        if budget is not None:
            budget.epoch_started()
        self._emit("epoch_start")
        start = _budget.clock()
        for i, (x, y) in enumerate(bar):
            self.batch = i
            stepped = (i + 1) % accum == 0 or i + 1 == n_batches
            with distributed.grad_sync(self.ddp, stepped):
                x, y = step.prepare_batch(x, y)
                loss, outputs = step.compute_loss(x, y)
                step.backward(loss, first=i % accum == 0)
            pending.append((i, self.step, loss.detach()))
            sums = self.task.batch_figures(outputs, y).to(totals.dtype)
            totals += torch.cat([(loss.detach().double() * len(x)).reshape(1), sums])
            seen += len(x)
            if stepped:
                step.optimizer_step(self.schedule.factor(self.step))
                if self.ema is not None:
                    update_ema(self.ema, self.model, self.cfg.train.ema_decay)
                self.step += 1
                self._emit("step_end")
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == n_batches:
                self._check_losses(pending, epoch)
                pending = []
                means = [v / seen for v in totals.tolist()]
                bar.set_postfix(loss=f"{means[0]:.3f}", **{f: f"{v:.1%}" for f, v in zip(figures, means[1:])},
                                lr=f"{step.optimizer.param_groups[-1]['lr']:.2e}",
                                img_s=f"{seen / max(_budget.clock() - start, 1e-9):.0f}")
            self._emit("batch_end")
            if stepped and budget is not None and self._fit_to_budget(budget, self.step - first_step):
                if i + 1 < n_batches:
                    log.info("time limit: the epoch ends after %d of %d batches", i + 1, n_batches)
                break
        self._check_losses(pending, epoch)
        step.optimizer.zero_grad(set_to_none=True)  # no gradients held through validation and saving
        elapsed = _budget.clock() - start
        *sums, seen = self.world.sum([*totals.tolist(), seen])  # the global batches' figures
        return {"epoch": epoch + 1, "train_loss": sums[0] / seen,
                **{f"train_{f}": v / seen for f, v in zip(figures, sums[1:])},
                "lr": step.optimizer.param_groups[-1]["lr"], "img_per_s": seen / max(elapsed, 1e-9),
                "train_time_s": elapsed, "train_images": int(seen)}

    def _check_losses(self, pending: list[tuple[int, int, torch.Tensor]], epoch: int) -> None:
        """Stop at a loss that is not finite, in this process or another (all of them together, none left
        waiting). Checked every SYNC_EVERY batches, so the device is not waited for at each step; the
        checkpoint on disk is the last good epoch's either way."""
        values = torch.stack([loss for _, _, loss in pending]).float().tolist() if pending else []
        bad = next(((b, st, v) for (b, st, _), v in zip(pending, values) if not math.isfinite(v)), None)
        if self.world.distributed:
            if not self.world.sum([bad is not None])[0]:
                return
        elif bad is None:
            return
        batch, step, value = bad if bad is not None else (self.batch, self.step, "not finite in another process")
        where = f"epoch {epoch + 1}, batch {batch + 1}, optimiser step {step + 1}"
        kept = (f"the last good checkpoint is {self.run_dir / 'last.ckpt'} (epoch {self.epoch})"
                if self.epoch else "no checkpoint was written yet")
        raise TrainingError(f"the loss became {value} at {where}; {kept}. Lower optim.lr, set optim.clip_grad, or "
                            "turn mixed precision off (train.amp off)")

    def _fit_to_budget(self, budget: TimeBudget, epoch_step: int) -> bool:
        """Re-plan the run's length after a step; True when the budget ends it here."""
        budget.step_done()
        plan = self.world.broadcast(budget.end_step(self.step, epoch_step))  # rank 0's clock decides for all
        if plan is None:
            return False
        end, ends = plan
        self.stop_step = end
        self.cfg.train.epochs = self.epoch + ends
        if end != self.schedule.end:
            self.schedule = self.schedule.resized(self.step, max(end, self.step + 1), finished=False)
        return self.step >= end

    def _validate(self) -> dict[str, float]:
        """The task's validation metrics of the model (and its EMA), each process evaluating its share."""
        row = {}
        self.world.share_buffers(self.model)
        if self.ema is not None:
            self.world.share_buffers(self.ema)
        models = [("val", self.eval_model)] + ([("ema_val", self.ema.module)] if self.ema is not None else [])
        for prefix, model in models:
            was_training = model.training
            model.eval()
            try:
                row.update(self.task.validate(self._forward(model), self.val_loader, prefix, self.world))
            finally:
                model.train(was_training)
        return row

    def _forward(self, model: nn.Module) -> Callable[[Any], Any]:
        """Validation's forward pass: the batch on the device, in the run's layout and precision (a tensor of
        outputs in fp32; a detector's lists of dicts as it gives them)."""
        @torch.no_grad()
        def forward(x: Any) -> Any:
            with autocast(self.device, self.amp_dtype):
                out = model(to_device(x, self.device, self.memory_format))
            return out.float() if isinstance(out, torch.Tensor) else out
        return forward

    def _score(self, row: dict[str, float], prefix: str) -> float:
        """Higher is better."""
        metric = self.cfg.train.metric.replace("val_", f"{prefix}_")
        return -row[metric] if metric.endswith("loss") else row[metric]

    def _update_best(self, row: dict[str, float]) -> bool:
        if not self.best_allowed():
            return False
        candidates = [("model", self._score(row, "val"))]
        if self.ema is not None:
            candidates.append(("ema", self._score(row, "ema_val")))
        which, score = max(candidates, key=lambda c: c[1])
        improved = self.best["score"] is None or score > self.best["score"]
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if not improved and self.cfg.train.keep == "best":
            return False
        self.best = {"score": score if improved else self.best["score"], "epoch": row["epoch"], "weights": which}
        if self.world.main:
            model = self.ema.module if which == "ema" else self.model
            save_model(model, self.run_dir / "best.safetensors", self.model_meta(row, which))
        return True

    def model_meta(self, row: dict[str, float], which: str) -> dict[str, Any]:
        """What the sidecar of a saved model records besides its architecture."""
        prefix = "ema_val" if which == "ema" else "val"
        return {"task": self.task.name, "classes": self.classes, "preprocess": self.pre.to_dict(),
                "metrics": {k.replace(prefix, "val"): v for k, v in row.items() if k.startswith(prefix + "_")},
                "trained": {"run": str(self.run_dir.resolve()), "epoch": row["epoch"], "weights": which,
                            "data": str(Path(self.cfg.data.root).resolve()),
                            "pretrained": self.cfg.model.pretrained, "resforge": __version__,
                            "torch": torch.__version__}, **self.task.record(self.cfg)}

    def _log_epoch(self, row: dict[str, float]) -> None:
        log.info("  ".join([f"epoch {row['epoch']}/{self.cfg.train.epochs}",
                            self.task.epoch_line(row, len(self.classes)),
                            f"lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s"]))

    def _log_auto_choices(self) -> None:
        if self.cfg.auto:
            log.info("auto recipe (what you did not set; flags or --config override any of it):")
            for key, reason in self.cfg.auto.items():
                log.info("  %s", reason)

    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs (or an early stop, or the time limit); return the summary."""
        if self.run_dir is None:  # named by rank 0, which alone writes in it
            self.run_dir = Path(self.world.broadcast(str(new_run_dir(self.cfg)[0]) if self.world.main else None))
        if self.lock is None and self.world.main:
            self.lock = RunLock(self.run_dir)
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.world.main:
            prepare_run_dir(self.run_dir, cfg, self.scan, self.history)
        if self.world.distributed:
            log.info("training in %d processes (%s); run directory %s", self.world.size,
                     "gloo" if self.device.type == "cpu" else "nccl", self.run_dir)
        if not self.history:
            self._log_auto_choices()
        budget = None
        if cfg.train.time_limit:
            budget = TimeBudget(cfg.train.time_limit * 60 - self.time_spent, self.steps_per_epoch,
                                len(self.val_loader) * (2 if self.ema is not None else 1))
        self._emit("train_start")
        try:
            while self.epoch < cfg.train.epochs:
                t0 = _budget.clock()
                row = self._train_epoch(self.epoch, budget)
                after_train = _budget.clock()
                row.update(self._validate())
                self.epoch += 1
                self.history.append(row)
                self._update_best(row)
                stop = bool(cfg.train.patience) and self.bad_epochs >= cfg.train.patience
                self.finished = stop or self.epoch >= cfg.train.epochs
                row["epoch_time_s"] = _budget.clock() - t0
                if self.world.main:
                    save_checkpoint(self.run_dir / "last.ckpt", self._state())
                    write_metrics(self.run_dir, self.history)
                self._log_epoch(row)
                self._emit("epoch_end")
                if budget is not None:
                    budget.epoch_overhead = _budget.clock() - after_train
                if stop:
                    log.info("no improvement of %s for %d epochs: stopping early", cfg.train.metric,
                             cfg.train.patience)
                    break
        except KeyboardInterrupt:
            if (self.run_dir / "last.ckpt").is_file():
                log.warning("interrupted; continue with: resforge train --resume %s (from epoch %d)", self.run_dir,
                            self.epoch)
            else:
                log.warning("interrupted before the first epoch was saved: resforge train --resume %s starts the "
                            "run again from its config.yaml", self.run_dir)
            raise
        self._emit("train_end")
        return {"run_dir": str(self.run_dir), "epochs": self.epoch, "best_epoch": self.best["epoch"],
                "best_weights": self.best["weights"], "metric": cfg.train.metric,
                "stopped_early": self.epoch < cfg.train.epochs, "train_time_s": self.time_spent,
                "history": self.history}
