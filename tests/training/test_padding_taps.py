"""bf16 convolution backward on CPU leaves the gradient of taps that read only padding uninitialised."""

import pytest
import torch

from resforge.training.padding_taps import _touched, guard_padding_taps


def test_taps_that_read_only_padding_are_found():
    assert _touched(1, 3, 2, 1, 1).tolist() == [False, True, False]  # a 3x3 stride-2 conv on a 1x1 map
    assert _touched(2, 3, 2, 1, 1).tolist() == [False, True, True]
    assert _touched(4, 3, 2, 1, 1).tolist() == [True, True, True]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's bf16 path")
def test_their_gradient_is_exactly_zero_under_bf16_autocast():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3, 2, 1, bias=False).to(memory_format=torch.channels_last)
    guard_padding_taps(conv)
    for _ in range(5):
        junk = torch.full((64 * 32 * 9 * 50,), float("nan"))  # memory the allocator hands out next
        del junk
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(torch.randn(8, 32, 1, 1).to(memory_format=torch.channels_last))
        y.float().sum().backward()
        g = conv.weight.grad
        assert torch.isfinite(g).all()
        assert g[:, :, [0, 2]].abs().sum() == 0 and g[:, :, :, [0, 2]].abs().sum() == 0
        assert g[:, :, 1, 1].abs().sum() > 0
