"""Where a model's Q/K weights are and how to read them.

- ``architectures``: the one table of per-``model_type`` layouts, and the plan of an audit;
- ``sources``: all weight I/O (local folders, Hub repos by byte range, models in memory);
- ``targets``: what a name a user typed refers to (a folder or a Hub repo id).
"""
