"""Step builders: each turns a pipeline config and its input artifacts into one output artifact.

:mod:`clipgen.pipeline` holds the graph (which step reads what); these modules hold the work.
"""
