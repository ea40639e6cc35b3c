"""What `resforge serve` is told: how it listens, batches and limits (its flags are generated from
`ServeOptions`' fields)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ...device import cpu_cores
from ...errors import ConfigError
from ...options import check_fields, option
from ...runtime.drift import DECAY, MIN_IMAGES, WINDOW, effective_size

API_KEY_ENV = "RESFORGE_API_KEY"


@dataclass
class ServeOptions:
    """How `resforge serve` listens, batches and limits (its flags are generated from these fields)."""
    host: str = option("127.0.0.1", "address to bind (any other needs --api-key)")
    port: int = option(8000, "port (0: a free port, logged)", ge=0, le=65535)
    backend: str = "auto"  # backend, precision, device: the flags every command that runs a model has
    precision: str = "auto"
    device: str = "auto"
    max_batch: int = option(16, "images per batch", ge=1, group="batching")
    max_wait_ms: float = option(5.0, "how long the oldest image waits for a fuller batch", ge=0, group="batching")
    queue: int = option(64, "images waiting, at most", ge=1, group="batching")
    workers: int = option(help="threads decoding images (default: the CPU cores)", factory=cpu_cores, ge=1,
                          group="batching")
    timeout: float = option(30.0, "seconds a request may take, unless it asks for less", gt=0, group="batching")
    max_bytes: int = option(20_000_000, "request body size", ge=1, group="limits and access")
    max_images: int = option(16, "images per request", ge=1, group="limits and access")
    max_pixels: int = option(50_000_000, "pixels an image may declare (read from its header, before decoding)",
                             ge=1, group="limits and access")
    max_aspect: float = option(20.0, "an image's long side over its short side, at most (read from its header, "
                                     "before decoding)", ge=1, group="limits and access")
    max_connections: int = option(512, "connections open at once; fewer where ulimit -n leaves room for fewer",
                                  ge=1, group="limits and access")
    api_key: str | None = option(None, f"required by every route but /health (default: ${API_KEY_ENV}); needed to "
                                       "bind anything but loopback", group="limits and access")
    cors: list[str] = option([], "allow browser calls from this origin (repeatable; default: none)", action="append",
                             metavar="ORIGIN", group="limits and access")
    docs: bool = option(False, "Swagger UI at /docs (the browser loads it from a CDN; /openapi.json is always "
                               "served)", group="limits and access")
    monitor: bool = option(True, "compare what the model is shown with its profile: drift gauges, /v1/monitor, "
                                 "an out-of-distribution score per image", group="monitoring")
    window: int = option(WINDOW, "recent images the drift is judged on", ge=2, group="monitoring")
    decay: float = option(DECAY, "weight of an image in the window relative to the next newer one (1: all equal)",
                          gt=0, le=1, group="monitoring")

    def check(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"))
        if self.max_images > self.queue:
            raise ConfigError(f"--max-images ({self.max_images}) must not exceed --queue ({self.queue}): such a "
                              "request could never be queued")
        if self.monitor and effective_size(self.window, self.decay) < MIN_IMAGES:
            raise ConfigError(f"--window {self.window} with --decay {self.decay:g} weighs as "
                              f"{effective_size(self.window, self.decay):.0f} images at most, under the {MIN_IMAGES} a "
                              "drift alarm needs: a larger window or less decay")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"binding {self.host} exposes the server beyond this machine: give --api-key (or set "
                              f"{API_KEY_ENV}), or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

