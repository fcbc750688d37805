"""matplotlib for the commands' plots, set up once: the non-interactive Agg backend (runs on
headless devices and in CI), imported only when a plot is drawn (it costs ~0.3 s)."""
from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
