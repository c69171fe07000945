"""The normalised input z of a norm layer (LayerNorm or RMSNorm), whose output is w * z (+ b): the
factor a factored sketch multiplies the output gradient with to get the norm weight's gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import BadInputError


def normalised_input(use: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """z with out == w * z (+ b), from the module's input (``use``: the call record of a norm module,
    with ``module`` and ``checked``); verified against the module's output on its first call."""
    module = use.module
    xf = x.float()
    if isinstance(module, nn.LayerNorm):
        z = nn.functional.layer_norm(xf, module.normalized_shape, eps=module.eps)
    else:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        z = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if not use.checked:
        if isinstance(module, nn.LayerNorm):
            expected = z * module.weight.float() if module.weight is not None else z
            if module.bias is not None:
                expected = expected + module.bias.float()
        else:
            expected = module.weight.float() * z.to(x.dtype).float()
        tol = 1e-4 if x.dtype == torch.float32 else 2e-2
        if not torch.allclose(expected, out.float(), rtol=tol, atol=tol):
            raise BadInputError(f"factored mode cannot reproduce {type(module).__name__} (out != w * normalised "
                                "input); leave its parameters out with --params")
        use.checked = True
    return z
