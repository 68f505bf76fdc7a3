"""The filter stage, in parts: :mod:`.stage` (config, spec, the filter chain, ``compute``) chains
:mod:`.dedup` (hashed duplicates), :mod:`.decontamination` (n-gram overlap with evaluation prompts),
:mod:`.noise` (ensemble strength, flips, the label-flip rate ε) and :mod:`.ches` (the policy's hidden
states: CHES, embedding similarity); :mod:`.chain` holds the state the filters share while they run.

Nothing is re-exported here: import from the module that owns a name.
"""
