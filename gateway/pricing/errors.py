"""`PricingError`: the one error of pricing, for a price table, a team's overrides or a
database entry that cannot be used (malformed, or not billable exactly in whole units)."""

from __future__ import annotations


class PricingError(ValueError):
    """A price table that cannot be used, saying what is wrong and where."""
