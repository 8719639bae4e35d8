"""kvtier benchmarks: run as ``python -m bench.<name>`` (or through ``kvtier bench``)."""
