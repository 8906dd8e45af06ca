"""Matched budgets: configure any method so that its average retained vision fraction over all decoder layers
hits a target (``match_budget``). The implementation lives with the methods (``lightkv.methods._budget``), whose
budget matchers use it; this module is its public home."""

from .methods._budget import (BudgetMatch, Matcher, budget_methods, match_budget, place_layers,
                              predict_kept_per_layer, register_budget, search_schedule)

__all__ = ["BudgetMatch", "Matcher", "match_budget", "register_budget", "budget_methods", "predict_kept_per_layer",
           "search_schedule", "place_layers"]
