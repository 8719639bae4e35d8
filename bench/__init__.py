"""kvtier benchmarks: run as ``python -m kvtier.bench.<name>`` (or through ``kvtier bench``)."""
