"""`python -m benchmarks` runs the demo (the full benchmark CLI is yet to come)."""

from .demo import main

main()
