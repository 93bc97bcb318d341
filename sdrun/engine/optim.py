"""The optimiser: SGD as in the reference code, stepped in as few kernels as torch offers.

torch's SGD has three implementations of the same update (weight decay, then momentum,
then the Nesterov look-ahead, then the parameter step):
- the per-parameter loop (torch's default on the CPU): ~5 small ops per parameter tensor;
- `foreach=True` (torch's default on CUDA): the same ops over all tensors at once,
  ~5 multi-tensor kernels per step;
- `fused=True`: the whole update in one multi-tensor kernel per step (CUDA, and a
  vectorised loop on the CPU).
ResNet-110 has 329 parameter tensors, so on a launch-bound GPU the loop costs ~1600 launches
per step and fused a handful. On the CPU, foreach is bit-identical to the loop, while the
fused CPU kernel rounds some elements differently in the last bit (seen: 1 ulp in a momentum
buffer after 6 steps; tests/test_optim.py). So `auto` is fused on CUDA, where launches are
the cost and the fused kernel's rounding is bounded by tests/test_cuda_speed.py, and foreach
elsewhere, which keeps the CPU's numbers exactly as they were.
"""

from __future__ import annotations

import torch

IMPLS = ("auto", "fused", "foreach", "loop")


def fused_supported(device: torch.device) -> bool:
    """Does this torch ship a fused SGD kernel for the device type?"""
    try:  # a private torch helper, imported where its absence can be answered
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older or newer torch without the helper: do not guess
        return False
    return device.type in _get_fused_kernels_supported_devices()


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown SGD implementation {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "fused" if device.type == "cuda" and fused_supported(device) else "foreach"
    return impl


def make_optimizer(model: torch.nn.Module, optim, impl: str = "auto") -> torch.optim.SGD:
    """SGD as in the reference code: Nesterov, dampening 0, weight decay on every parameter.

    Every parameter gets a zero gradient tensor up front and gradients are zeroed in place
    (never set to None), so a dropped block still receives weight decay and momentum on
    the steps it is skipped, as the Lua reference's optimizer did. (speed=graphs relies on
    this too: a replayed branch's gradients are added into these tensors, never aliased.)

    `impl` picks torch's implementation (module docstring); `auto` = fused on CUDA (where
    torch has the kernel), foreach elsewhere.
    """
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    device = params[0].device if params else torch.device("cpu")
    chosen = resolve_impl(impl, device)
    flags = {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
             "loop": {"fused": False, "foreach": False}}[chosen]
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, dampening=0.0,
                                weight_decay=optim.weight_decay, nesterov=optim.nesterov, **flags)

    # Optimizer.load_state_dict takes the param groups' flags from the checkpoint, so a
    # checkpoint written by another implementation (or before this module existed:
    # foreach=None, fused=None) would silently switch it back. The update is the same; the
    # kernel count is not: keep the one chosen here.
    def keep_flags(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(flags)

    optimizer.register_load_state_dict_post_hook(keep_flags)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
