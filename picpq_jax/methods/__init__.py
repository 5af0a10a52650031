"""Compression methods (DESIGN.md, "Shape"): one module per method, each a function from (baseline, data,
config) to a Policy."""
