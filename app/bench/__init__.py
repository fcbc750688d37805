"""Benchmarks: every method in its own process (run, worker), throughput timing, time-to-accuracy
curves, and the analytic memory model."""
