"""Seeing what the blocks learned: attention figures, the query-independence report, cost plots.

Needs matplotlib (the ``train`` extra); the block library itself does not import this package.
"""
