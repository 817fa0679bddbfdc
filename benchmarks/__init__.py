"""Throughput harnesses (not timed tests): see benchmarks/NOTES.md."""
