"""Benchmarks: programs that measure and print tables (and write plots). See `jambalab bench`."""
