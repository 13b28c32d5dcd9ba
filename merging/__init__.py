"""Merging: checkpoint I/O, merge operators, recipes and the streaming merge engine."""
