"""Names the stock lmms-eval wrappers import from LLaVA-NeXT that this package does not otherwise have."""

from __future__ import annotations

import importlib
import sys
import types


def provide_llava_llama() -> None:
    """Make ``llava.model.language_model.llava_llama.LlavaConfig`` importable if the package lacks it.

    lmms-eval's ``llava_vid`` imports it at module level only to register the ``llava_llama`` config type;
    Llama-based LLaVA checkpoints are not supported here, so a config class with that model type is enough.
    """
    name = "llava.model.language_model.llava_llama"
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
    from transformers import LlamaConfig

    class LlavaConfig(LlamaConfig):
        model_type = "llava_llama"

    module = types.ModuleType(name, "Stand-in for LLaVA-NeXT's Llama-based LLaVA (config class only).")
    LlavaConfig.__module__ = name
    module.LlavaConfig = LlavaConfig
    sys.modules[name] = module
