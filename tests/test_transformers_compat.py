"""The compatibility module names what the installed transformers really uses (read off its signatures), so a rename
upstream fails here first, with the name to change in llava/transformers_compat.py."""

import inspect

import pytest
import torch
from transformers import DynamicCache, GenerationMixin, Qwen2Config
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2Model

from llava.compression.decoding import LayerInputs
from llava.transformers_compat import CACHE_ARG, OLD_CACHE_ARG, cache_argument, output_cache, pop_cache_argument


@pytest.mark.parametrize("function", [Qwen2Attention.forward, Qwen2DecoderLayer.forward, Qwen2Model.forward,
                                      GenerationMixin.prepare_inputs_for_generation])
def test_the_cache_argument_is_the_installed_releases_name(function):
    assert CACHE_ARG in inspect.signature(function).parameters


def test_model_outputs_carry_the_cache_under_that_name():
    assert CACHE_ARG in CausalLMOutputWithPast.__dataclass_fields__
    cache = DynamicCache()
    assert output_cache(CausalLMOutputWithPast(**{CACHE_ARG: cache})) is cache


def test_the_cache_is_found_and_removed_under_either_name():
    cache = DynamicCache()
    for name in (CACHE_ARG, OLD_CACHE_ARG):
        kwargs = {name: cache, "use_cache": True}
        assert cache_argument(kwargs) is cache
        assert pop_cache_argument(kwargs) is cache
        assert kwargs == {"use_cache": True}
    assert cache_argument({OLD_CACHE_ARG: None, CACHE_ARG: cache}) is cache
    assert cache_argument({}) is None


def test_the_decoder_layer_passes_the_cache_to_cache_update_under_its_name():
    """The compression caches receive the update with whatever arguments the installed attention passes."""
    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size=8)
    layer = Qwen2DecoderLayer(config, 0)
    calls = []

    class Recording(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            calls.append(layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    hidden = torch.randn(1, 3, 16)
    cos, sin = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    call_kwargs = {"attention_mask": None, "position_embeddings": (cos, sin), CACHE_ARG: Recording(config=config)}
    layer(hidden, **call_kwargs)
    assert calls == [0]
    inputs = LayerInputs.of_call((hidden,), call_kwargs)
    assert inputs.hidden_states is hidden and inputs.position_embeddings == (cos, sin)
