"""Dotted-name access to the tensors a module holds (``encoder.layer.0.query.weight``)."""

from __future__ import annotations

import torch


def owner_of(module: torch.nn.Module, name: str, create: bool = False) -> tuple[torch.nn.Module, str]:
    """The submodule that holds ``name`` and the attribute's own name; with ``create``, missing
    intermediate modules are added. KeyError when a part of the path does not exist."""
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        child = getattr(owner, part, None)
        if not isinstance(child, torch.nn.Module):
            if not create or child is not None:
                raise KeyError(f"the module has no tensor attribute '{name}'")
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    return owner, leaf


def has_attribute(module: torch.nn.Module, name: str) -> bool:
    """Whether anything (a tensor, a submodule, another attribute) is stored at the dotted ``name``."""
    try:
        owner, leaf = owner_of(module, name)
    except KeyError:
        return False
    return hasattr(owner, leaf)


def get_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or plain tensor attribute at ``name``; KeyError if there is none."""
    owner, leaf = owner_of(module, name)
    value = getattr(owner, leaf, None)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"the module has no tensor attribute '{name}'")
    return value


def set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor, as_parameter: bool) -> None:
    """Store ``value`` at ``name`` as a Parameter or as a buffer, replacing what was there."""
    owner, leaf = owner_of(module, name, create=True)
    if leaf in owner._modules:
        raise KeyError(f"'{name}' is a submodule, not a place for a tensor")
    if hasattr(owner, leaf) and leaf not in owner._parameters and leaf not in owner._buffers:
        delattr(owner, leaf)  # a plain attribute would shadow the registration
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    if as_parameter:
        parameter = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
        owner.register_parameter(leaf, parameter)
    else:
        owner.register_buffer(leaf, value)


def set_inference_flags(module: torch.nn.Module) -> None:
    """Mark every submodule as not training without calling ``eval()``, which exported modules refuse."""
    for sub in module.modules():
        sub.training = False
