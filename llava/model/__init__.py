from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

__all__ = ["LlavaQwenConfig", "LlavaQwenForCausalLM"]
