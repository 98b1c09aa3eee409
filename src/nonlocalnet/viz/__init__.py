"""Seeing what the blocks learned: attention figures, the query-independence report, cost plots.

The functions take a built model and its inputs (``visualize.draw_model_attention``,
``analyze.analyze_model``); the ``nonlocalnet visualize`` / ``analyze`` commands load the
checkpoints and call them. Needs matplotlib (the ``train`` extra); the block library itself does
not import this package.
"""
