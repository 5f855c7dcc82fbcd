"""Blocks shared by both model families."""

from detectkit.nn.conv import BN_EPS, BN_MOMENTUM, ConvBNAct, batch_norm, conv_bn_kernel, fuse_conv_bn
from detectkit.nn.dfl import DFL

__all__ = ["BN_EPS", "BN_MOMENTUM", "ConvBNAct", "DFL", "batch_norm", "conv_bn_kernel", "fuse_conv_bn"]
