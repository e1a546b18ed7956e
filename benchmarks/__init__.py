"""lpl_ext benchmark suite (see benchmarks/RESULTS.md and docs/benchmarks.md)."""
