"""Where the bundled models lie: package data inside the installed ``lightkv`` package (``lightkv/models/``).

Kept apart from ``lightkv.evaluation`` and ``lightkv.perf``, which both need the paths, so that neither package
imports the other for them. Only paths: nothing is loaded here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODELS_DIR", "BUNDLED_MODEL", "BUNDLED_QWEN_MODEL"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL = MODELS_DIR / "tiny-llava-shapes"  # LlavaForConditionalGeneration, trained on the shapes QA set
BUNDLED_QWEN_MODEL = MODELS_DIR / "tiny-qwen2.5-vl-shapes"  # Qwen2_5_VLForConditionalGeneration, the same data
