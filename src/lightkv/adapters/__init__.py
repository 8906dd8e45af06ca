"""One adapter per model family; ``get_adapter`` picks the one that fits a model."""

from __future__ import annotations

from torch import nn

from .base import Adapter, VisionLayout
from .llava import LlavaAdapter
from .qwen import Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter

__all__ = ["Adapter", "VisionLayout", "ADAPTERS", "SUPPORTED_FAMILIES", "get_adapter"]

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)
SUPPORTED_FAMILIES = {a.family: a.model_classes for a in ADAPTERS}


def get_adapter(model: nn.Module) -> Adapter:
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    supported = "; ".join(f"{family}: {', '.join(classes)}" for family, classes in SUPPORTED_FAMILIES.items())
    raise TypeError(f"lightkv does not support {type(model).__name__}. Supported model families: {supported}")
