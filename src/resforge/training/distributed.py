"""Training on several processes with PyTorch's own engine: torchrun's elastic agent starts them, DDP
averages their gradients.

The world size is not part of the experiment: `data.batch_size` is the global batch and each rank
takes its slice of every global batch of the seeded epoch permutation (`data.loader.EpochSampler`),
so 1, 2 or 8 processes see the same batches, augmented the same way, and a checkpoint written by
any of them resumes in any other. Rank 0 scans the folder, fits the recipe and writes every file;
the others receive what it found.

`resforge train --devices N` (or `train(..., devices=N)`) launches the processes itself through
torch's `elastic_launch`; `torchrun --nproc-per-node N -m resforge train ...` does the same from
outside, and across machines with `--nnodes`, `--rdzv-backend c10d` and `--rdzv-endpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..device import cpu_cores
from ..errors import ConfigError, ResforgeError, TrainingError

log = logging.getLogger("resforge")
# How long a process waits in a collective: the others wait while rank 0 scans a large folder once.
TIMEOUT = timedelta(hours=1)
# A failing process that is only a consequence (its peer died) waits this long before exiting, so that the
# launcher, which reports the first failure it sees, names the cause.
CONSEQUENCE_DELAY_S = 3.0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one when not launched)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """What the launcher (torchrun or `launch`) put in the environment."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank (passed through the CPU group: scans, configs, checkpoints)."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (metrics that do not add up, such as COCO AP)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (batch norm's running statistics) on every rank: each rank updated its own copy
        from its slice of the last batch, and rank 0's model is the one saved."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def join() -> World:
    """Join the process group the launcher described in the environment (once per process). Collectives
    on CPU tensors go through gloo, CUDA tensors through NCCL; loggers of ranks other than 0 keep to errors."""
    world = World.from_env()
    if not world.distributed or dist.is_initialized():
        return world
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    if not world.main:
        log.setLevel(logging.ERROR)
    if "OMP_NUM_THREADS" not in os.environ:  # the processes on this machine share its cores
        torch.set_num_threads(max(1, cpu_cores() // world.local_size))
    return world


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """Each process of a CUDA job takes the GPU of its local rank."""
    if not world.distributed or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"{world.local_size} processes on this machine, but it has {torch.cuda.device_count()} "
                          "GPU(s): one process per GPU")
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the model (rank 0's weights are copied to the others as it is built)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch statistics over the global batch, not each rank's slice of it (torch's SyncBatchNorm: CUDA only)."""
    if device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU); "
                          "on the CPU each process normalises its own slice of the batch")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def grad_sync(ddp: nn.Module | None, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: DDP averages gradients only on the last of an accumulation."""
    return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()


def launched() -> bool:
    """This process is one of several a launcher started."""
    return World.from_env().distributed


def launch(fn: Callable[..., Any], kwargs: dict[str, Any], devices: int) -> Any:
    """Run `fn(**kwargs)` in `devices` processes on this machine with torch's elastic launcher; return rank
    0's result. A process that fails or dies stops the others; its rank and reason are raised here."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    try:
        pickle.dumps(kwargs)
    except Exception as e:
        raise ConfigError(f"with devices > 1 every argument goes to other processes, and one cannot be "
                          f"pickled ({e}): give module-level functions as callbacks") from None
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn")
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith(("torch.distributed", "torch.multiprocessing"))]
    levels = [q.level for q in quiet]
    for q in quiet:  # the launcher's report of a failure is ours to give, once
        q.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _worker)(fn, kwargs, log.getEffectiveLevel())
    except SignalException:  # Ctrl-C or a SIGTERM to the launcher: it has stopped the processes
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise _failure_error(rank, devices, failure) from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return results[0]


def _worker(fn: Callable[..., Any], kwargs: dict[str, Any], level: int) -> Any:
    """One launched process: the parent's log format and level, then the work."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(level)
    try:
        return fn(**kwargs)
    except ResforgeError:
        raise
    except Exception:  # a bug, or a peer's death seen through a collective: let a dying peer be seen first
        time.sleep(CONSEQUENCE_DELAY_S)
        raise


def _failure_error(rank: int, size: int, failure: Any) -> Exception:
    """The launcher's report of a failed process: one of our errors keeps its class and text, a death names
    its signal, anything else (a bug) carries the process's traceback."""
    from .. import errors

    where = f"training process {rank} of {size} (pid {failure.pid})"
    if failure.exitcode < 0:
        return TrainingError(f"{where} died ({failure.signal_name()}); the others were stopped. The run's "
                             "last.ckpt holds its last finished epoch: continue with resforge train --resume RUN_DIR")
    data = failure.message if isinstance(failure.message, dict) else {"message": str(failure.message)}
    kind, _, text = data["message"].partition(": ")
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ResforgeError):
        error = cls.__new__(cls)  # the text as raised (ImageError's reason is not part of it)
        Exception.__init__(error, text)
        return error
    trace = data.get("extraInfo", {}).get("py_callstack", "")
    return RuntimeError(f"{where} failed: {data['message']}\n{trace}".rstrip())
