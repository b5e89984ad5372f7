"""The provider modules that add rewards and fidelity features to the generic registries.

The registries (didr/rewards/registry.py, didr/evaluation/features.py) name no world; each provider module here has
a `register()` that fills them. `load_plugins()` runs them once; whatever looks a name up calls it first (config
validation, the stages). A new world or reward package is one more entry of PROVIDERS.
"""

from __future__ import annotations

import functools
import importlib

PROVIDERS = ("didr.toy.plugin",)


@functools.cache
def load_plugins() -> None:
    """Import every provider and run its `register()`, once."""
    for name in PROVIDERS:
        importlib.import_module(name).register()
