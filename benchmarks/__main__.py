"""`python -m benchmarks` is `rsd-bench` (see `benchmarks.cli`)."""

from .cli import main

main()
