"""Goodness-of-fit helpers for the statistical tests of lossless sampling."""
from __future__ import annotations

import numpy as np
from scipy import stats


def chi2_pvalue(counts, probs) -> float:
    """Pearson chi-square p-value of observed counts [V] against exact probabilities [V].

    Cells with zero expected probability must have zero counts (otherwise p-value 0).
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if np.any(counts[probs <= 0] > 0):
        return 0.0
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(stats.chisquare(counts[keep], expected).pvalue)
