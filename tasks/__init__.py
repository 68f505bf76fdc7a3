"""The stages: one module (or small package) per stage, each with its config model, ``SPEC`` and
``compute``; :mod:`prefloop.tasks.registry` lists them and :mod:`prefloop.tasks.common` holds what
they share."""
