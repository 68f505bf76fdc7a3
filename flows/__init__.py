"""Prefect flows: the multi-round loop, one round, the data-only flow, one flow per stage (generated
from the stage registry) and the deployment helpers. The only place besides
:mod:`prefloop.orchestration` that imports Prefect."""
