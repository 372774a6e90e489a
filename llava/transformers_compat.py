"""Every difference between the transformers releases this package supports, in one place.

The package hooks transformers below its public ``generate``/``forward`` surface (decoder-layer hooks, a ``Cache``
subclass, the attention's keyword arguments), so a rename there breaks it. Each such name is defined here once and
the rest of the package asks this module; a new rename is one line here plus the test in
``tests/test_transformers_compat.py`` that checks each name against the installed release's signatures.

Supported: ``transformers>=5.4,<5.26`` (pyproject.toml). Known differences:

- 5.25 renamed the cache argument of the models, decoder layers and attention modules from ``past_key_values`` to
  ``cache`` (the old name is a deprecated alias until 5.40); ``generate`` keeps the cache in
  ``model_kwargs["cache"]`` and model outputs carry it as ``output.cache``. ``Cache.update`` is then called as
  ``update(keys, values, layer_idx, kwargs=...)`` instead of ``update(keys, values, layer_idx)``; the compression
  caches take both (``*args, **kwargs``).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

__all__ = ["CACHE_ARG", "OLD_CACHE_ARG", "TRANSFORMERS_VERSION", "cache_argument", "output_cache", "pop_cache_argument"]

TRANSFORMERS_VERSION = Version(transformers.__version__)

# The keyword that carries the KV cache into models, decoder layers and attention, and out of model outputs.
CACHE_ARG = "cache" if TRANSFORMERS_VERSION >= Version("5.25.0.dev0") else "past_key_values"
# The name the caller may still use (a deprecated alias in releases that renamed it).
OLD_CACHE_ARG = "past_key_values"


def cache_argument(kwargs: dict):
    """The cache passed in ``kwargs`` under either name (None if neither is set)."""
    cache = kwargs.get(CACHE_ARG)
    return cache if cache is not None else kwargs.get(OLD_CACHE_ARG)


def pop_cache_argument(kwargs: dict):
    """Remove the cache from ``kwargs`` under both names; returns it (None if neither was set)."""
    cache = cache_argument(kwargs)
    kwargs.pop(CACHE_ARG, None)
    kwargs.pop(OLD_CACHE_ARG, None)
    return cache


def output_cache(output):
    """The cache a model output carries (``output.cache`` or ``output.past_key_values``)."""
    return getattr(output, CACHE_ARG, None)
