"""Benchmarks, diagnosis scripts and their harness: run from the checkout, never installed."""
