"""The ``mcts`` stage (MCTS-DPO step-level tree search), one module per concern.

- ``stage``: the stage's config, ``SPEC``, ``compute`` and the loop's ``construction: {method: mcts}``;
- ``search``: the batched runner that expands and self-evaluates with the policy;
- ``tree_ops``: the pure tree operations (prior, PUCT selection, backup, commit).

The tree itself and its ``trees`` table live in ``prefloop.tasks.common.search_trees`` (``pair-trees``
reads them too). This package file imports nothing, so importing the package stays light.
"""
