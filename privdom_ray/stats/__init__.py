"""Statistics on finished trials: metrics and their intervals, the transfer table, comparisons.

Reads trial folders through the store; never imports the training code or torch. In the
order of the flow: :mod:`.inference` (the one CI/p rule) -> :mod:`.metrics` (per-test-set
metrics) -> :mod:`.results` (the transfer table) -> :mod:`.comparisons` (paired comparisons).
"""
