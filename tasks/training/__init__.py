"""Training: the stage modules ``sft``, ``preference`` (stage ``train``) and ``reference``, on top of
components (losses, optimisation, checkpoints, configs) and recipes (SFT, DPO, reward models)."""
