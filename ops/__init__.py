"""Operator commands on top of both processes: the ``catalog`` CLI, verify, warm, seed, dead
letters and publishing by hand."""
