"""prefloop: data-centric alignment loops with versioned, content-addressed preference data.

Importing it has no side effects; the entry points apply :mod:`prefloop.environment`'s defaults.
"""

__version__ = "0.1.0"
