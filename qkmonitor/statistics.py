"""The per-head QK-eigenspectrum statistics, declared once (definitions: docs/metrics.md).

Plain data, no torch: the command line and the result read it before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_STATISTICS", "Statistic"]


@dataclass(frozen=True)
class Statistic:
    """One per-head statistic of docs/metrics.md. Derived from these declarations:
    qkmonitor.spectrum's HeadSpectra and HeadMoments, qkmonitor.result's HeadResult,
    LayerSummary and STATISTICS, the training monitor's SPECTRAL_STATISTICS, the audit's rows
    and the plots' labels. A new statistic is one line in ``HEAD_STATISTICS`` plus its math in
    ``qkmonitor.spectrum.head_spectra``."""

    name: str
    #: what it is, in one line
    description: str
    #: axis and title text in plots
    label: str
    #: what it is measured in (W's eigenvalues are logits of unit-norm tokens)
    unit: str
    #: whether it can be negative; an unsigned one is clamped at 0 (rounding) when computed
    signed: bool
    #: whether it needs an eigendecomposition (else ``head_moments`` gives it, cheaply)
    eigen: bool
    #: heatmaps default to a log colour scale (a non-negative magnitude with outliers)
    log_scale: bool = False
    #: layer summaries also carry its min and max across heads (``<name>_min``, ``<name>_max``)
    spread: bool = False


#: every per-head scalar statistic, in display order
HEAD_STATISTICS: tuple[Statistic, ...] = (
    Statistic("eig_mean", "mean eigenvalue of W^h, tr(W^h) / n", "eig_mean: mean eigenvalue",
              "logit", signed=True, eigen=False),
    Statistic("eig_var", "variance of the eigenvalues of the symmetric part of W^h",
              "eig_var: eigenvalue variance", "logit²", signed=False, eigen=False,
              log_scale=True, spread=True),
    Statistic("eig_concentration", "eig_mean / RMS eigenvalue of the symmetric part, in [-1, 1]",
              "eig_concentration: mean / RMS eigenvalue", "no unit, −1…1", signed=True,
              eigen=False),
    Statistic("eig_var_complex", "mean |lambda - eig_mean|^2 over the n complex eigenvalues",
              "eig_var_complex", "logit²", signed=False, eigen=True, log_scale=True),
    Statistic("spectral_norm", "largest singular value of W^h", "spectral norm", "logit",
              signed=False, eigen=True, log_scale=True),
    Statistic("positive_fraction", "share of sum |lambda| carried by eigenvalues with Re > 0",
              "positive fraction", "fraction, 0…1", signed=False, eigen=True),
)  # fmt: skip
