"""Token pruning, shared by every family: budget arithmetic (budget.py), Stage 1 selectors and Stage 2
relevance (selection.py). Families never import this package; `sts_export.graphs` does."""
