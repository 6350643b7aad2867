"""Experiments: configs, benchmarks and studies built on flatjax."""
