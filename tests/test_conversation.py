"""Prompt rendering of the conversation templates (expected strings written out by hand)."""

import copy

import pytest

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, SeparatorStyle, conv_templates

QUESTION = "What is happening in this video?"


def _single_turn(name: str, question: str = DEFAULT_IMAGE_TOKEN + "\n" + QUESTION, answer=None) -> str:
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


@pytest.mark.parametrize("name", ["qwen_1_5", "qwen_2"])
def test_qwen_prompt_exact(name):
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert _single_turn(name) == expected


def test_qwen_prompt_with_answer_closes_the_turn():
    prompt = _single_turn("qwen_1_5", answer="A dog runs.")
    assert prompt.endswith("<|im_start|>assistant\nA dog runs.<|im_end|>\n")


def test_qwen_2_5_system_prompt():
    assert _single_turn("qwen_2_5", question="hi").startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )


def test_multi_turn_chatml():
    conv = conv_templates["qwen_1_5"].copy()
    for text in ["q1", "a1", "q2", None]:
        conv.append_message(conv.roles[len(conv.messages) % 2], text)
    assert conv.get_prompt() == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1"])
def test_two_style(name):
    system = conv_templates[name].system
    assert conv_templates[name].sep_style is SeparatorStyle.TWO
    assert _single_turn(name, question="Hi") == f"{system} USER: Hi ASSISTANT:"
    assert _single_turn(name, question="Hi", answer="Hello") == f"{system} USER: Hi ASSISTANT: Hello</s>"


def test_mpt_style_chatml_direct():
    assert _single_turn("chatml_direct", question="<image>\nQ") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
    )


def test_plain_style():
    # Messages joined by sep ("\n") and sep2 (None in the template, rendered as "").
    assert _single_turn("plain", question="<image>") == "<image>\n"
    assert _single_turn("plain", question="<image>", answer="a caption") == "<image>\na caption"


def test_default_template_keeps_its_example_exchange():
    prompt = _single_turn("default", question="Hi")
    system = conv_templates["default"].system
    assert prompt.startswith(system + "###Human: What are the key differences")
    assert prompt.endswith("###Human: Hi###Assistant:")


def test_llama_2_style():
    conv = conv_templates["llava_llama_2"].copy()
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], "Hello")
    conv.append_message(conv.roles[0], "Bye")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        f"[INST] <<SYS>>\n{conv.system}\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
    )


def test_llama_3_without_tokenizer_renders_the_instruct_template():
    conv = copy.deepcopy(conv_templates["llava_llama_3"])
    conv.append_message(conv.roles[0], "<image>\nQ")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{conv.system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tuple_first_message_moves_image_token_to_front():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], ("Describe <image> this", ["img.png"], "Default"))
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{conv.system} USER: <image>\nDescribe  this ASSISTANT:"


def test_copy_is_independent_and_messages_are_mutable_pairs():
    template = conv_templates["qwen_1_5"]
    conv = template.copy()
    conv.append_message(conv.roles[0], "q")
    conv.append_message(conv.roles[1], None)
    conv.messages[-1][1] = "continuation"  # what lmms-eval's loglikelihood does
    assert template.messages == []
    assert conv.get_prompt().endswith("<|im_start|>assistant\ncontinuation<|im_end|>\n")


def test_stop_string_lmms_eval_derives():
    # lmms-eval: stop_str = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
    for name, expected in [("qwen_1_5", "<|im_end|>"), ("vicuna_v1", "</s>"), ("chatml_direct", "<|im_end|>")]:
        conv = conv_templates[name]
        assert (conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2) == expected


def test_all_templates_render():
    for name, template in conv_templates.items():
        conv = copy.deepcopy(template)
        assert isinstance(conv, Conversation)
        conv.append_message(conv.roles[0], "Q")
        conv.append_message(conv.roles[1], None)
        assert "Q" in conv.get_prompt(), name
