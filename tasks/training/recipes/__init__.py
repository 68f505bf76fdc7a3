"""Training recipes: one readable top-to-bottom function per training method.

A recipe tokenises its data (:mod:`prefloop.forward`), says how a batch becomes a loss (a registered
loss from ``tasks/training/losses.py`` or the Bradley–Terry loss) and hands that to the one
optimisation loop (:func:`prefloop.tasks.training.optim.optimise`). Components (forward, losses,
optim, configs) are composed here, never inherited.

- :mod:`.sft`: supervised fine-tuning, ``train_sft``;
- :mod:`.dpo`: the DPO family, ``train_dpo`` and the reference log-probs it trains against;
- :mod:`.reward_model`: Bradley–Terry reward models and ensembles of them.
"""
