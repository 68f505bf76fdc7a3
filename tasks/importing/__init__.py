"""The import stages (``import-prompts``, ``import-samples``, ``import-preferences``, ``import-model``).

Reading sources is ``sources``, mapping their records onto columns ``mapping``, the stages
themselves (configs, specs, runs) ``stage``.
"""
