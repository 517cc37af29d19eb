"""Benchmarks and the demo of rsd-generation."""
