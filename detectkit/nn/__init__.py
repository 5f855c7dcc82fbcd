"""Blocks shared by both model families."""

from detectkit.nn.conv import BN_EPS, BN_MOMENTUM, ConvBNAct, batch_norm, conv_bn_kernel, fuse_conv_bn
from detectkit.nn.csp import CSPBottleneck, CSPLayer
from detectkit.nn.dfl import DFL
from detectkit.nn.qarepvgg import QARepVGGBlock
from detectkit.nn.spp import SPP

__all__ = [
    "BN_EPS", "BN_MOMENTUM", "CSPBottleneck", "CSPLayer", "ConvBNAct", "DFL", "QARepVGGBlock", "SPP",
    "batch_norm", "conv_bn_kernel", "fuse_conv_bn",
]
