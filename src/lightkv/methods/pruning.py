"""Former home of the pruning helpers; they live in ``lightkv.methods._common`` (kept for old imports)."""

from ._common import (check_layer, check_layers, check_ratio, drop_count, keep_top_scored, kept_after_stages,
                      last_token_attention, merge_into_nearest)

__all__ = ["drop_count", "kept_after_stages", "keep_top_scored", "last_token_attention", "merge_into_nearest",
           "check_ratio", "check_layer", "check_layers"]
