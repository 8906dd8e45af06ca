"""Base class of every compression method.

A method names the decoder layers after which it acts (``stage_layers``) and, at each of them, turns the
current sequence into a shorter one (``reduce``). The engine (``lightkv.engine``) does everything that is
about models: finding vision tokens, gathering positions and masks, keeping the cache consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core import MergeResult

if TYPE_CHECKING:
    from ..engine import Handle, StageContext

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
        """Decoder layers after whose output the method shortens the sequence, ascending.

        -1 means before decoder layer 0: the stage runs on the input embeddings, so every decoder layer sees
        (and caches) the shortened sequence.
        """
        raise NotImplementedError

    @property
    def needs_attention(self) -> bool:
        """Whether ``reduce`` reads queries/keys of the stage layer (the engine then captures them)."""
        return False

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError when the method does not fit a decoder of ``num_layers`` layers."""
        for layer in self.stage_layers:
            if layer < -1:
                raise ValueError(f"stage layer {layer} does not exist: valid stage layers are -1 (before the "
                                 f"decoder) and 0..{num_layers - 1}")
            if layer >= num_layers:
                raise ValueError(
                    f"stage layer {layer} does not exist: the model has {num_layers} decoder layers "
                    f"(valid layers are 0..{num_layers - 1})")

    def install(self, handle: "Handle") -> list[Any]:
        """Register extra hooks the method needs (e.g. on the vision encoder); called once by ``apply``.

        Called after the engine registered its own hooks, so a method hook on the same module (e.g. the entry
        module) runs after the engine's. Returns the hook handles; ``Handle.remove()`` removes them with the
        engine's own. A hook finds the state of the prefill in progress with ``handle.prefill_state()`` and may
        leave data for ``reduce`` in its ``method_state`` dict (visible as ``ctx.method_state``). Raise
        ValueError, before registering anything, when the model cannot support the method; ``apply`` then
        removes the engine's hooks and re-raises.
        """
        return []

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        """Decide which tokens of the current sequence survive stage ``stage`` and their new hidden states.

        ``MergeResult.destination`` of a token that is not kept names the kept slot it was merged into; a
        pruned token (merged nowhere) points at itself, and the engine then sends its position in the
        full-length output to the last kept slot before it (or the row's first kept slot).
        """
        raise NotImplementedError
