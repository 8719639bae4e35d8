"""Adapters between inference engines' KV caches and kvtier's engine-agnostic layout."""
