"""`python -m rsd_generation.benchmarks` is `rsd-bench` (see `rsd_generation.benchmarks.cli`)."""

from .cli import main

main()
