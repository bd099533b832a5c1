"""File formats: safe, lazy, memory-mapped readers that return numpy arrays (no torch needed)."""
