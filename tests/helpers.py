"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import socket

import torch


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def dead_url(path: str = "x.pth") -> str:
    """A URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"
