"""Throughput and timing benchmarks."""
