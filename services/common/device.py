"""Where the model services run their models, chosen once from ``MULTIMODAL_DEVICE``.

``cuda`` and ``cpu`` are taken as said; ``auto`` is CUDA where torch finds a GPU. torch is
imported only for ``auto`` (and by ``torch_device``): the LLaVA service's own process runs no
model, vLLM does, and asks only whether to size vLLM for a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from configuration.settings import get_settings

if TYPE_CHECKING:
    import torch


def uses_gpu() -> bool:
    """Whether this process's model runs on CUDA."""
    device = get_settings().device
    if device != "auto":
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def torch_device() -> torch.device:
    import torch

    return torch.device("cuda" if uses_gpu() else "cpu")


def gpu_resources() -> dict[str, Any]:
    """The BentoML ``resources`` a model service asks for: a GPU only when told to use one, since
    ``auto`` must also start on a machine without any."""
    return {"gpu": 1} if get_settings().device == "cuda" else {}
