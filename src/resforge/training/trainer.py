"""The training loop: a folder in, a run directory out.

Each step is four calls that lr-find, distillation and pruning share: `prepare_batch` (device,
layout, mixing), `compute_loss` (autocast, the criterion, penalties), `backward` (accumulation) and
`optimizer_step` (schedule, clipping); `_train_epoch` runs them top to bottom with the NaN check,
the EMA update and the callback events (`epoch_start`, `step_end`, `batch_end`, ...). Each epoch
then validates the model (and its EMA), appends a row to `metrics.csv`, saves `best.safetensors`
when the chosen metric improves, and rewrites `last.ckpt` atomically for `--resume`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .. import __version__
from ..config import Config, get_option, load_yaml, merge, resolve_key, set_option, validate
from ..data.folder import ImageFolderScan, scan_folder, scan_recorded_split
from ..data.gpu_decode import BatchDecoder, EncodedBatch, EncodedDataset, Prefetcher, check_augment, collate
from ..data.loader import CACHE_AUTO_BYTES, ImageDataset, cache_bytes, dataset_stats, make_loader, resolve_workers
from ..data.transforms import BatchMix, Preprocess, eval_transform, imagenet_stats, make_preprocess, train_transform
from ..device import autocast, resolve_amp, resolve_device, seed_everything
from ..errors import CheckpointError, ConfigError, TrainingError
from ..evaluation.metrics import topk_correct, topk_hits
from ..evaluation.runner import infer
from ..io import write_csv, write_json, write_text
from ..models import ResNet, create_model, load_model, save_model
from ..models.spec import ARCHITECTURE, given_options
from ..models.weights import arch_record, build_from_arch
from . import budget as _budget
from . import distributed
from .budget import TimeBudget
from .checkpoint import RunLock, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .losses import ClassificationLoss, DistillationLoss
from .optim import Schedule, apply_lr, build_optimizer, default_lr, freeze, set_train_mode
from .padding_taps import guard_padding_taps
from .sparsity import GradualMagnitude, mark_sparse

log = logging.getLogger("resforge")

Callback = Callable[[str, "Trainer"], None]
# What a resumed run may change; anything else would make it another experiment.
RESUMABLE = {"train.epochs", "train.patience", "train.time_limit", "train.device", "data.workers", "data.decode"}
SYNC_EVERY = 10  # batches between the host's waits for the device: the progress figures and the loss check


def new_run_dir(cfg: Config) -> tuple[Path, bool]:
    """`project/name`, numbered (`name-2`, ...) when taken, unless `exist_ok`; and whether this call made it
    (under `exist_ok` it may be an existing folder, which a failed run must not remove)."""
    base = cfg.train.name or f"{cfg.model.name}-{Path(cfg.data.root).resolve().name}"
    root = Path(cfg.train.project)
    path, n = root / base, 1
    path.parent.mkdir(parents=True, exist_ok=True)  # a name may hold folders: group/run
    while True:
        try:  # mkdir claims the name, so two runs started at once cannot share it
            path.mkdir()
            return path, True
        except FileExistsError:
            if cfg.train.exist_ok and path.is_dir():
                return path, False
            n += 1
            path = root / f"{base}-{n}"


def update_ema(ema: AveragedModel, model: nn.Module, decay: float) -> None:
    """One EMA step with timm's warm-up (early on, the average follows the weights faster). Not
    `AveragedModel.update_parameters`, which reads its count back from the device at every step; the count
    stays on the host here."""
    n = int(ema.n_averaged)
    averaged = [*ema.module.parameters(), *ema.module.buffers()]
    current = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()] if n else []
        if floats:
            weight = 1 - min(decay, (1 + n) / (10 + n))
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not n or not a.is_floating_point():
                a.copy_(c.detach())
    ema.n_averaged += 1


class Trainer:
    """One training run. Build it from a config (or `Trainer.resume(run_dir)`), then call `fit()`.

    Set-up runs in the order the data dictates: the folder is scanned (or its recorded split read
    back), the auto recipe fills in what the user left open, then the model, the loaders and the
    optimiser are built from the resolved config.
    """

    def __init__(self, cfg: Config, *, run_dir: str | os.PathLike | None = None, callbacks: list[Callback] = (),
                 progress: bool = True, split_csv: str | os.PathLike | None = None,
                 state: dict[str, Any] | None = None):
        validate(cfg)
        if not cfg.data.root:
            raise ConfigError("no data folder given")
        self.cfg = cfg
        self.state = state  # a checkpoint being resumed: its architecture and preprocessing are the run's
        self.init_model = self._adopt_init() if cfg.model.init_from and state is None else None
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
                create_model(cfg.model.name, num_classes=2, **self._model_kwargs())
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
        """Scan the folder (or read back the recorded split) and let the auto recipe fill in the config."""
        cfg, d = self.cfg, self.cfg.data
        if split_csv is not None:
            self.scan = scan_recorded_split(d.root, split_csv, max_pixels=d.max_pixels)
            if self.scan.new_files:
                log.warning("%d file(s) were added to %s since the run started; they are left out (listed in "
                            "skipped.csv), so the recorded split stays as it was (start a new run to use them)",
                            len(self.scan.new_files), d.root)
        else:
            self.scan = scan_folder(d.root, val_split=d.val_split, seed=d.split_seed, max_pixels=d.max_pixels)
        if not self.scan.val:
            raise ConfigError("no validation images: set data.val_split above 0 or add a val folder")
        self.classes = self.scan.classes
        if cfg.recipe == "auto" and cfg.auto is None:
            from .auto import fit_recipe

            cfg.auto = fit_recipe(cfg, self.scan, pace=self._pace)
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

    def _model_kwargs(self) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.data
        small_input = m.small_input if m.small_input is not None else d.img_size <= 64
        return {**given_options(m), "small_input": small_input, "in_chans": d.in_chans}

    def _adopt_init(self) -> tuple[ResNet, dict[str, Any]]:
        """Load `--init`'s model: its architecture is the run's, and so are its input options unless set."""
        cfg = self.cfg
        model, meta = load_model(cfg.model.init_from)
        spec, pre = meta["arch"]["kwargs"], meta["preprocess"]
        arch = {"model.name": meta["arch"]["name"] or cfg.model.name,
                **{f"model.{k}": spec[k] for k in ARCHITECTURE if k in spec}}
        clash = [k for k in arch if k in cfg.user_set and get_option(cfg, k) != arch[k]]
        if clash:
            fixed = ", ".join(f"{k} {arch[k]}" for k in clash)
            raise ConfigError(f"{cfg.model.init_from} fixes the architecture ({fixed}): drop those options, or "
                              "start from weights with --pretrained")
        inputs = {"data.img_size": pre["img_size"], "data.in_chans": pre["in_chans"],
                  "data.interpolation": pre["interpolation"],
                  "data.crop_pct": round(pre["img_size"] / pre["resize_size"], 4)}
        for key, value in {**arch, **inputs}.items():
            if key not in cfg.user_set:
                set_option(cfg, key, value)
                cfg.user_set.append(key)
        return model, meta

    def _build_model(self) -> ResNet:
        if self.state is not None and "arch" in self.state:  # the checkpoint's own architecture (pruned, ...)
            model = build_from_arch(self.state["arch"], str(self.run_dir / "last.ckpt"))
        elif self.init_model is not None:
            model, meta = self.init_model
            if meta["classes"] != self.classes:
                log.info("--init model has %d classes (%s), this folder %d: a new classifier head",
                         len(meta["classes"]), ", ".join(meta["classes"][:5]), len(self.classes))
                model.reset_classifier(len(self.classes))
        else:
            model = create_model(self.cfg.model.name, pretrained=self.cfg.model.pretrained,
                                 num_classes=len(self.classes), **self._model_kwargs())
        model = model.to(self.device, memory_format=self.memory_format)
        if self.cfg.train.sync_bn and self.world.distributed:
            model = distributed.sync_batchnorm(model, self.device)
        return model

    def _pace(self, cfg: Config, steps: int = 2) -> float:
        """Training images/s of the model `cfg` describes, on random batches on this device (the RNG is
        left as it was, so the run's own initialisation does not depend on whether this was asked)."""
        import time

        d = cfg.data
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.init_model is not None:
                model = build_from_arch(arch_record(self.init_model[0]), str(cfg.model.init_from))
                if model.num_classes != len(self.classes):
                    model.reset_classifier(len(self.classes))
            else:
                model = create_model(cfg.model.name, num_classes=len(self.classes), **self._model_kwargs())
            model = model.to(self.device, memory_format=fmt).train()
            optimizer = build_optimizer(model, cfg.optim, default_lr(cfg.optim, d.batch_size))
            x = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=self.device).to(memory_format=fmt)
            y = torch.randint(0, len(self.classes), (d.batch_size,), device=self.device)
            best = math.inf
            for i in range(steps + 1):  # the first step warms up kernels and allocator
                t0 = time.perf_counter()
                with autocast(self.device, self.amp_dtype):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i:
                    best = min(best, time.perf_counter() - t0)
        return d.batch_size / best

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
        on_gpu = d.decode == "gpu"
        if on_gpu:
            self.train_set = EncodedDataset(self.scan.train, self.pre, cfg.augment, seed=cfg.train.seed,
                                            max_pixels=d.max_pixels)
            self.decoder = BatchDecoder(self.pre, self.device, [path for path, _ in self.scan.train], d.max_pixels)
        else:
            self.train_set = ImageDataset(self.scan.train, train_transform(self.pre, cfg.augment), self.pre,
                                          seed=cfg.train.seed, max_pixels=d.max_pixels)
            self.decoder = None
        self.val_set = ImageDataset(self.scan.val, eval_transform(self.pre), self.pre, max_pixels=d.max_pixels)
        in_memory = [self.val_set] if on_gpu else [self.train_set, self.val_set]
        cached = d.cache == "on" or (d.cache == "auto" and cache_bytes(
            [s for ds in in_memory for s in ds.samples], self.scan.sizes, self.pre) < CACHE_AUTO_BYTES)
        if cached:
            for ds in in_memory:
                ds.build_cache(self.progress)
        workers = resolve_workers(d.workers, cached and not on_gpu, self.world.local_size)
        shard = dict(rank=self.world.rank, world=self.world.size)
        self.train_loader = make_loader(self.train_set, d.batch_size, train=True, workers=workers,
                                        seed=cfg.train.seed, pin_memory=pin and not on_gpu,
                                        collate_fn=collate if on_gpu else None, **shard)
        self.val_loader = make_loader(self.val_set, d.batch_size, train=False, workers=workers,
                                      seed=cfg.train.seed, pin_memory=pin, **shard)
        self.mix = BatchMix(cfg.augment, len(self.classes))

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
        self.optimizer = build_optimizer(self.model, o, self.lr)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.steps_per_epoch = math.ceil(len(self.train_loader) / o.accum_steps)
        self.schedule = Schedule.create(o, t.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = AveragedModel(self.model, use_buffers=True) if t.ema else None
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]
        self.l1_weights = [p for p in self.trained_params if p.ndim > 1]
        self.bn_scales = [m.weight for m in self.model.modules()  # SyncBatchNorm too
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.requires_grad]
        if self.cfg.optim.l1_bn and not self.bn_scales:
            raise ConfigError("optim.l1_bn (network slimming) penalises batch-norm scales, and this model has none "
                              "to train (norm=groupnorm, or frozen)")
        self.criterion = self._build_criterion()
        self._setup_sparsity()
        for handle in getattr(self, "tap_hooks", []):
            handle.remove()
        cpu_bf16 = self.device.type == "cpu" and self.amp_dtype == torch.bfloat16
        self.tap_hooks = guard_padding_taps(self.model) if cpu_bf16 else []
        self.eval_model = torch.compile(self.model) if t.compile else self.model
        self.ddp = distributed.data_parallel(self.model, self.device) if self.world.distributed else None
        if self.ddp is None:
            self.fwd_model = self.eval_model
        else:
            self.fwd_model = torch.compile(self.ddp) if t.compile else self.ddp

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

    def _build_criterion(self) -> nn.Module:
        t = self.cfg.train
        if not t.teacher:
            return ClassificationLoss(t.label_smoothing)
        teacher, meta = load_model(t.teacher)
        if meta["classes"] != self.classes:
            raise ConfigError(f"the teacher {t.teacher} knows other classes ({', '.join(meta['classes'][:6])}) than "
                              f"{self.cfg.data.root} ({', '.join(self.classes[:6])}): distil from a model trained "
                              "on these classes")
        theirs, ours = meta["preprocess"], self.pre.to_dict()
        differ = [k for k in ("in_chans", "mean", "std") if theirs[k] != ours[k]]
        if differ:
            raise ConfigError(f"the teacher {t.teacher} expects other input ({', '.join(differ)}: "
                              f"{', '.join(str(theirs[k]) for k in differ)}; the student gets "
                              f"{', '.join(str(ours[k]) for k in differ)}): it must see the student's batches")
        if theirs["img_size"] != ours["img_size"]:
            log.warning("the teacher was trained at %d px and now sees the student's %d px", theirs["img_size"],
                        ours["img_size"])
        teacher = teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)

        def teach(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.amp_dtype):
                return teacher(x)
        return DistillationLoss(teach, t.kd_alpha, t.kd_temperature, t.label_smoothing)

    def model_changed(self) -> None:
        """The model's parameters were replaced (pruned, factorised): rebuild what holds or copies them."""
        self.model.to(self.device, memory_format=self.memory_format)
        self._setup_optim()

    # -- resume -----------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
               callbacks: list[Callback] = (), progress: bool = True) -> Trainer:
        """Continue a run from its `last.ckpt`; only the options in RESUMABLE may change.

        A run stopped before its first checkpoint starts again from its `config.yaml`, on the split
        it recorded. Either way the run is locked against a second process for as long as it trains.
        """
        run_dir = Path(run_dir)
        world = distributed.join()
        lock = None
        try:
            if world.main:  # its files are read once, by the process that writes them
                lock, state, cfg = cls._read_run(run_dir, overrides)
            state, cfg = world.broadcast((state, cfg) if world.main else None)
            split = run_dir / "split.csv"
            trainer = cls(cfg, run_dir=run_dir, callbacks=callbacks, progress=progress,
                          split_csv=split if split.is_file() else None, state=state)
            if state is not None:
                trainer._load_state(state)
                trainer.state = None
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.lock = lock
        return trainer

    @staticmethod
    def _read_run(run_dir: Path, overrides: dict[str, Any] | None) -> tuple[RunLock, dict[str, Any] | None, Config]:
        """Lock the run, then read its checkpoint (or its config.yaml when it has none) and apply the overrides."""
        ckpt, config_file = run_dir / "last.ckpt", run_dir / "config.yaml"
        if not ckpt.is_file() and not config_file.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {ckpt}")
        lock = RunLock(run_dir)
        try:
            if ckpt.is_file():
                state = load_checkpoint(ckpt)
                cfg = merge(Config(), state["config"], str(ckpt))
            else:
                state = None
                cfg = merge(Config(), load_yaml(config_file), str(config_file))
                log.warning("%s has no checkpoint (it stopped before its first epoch was saved): starting it again "
                            "from its config.yaml", run_dir)
            for key, value in (overrides or {}).items():
                key = resolve_key(key)
                if key not in RESUMABLE:
                    raise ConfigError(f"{key} cannot change when resuming (only {', '.join(sorted(RESUMABLE))}); "
                                      f"start a new run, e.g. with --pretrained {run_dir}/best.safetensors")
                merge(cfg, {key: value})
        except BaseException:
            lock.release()
            raise
        return lock, state, cfg

    def _load_state(self, state: dict[str, Any]) -> None:
        classes = state["data"]["classes"]
        if classes != self.classes:
            raise CheckpointError(f"the classes in {self.cfg.data.root} changed since the run started "
                                  f"({', '.join(classes)} then, {', '.join(self.classes)} now); start a new run")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the run did not use fp16 (it may now, on another device)
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        finished = state["finished"]
        self._check_extension(finished)
        schedule = Schedule.from_state_dict(state["schedule"])
        self.schedule = schedule.resized(self.step, self.cfg.train.epochs * self.steps_per_epoch, finished)
        if finished:
            log.info("extending a finished run: a new cosine cycle over epochs %d-%d", self.epoch + 1,
                     self.cfg.train.epochs)
            self.bad_epochs = 0
        if self.world.main:
            self._recover_best()
        self.best = self.world.broadcast(self.best)
        set_rng_state(state["rng"])

    def _check_extension(self, finished: bool) -> None:
        """A resumed run must have something left to do: epochs, or time under its limit."""
        t = self.cfg.train
        if t.time_limit:
            left = t.time_limit * 60 - self.time_spent
            if left <= 0:
                raise ConfigError(f"this run has used its {t.time_limit:g}-minute time limit; pass a larger "
                                  "--time-limit to train further (or --time-limit 0 with --epochs N)")
            if finished or t.epochs <= self.epoch:  # a first plan, refitted by the budget once the pace is known
                t.epochs = self.epoch + max(1, round(left / (self.time_spent / max(1, len(self.history)))))
        elif t.epochs <= self.epoch:
            raise ConfigError(f"this run already trained {self.epoch} epochs; pass --epochs above {self.epoch} "
                              "to train further")

    def _recover_best(self) -> None:
        """A best model that is gone or unreadable is rewritten when the checkpoint holds it, else forgotten."""
        if self.best["epoch"] is None:
            return
        path = self.run_dir / "best.safetensors"
        try:
            load_model(path)
            return
        except CheckpointError as e:
            problem = str(e)
        if self.best["epoch"] == self.history[-1]["epoch"]:
            which = self.best["weights"]
            model = self.ema.module if which == "ema" else self.model
            save_model(model, path, self.model_meta(self.history[-1], which))
            log.warning("%s; rewritten from last.ckpt (epoch %d)", problem, self.best["epoch"])
        else:
            log.warning("%s, and last.ckpt holds epoch %d, not the best epoch %d: that model is lost; the best "
                        "epoch from now on is saved in its place", problem, self.history[-1]["epoch"],
                        self.best["epoch"])
            self.best = {"score": None, "epoch": None, "weights": None}

    @property
    def time_spent(self) -> float:
        """Seconds the run has trained so far, in every session (what its time limit counts)."""
        return sum(r["epoch_time_s"] for r in self.history)

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                "finished": self.finished, "rng": rng_state(), "config": self.cfg.to_dict(),
                "arch": arch_record(self.model), "preprocess": self.pre.to_dict(),
                "data": {"classes": self.classes}, "version": __version__}

    # -- the loop ---------------------------------------------------------------------------------
    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            cb(event, self)

    # -- one step: the seam that lr-find, distillation and quantisation-aware training plug into --------
    def prepare_batch(self, x: torch.Tensor | EncodedBatch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader's batch on the device (decoded there, for data.decode gpu), in the run's layout, mixed
        (MixUp/CutMix) when the recipe says so."""
        if isinstance(x, EncodedBatch):
            x = self.decoder(x)
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return self.mix(x, y.to(self.device, non_blocking=True))

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a prepared batch: the training forward pass, the criterion and the L1 penalty."""
        with autocast(self.device, self.amp_dtype):
            logits = self.fwd_model(x)
            loss = self.criterion(logits.float(), y, x)
        o = self.cfg.optim
        if o.l1:
            loss = loss + o.l1 * sum(w.abs().sum() for w in self.l1_weights)
        if o.l1_bn:
            loss = loss + o.l1_bn * sum(w.abs().sum() for w in self.bn_scales)
        return loss, logits

    def backward(self, loss: torch.Tensor, first: bool) -> None:
        """Accumulate the gradient of one micro-batch; `first` clears the last step's gradients."""
        if first:  # just before backward, not after the step: backward then reuses the freed
            self.optimizer.zero_grad(set_to_none=True)  # memory instead of faulting in new pages (8% on CPU)
        self.scaler.scale(loss / self.cfg.optim.accum_steps).backward()

    def optimizer_step(self, lr_factor: float) -> None:
        """One optimiser step at `lr_factor` x the base rates, with the recipe's gradient clipping."""
        apply_lr(self.optimizer, self.base_lrs, lr_factor)
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained_params, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _train_epoch(self, epoch: int, budget: TimeBudget | None) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        accum = cfg.optim.accum_steps
        set_train_mode(self.model, self.frozen)
        self.train_loader.sampler.set_epoch(epoch)
        n_batches = len(self.train_loader)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x images, top-1 hits
        pending: list[tuple[int, int, torch.Tensor]] = []  # (batch, step, loss) not yet checked to be finite
        loss_sum, correct, seen, first_step = 0.0, 0.0, 0, self.step
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
                x, y = self.prepare_batch(x, y)
                loss, logits = self.compute_loss(x, y)
                self.backward(loss, first=i % accum == 0)
            pending.append((i, self.step, loss.detach()))
            totals += torch.stack([loss.detach().double() * len(x), topk_hits(logits.detach(), y, (1,))[0]])
            seen += len(x)
            if stepped:
                self.optimizer_step(self.schedule.factor(self.step))
                if self.ema is not None:
                    update_ema(self.ema, self.model, self.cfg.train.ema_decay)
                self.step += 1
                self._emit("step_end")
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == n_batches:
                self._check_losses(pending, epoch)
                pending = []
                loss_sum, correct = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}",
                                lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}",
                                img_s=f"{seen / max(_budget.clock() - start, 1e-9):.0f}")
            self._emit("batch_end")
            if stepped and budget is not None and self._fit_to_budget(budget, self.step - first_step):
                if i + 1 < n_batches:
                    log.info("time limit: the epoch ends after %d of %d batches", i + 1, n_batches)
                break
        self._check_losses(pending, epoch)
        loss_sum, correct = totals.tolist()
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through validation and saving
        elapsed = _budget.clock() - start
        loss_sum, correct, seen = self.world.sum([loss_sum, correct, seen])  # the global batches' figures
        return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                "lr": self.optimizer.param_groups[-1]["lr"], "img_per_s": seen / max(elapsed, 1e-9),
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
        """Loss, top-1 and top-5 of the model (and its EMA) on the validation split, each process
        evaluating its share of it."""
        row = {}
        self.world.share_buffers(self.model)
        if self.ema is not None:
            self.world.share_buffers(self.ema)
        models = [("val", self.eval_model)] + ([("ema_val", self.ema.module)] if self.ema is not None else [])
        for prefix, model in models:
            was_training = model.training
            model.eval()
            try:
                logits, targets = infer(self._forward(model), self.val_loader)
            finally:
                model.train(was_training)
            k = topk_correct(logits, targets, (1, 5)) if len(targets) else {1: 0, 5: 0}
            loss = F.cross_entropy(logits, targets, reduction="sum").item() if len(targets) else 0.0
            loss, top1, top5, n = self.world.sum([loss, k[1], k[5], len(targets)])
            row[f"{prefix}_loss"], row[f"{prefix}_top1"], row[f"{prefix}_top5"] = loss / n, top1 / n, top5 / n
        return row

    def _forward(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Validation's forward pass: the batch on the device, in the run's layout and precision."""
        @torch.no_grad()
        def forward(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            with autocast(self.device, self.amp_dtype):
                return model(x).float()
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
        if self.best["score"] is not None and score <= self.best["score"]:
            self.bad_epochs += 1
            return False
        self.best = {"score": score, "epoch": row["epoch"], "weights": which}
        self.bad_epochs = 0
        if self.world.main:
            model = self.ema.module if which == "ema" else self.model
            save_model(model, self.run_dir / "best.safetensors", self.model_meta(row, which))
        return True

    def model_meta(self, row: dict[str, float], which: str) -> dict[str, Any]:
        """What the sidecar of a saved model records besides its architecture."""
        prefix = "ema_val" if which == "ema" else "val"
        return {"classes": self.classes, "preprocess": self.pre.to_dict(),
                "metrics": {k.replace(prefix, "val"): v for k, v in row.items() if k.startswith(prefix + "_")},
                "trained": {"run": str(self.run_dir.resolve()), "epoch": row["epoch"], "weights": which,
                            "data": str(Path(self.cfg.data.root).resolve()),
                            "pretrained": self.cfg.model.pretrained, "resforge": __version__,
                            "torch": torch.__version__}}

    def _write_run_files(self) -> None:
        write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        write_json(self.run_dir / "classes.json", self.classes)
        self.scan.write_split_csv(self.run_dir / "split.csv")
        if self.scan.skipped:
            self.scan.write_skipped_csv(self.run_dir / "skipped.csv")

    def _prepare_run_dir(self) -> None:
        """Clear what a kill left half-written, then write what is known before the first epoch."""
        for stale in self.run_dir.rglob(".*.tmp"):  # io.atomic_path names its temp files so
            with contextlib.suppress(OSError):
                stale.unlink()
        self._write_run_files()
        self._write_metrics()
        if self.scan.skipped:
            log.warning("skipped %d unreadable or non-image file(s); see %s", len(self.scan.skipped),
                        self.run_dir / "skipped.csv")
        if self.world.distributed:
            log.info("training in %d processes (%s); run directory %s", self.world.size,
                     "gloo" if self.device.type == "cpu" else "nccl", self.run_dir)

    def _write_metrics(self) -> None:
        path = self.run_dir / "metrics.csv"
        if not self.history:  # a restart: rows of an epoch that was never checkpointed go
            path.unlink(missing_ok=True)
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        write_csv(path, keys, ([row.get(k, "") for k in keys] for row in self.history))

    def _log_epoch(self, row: dict[str, float]) -> None:
        parts = [f"epoch {row['epoch']}/{self.cfg.train.epochs}",
                 f"train loss {row['train_loss']:.3f} acc {row['train_top1']:.1%}",
                 f"val loss {row['val_loss']:.3f} top1 {row['val_top1']:.1%} "
                 f"top{min(5, len(self.classes))} {row['val_top5']:.1%}"]
        if "ema_val_top1" in row:
            parts.append(f"ema top1 {row['ema_val_top1']:.1%}")
        parts.append(f"lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")
        log.info("  ".join(parts))

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
            self._prepare_run_dir()
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
                    self._write_metrics()
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
