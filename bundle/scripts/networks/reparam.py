"""Re-parameterised training of 3x3 convolutions (ECBSR-style), folded into plain convolutions.

A network's 3x3 convolutions are trained over-parameterised, as the sum of several linear branches
(Zhang et al., "Edge-oriented Convolution Block for Real-time Super Resolution on Mobile Devices",
ACM MM 2021; RepVGG, Ding et al. 2021):

- the 3x3 kernel itself;
- a 1x1 kernel (on the centre tap);
- a 1x1 expansion to ``expansion`` x the input channels followed by a 3x3 kernel;
- 1x1 kernels followed by fixed Sobel-x, Sobel-y and Laplacian filters with learned per-channel
  scales (the edge branches);
- where input and output channels agree, the identity with a learned per-channel scale.

Every branch is linear and bias-free (one bias for the sum), so their sum is one 3x3 kernel. Unlike
ECBSR, the branches are summed into that kernel at every forward pass ("online" folding), so a
training step costs one convolution per layer, as the plain network's does; what changes is the
optimisation (the over-parameterised gradient), not the function class. :func:`fold` replaces each
:class:`RepConv2d` by the ``nn.Conv2d`` it computes: the folded network has the plain network's
weights (the same state-dict keys and shapes) and runs at its speed, so a prior trained this way is
used by ``predict`` and fine-tuned by the bundle as any other.

Every branch other than the 3x3 one starts at zero output, so :func:`expand` leaves the network's
function unchanged (a warm start from plain weights continues from them).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

EDGE_FILTERS = {
    "sobel_x": ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),
    "sobel_y": ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),
    "laplacian": ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0)),
}


class RepConv2d(nn.Module):
    """A 3x3, stride-1, padding-1 convolution trained as a sum of linear branches (module docs).

    Args:
        conv: the plain convolution it replaces; its weights become the 3x3 branch.
        expansion: channels of the 1x1-then-3x3 branch, as a multiple of the input channels.
    """

    def __init__(self, conv: nn.Conv2d, expansion: int = 2):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError(f"RepConv2d replaces 3x3 stride-1 padding-1 convolutions, not {conv}")
        c_in, c_out = conv.in_channels, conv.out_channels
        hidden = max(expansion * c_in, 1)
        self.k3 = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone() if conv.bias is not None else torch.zeros(c_out))
        self.k1 = nn.Parameter(torch.zeros(c_out, c_in))
        # the expansion's first factor starts random, its second at zero: the branch adds nothing at
        # first and both factors get gradients (two zero factors would never move)
        self.expand_in = nn.Parameter(torch.empty(hidden, c_in))
        nn.init.kaiming_uniform_(self.expand_in, a=5**0.5)
        self.expand_out = nn.Parameter(torch.zeros(c_out, hidden, 3, 3))
        self.edge_in = nn.Parameter(torch.empty(len(EDGE_FILTERS), c_out, c_in))
        nn.init.kaiming_uniform_(self.edge_in, a=5**0.5)
        self.edge_scale = nn.Parameter(torch.zeros(len(EDGE_FILTERS), c_out))
        self.register_buffer(
            "edges", torch.tensor(list(EDGE_FILTERS.values()), dtype=conv.weight.dtype), persistent=False
        )
        self.identity_scale = nn.Parameter(torch.zeros(c_out)) if c_in == c_out else None

    def kernel(self) -> torch.Tensor:
        """The one (out, in, 3, 3) kernel the branches sum to."""
        k = self.k3 + torch.einsum("ohkl,hi->oikl", self.expand_out, self.expand_in)
        k = k + torch.einsum("eo,eoi,ekl->oikl", self.edge_scale, self.edge_in, self.edges)
        centre = self.k1
        if self.identity_scale is not None:
            centre = centre + torch.diag(self.identity_scale)
        return k + F.pad(centre[:, :, None, None], (1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, padding=1)

    def folded(self) -> nn.Conv2d:
        c_out, c_in = self.k3.shape[:2]
        conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(self.k3.device, self.k3.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            conv.bias.copy_(self.bias)
        return conv


def _is_plain_3x3(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding == (1, 1)
        and module.groups == 1
        and module.dilation == (1, 1)
    )


def expand(module: nn.Module, expansion: int = 2) -> int:
    """Replace every plain 3x3 convolution inside ``module`` by a :class:`RepConv2d` in place (the
    function is unchanged); returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if _is_plain_3x3(child):
            setattr(module, name, RepConv2d(child, expansion))
            count += 1
        else:
            count += expand(child, expansion)
    return count


def fold(module: nn.Module) -> nn.Module:
    """Replace every :class:`RepConv2d` inside ``module`` by its plain convolution, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, RepConv2d):
            setattr(module, name, child.folded())
        else:
            fold(child)
    return module


def folded_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The plain network's state dict of a module trained with :func:`expand` (``module`` is unchanged)."""
    return {k: v.detach().clone() for k, v in fold(copy.deepcopy(module)).state_dict().items()}
