"""Replacement modules that passes put into a model, and the registry that rebuilds them.

Every module a pass inserts into a user's model is an instance of a class registered here.
Its constructor keyword arguments are returned by :meth:`SurgeryModule.spec` as plain JSON
data, so a surgered model is saved as *base architecture + (path, class, spec) list +
safetensors weights* and rebuilt without pickle:

>>> import torch
>>> from surgery.modules import LowRankLinear, build
>>> m = LowRankLinear(8, 4, rank=2)
>>> rebuilt = build(m.registry_name(), m.spec())
>>> rebuilt.load_state_dict(m.state_dict())
<All keys matched successfully>
>>> x = torch.randn(3, 8)
>>> bool(torch.equal(rebuilt(x), m(x)))
True
"""

from __future__ import annotations

from surgery.modules.attention import GroupedAttention
from surgery.modules.conv3d import Conv2Plus1d, Conv3dAs2d
from surgery.modules.grouped_heads import GroupedHeadsLinear
from surgery.modules.identity import IdentitySublayer
from surgery.modules.lowrank_conv import LowRankConv2d
from surgery.modules.lowrank_linear import LowRankLinear
from surgery.modules.registry import SurgeryModule, build, register_module, registered
from surgery.modules.sparse import DenseSparseLinear, SparseLinear
from surgery.modules.token_skip import TokenSkipLayers
from surgery.modules.tucker_conv import TuckerConv2d

__all__ = [
    "Conv2Plus1d",
    "Conv3dAs2d",
    "DenseSparseLinear",
    "GroupedAttention",
    "GroupedHeadsLinear",
    "IdentitySublayer",
    "LowRankConv2d",
    "LowRankLinear",
    "SparseLinear",
    "SurgeryModule",
    "TokenSkipLayers",
    "TuckerConv2d",
    "build",
    "register_module",
    "registered",
]
