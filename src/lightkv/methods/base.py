"""Base class of every compression method.

A method names the decoder layers after which it acts (``stage_layers``) and, at each of them, turns the
current sequence into a shorter one (``reduce``). The engine (``lightkv.engine``) does everything that is
about models: finding vision tokens, gathering positions and masks, keeping the cache consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core import MergeResult

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["Method", "POSITION_MODES"]

POSITION_MODES = ("original", "compact")


@dataclass
class Method:
    """Base class of every compression method.

    positions: "original" keeps each kept token's original position id (ours, default); "compact" renumbers
    positions 0..N'-1 after each stage, as the reference code does.
    """

    positions: str = field(default="original", kw_only=True)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the method shortens the sequence, ascending."""
        raise NotImplementedError

    @property
    def needs_attention(self) -> bool:
        """Whether ``reduce`` reads queries/keys of the stage layer (the engine then captures them)."""
        return False

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError when the method does not fit a decoder of ``num_layers`` layers."""
        for layer in self.stage_layers:
            if layer >= num_layers:
                raise ValueError(
                    f"stage layer {layer} does not exist: the model has {num_layers} decoder layers "
                    f"(valid layers are 0..{num_layers - 1})")

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        """Decide which tokens of the current sequence survive stage ``stage`` and their new hidden states."""
        raise NotImplementedError
