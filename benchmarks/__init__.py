"""fedsynth benchmarks: `python -m benchmarks` (see benchmarks/RESULTS.md)."""
