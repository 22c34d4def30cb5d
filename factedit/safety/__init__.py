"""Lifelong safety: key statistics, null-space preservation and the drift guard."""
