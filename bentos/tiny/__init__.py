"""Generators of the `tiny` profile: real architectures, toy sizes, seeded random weights.

Each ``generate(out_dir, seed)`` writes a directory that the production loading code reads
exactly as it reads the published weights, so the tiny models exercise the real paths.
"""
