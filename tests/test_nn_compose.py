"""detectkit.nn.conv.compose_1x1: two linear convolutions with nothing between them are one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from detectkit.nn.conv import compose_1x1


@pytest.mark.parametrize("k, stride", [(1, 1), (3, 1), (3, 2)])
def test_composed_conv_equals_the_two_in_sequence(k, stride):
    torch.manual_seed(0)
    first = nn.Conv2d(8, 12, k, stride, padding=k // 2)
    second = nn.Conv2d(12, 5, 1)
    x = torch.randn(2, 8, 9, 11)
    one = compose_1x1(first, second)
    assert (one.in_channels, one.out_channels, one.kernel_size, one.stride) == (8, 5, (k, k), (stride, stride))
    with torch.no_grad():
        torch.testing.assert_close(one(x), second(first(x)), rtol=1e-5, atol=1e-5)


def test_by_hand():
    """y = 2 * (3x + 1) - 1 = 6x + 1 on one channel."""
    first, second = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        first.weight.fill_(3.0), first.bias.fill_(1.0), second.weight.fill_(2.0), second.bias.fill_(-1.0)
    one = compose_1x1(first, second)
    assert one.weight.item() == 6.0 and one.bias.item() == 1.0


def test_refuses_what_is_not_a_plain_1x1():
    with pytest.raises(ValueError, match="plain 1x1"):
        compose_1x1(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="ungrouped"):
        compose_1x1(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="channel mismatch"):
        compose_1x1(nn.Conv2d(4, 6, 1), nn.Conv2d(4, 2, 1))
