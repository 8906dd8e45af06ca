"""One adapter per model family; ``get_adapter`` picks the one that fits a model.

A new family is one adapter file here and one line in ``ADAPTERS`` below; user code adds one with
``register_adapter`` (README: "Adding a model family").
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, VisionLayout, is_instance_of
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .internvl import InternVLAdapter
from .glm4v import Glm4vAdapter, Glm4vMoeAdapter, Glm46VAdapter
from .qwen import Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .mistral3 import Mistral3Adapter, PixtralLlavaAdapter
from .gemma3 import Gemma3Adapter
from .aya_vision import AyaVisionAdapter

__all__ = ["Adapter", "VisionLayout", "ADAPTERS", "SUPPORTED_FAMILIES", "get_adapter", "adapter_class_for_config",
           "register_adapter", "is_instance_of", "LlavaAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter",
           "Qwen3VLAdapter", "InternVLAdapter", "Glm4vAdapter", "Glm4vMoeAdapter", "Glm46VAdapter"]

# The registry, in matching order (the first adapter that fits a model wins). Changed in place only, by
# ``register_adapter``, so that every module holding a reference sees registrations.
ADAPTERS: list[type[Adapter]] = [LlavaAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, InternVLAdapter,
                                 Glm4vAdapter, Glm4vMoeAdapter, Glm46VAdapter]

ADAPTERS.extend([LlavaNextAdapter, LlavaOnevisionAdapter])
__all__ += ["LlavaNextAdapter", "LlavaOnevisionAdapter"]

# Pixtral-12B is a LlavaForConditionalGeneration with a Pixtral tower: its adapter is tried before LLaVA's
ADAPTERS.insert(ADAPTERS.index(LlavaAdapter), PixtralLlavaAdapter)
ADAPTERS.append(Mistral3Adapter)
__all__ += ["Mistral3Adapter", "PixtralLlavaAdapter"]

ADAPTERS.extend([Idefics3Adapter, SmolVLMAdapter])
__all__ += ["Idefics3Adapter", "SmolVLMAdapter"]

ADAPTERS.extend([Gemma3Adapter, AyaVisionAdapter])
__all__ += ["Gemma3Adapter", "AyaVisionAdapter"]

# family -> model class names, following ADAPTERS
SUPPORTED_FAMILIES: dict[str, tuple[str, ...]] = {}


def _refresh_families() -> None:
    families: dict[str, tuple[str, ...]] = {}
    for adapter_cls in ADAPTERS:
        known = families.get(adapter_cls.family, ())
        families[adapter_cls.family] = known + tuple(c for c in adapter_cls.model_classes if c not in known)
    SUPPORTED_FAMILIES.clear()
    SUPPORTED_FAMILIES.update(families)


_refresh_families()


def register_adapter(adapter_cls: type[Adapter], *, first: bool = True) -> type[Adapter]:
    """Make ``adapter_cls`` available to ``lightkv.apply`` (and ``get_adapter``); returns it, so it also works as
    a class decorator.

    first: try it before the built-in adapters (so it can take over a class they also match, e.g. a subclass
    of ``LlavaForConditionalGeneration``); False tries it last. Registering a class again moves it.
    """
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
        raise TypeError(f"register_adapter needs a subclass of lightkv.adapters.Adapter, got {adapter_cls!r}")
    if not adapter_cls.family or not isinstance(adapter_cls.family, str):
        raise ValueError(f"{adapter_cls.__name__}.family must be a non-empty string (the family's name)")
    if not adapter_cls.model_classes or isinstance(adapter_cls.model_classes, str):
        raise ValueError(f"{adapter_cls.__name__}.model_classes must be a non-empty tuple of model class names, "
                         f"got {adapter_cls.model_classes!r}")
    if adapter_cls in ADAPTERS:
        ADAPTERS.remove(adapter_cls)
    ADAPTERS.insert(0 if first else len(ADAPTERS), adapter_cls)
    _refresh_families()
    return adapter_cls


def _supported() -> str:
    return "; ".join(f"{family}: {', '.join(classes)}" for family, classes in SUPPORTED_FAMILIES.items())


def get_adapter(model: nn.Module) -> Adapter:
    """The first registered adapter whose ``model_classes`` ``model`` is an instance of; TypeError if none."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    raise TypeError(f"lightkv does not support {type(model).__name__}. Supported model families: {_supported()}")


def adapter_class_for_config(config: Any) -> type[Adapter] | None:
    """The first registered adapter for models built from ``config`` (by ``config.model_type``); None if none.

    For code that holds a config and no model (``Adapter.image_grid`` is a classmethod)."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches_config(config):
            return adapter_cls
    return None
