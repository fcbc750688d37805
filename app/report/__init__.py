"""The convergence report behind docs/convergence.md: running the experiments and rendering them."""
