"""Entry point of the lmms-eval model ``lightkv`` (group ``lmms_eval.models`` in pyproject.toml).

lmms-eval calls ``manifest()`` when it builds its model registry; the model class itself
(``lightkv.evaluation.lmms_model.LightKVModel``) is imported only when ``--model lightkv`` is asked for.
"""

from __future__ import annotations

__all__ = ["MODEL_ID", "CLASS_PATH", "manifest"]

MODEL_ID = "lightkv"
CLASS_PATH = "lightkv.evaluation.lmms_model.LightKVModel"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
