"""Figures over the flow tables (matplotlib, headless). Each function returns a Figure."""

from flowscan.plot.figures import (
    error_density, flow_projection, log_share_fit, sigma_bars, sigma_heatmap, survival_curves,
)
from flowscan.plot.style import save

__all__ = ["flow_projection", "sigma_bars", "sigma_heatmap", "log_share_fit", "error_density",
           "survival_curves", "save"]
