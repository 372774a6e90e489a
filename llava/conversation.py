"""Conversation templates with LLaVA-NeXT's prompt format.

``conv_templates[name].copy()`` gives a fresh :class:`Conversation`; append the user turn and
an empty (``None``) assistant turn, then ``get_prompt()`` renders the text the model was trained
on. Rendering is string-for-string the same as LLaVA-NeXT for every separator style, so prompts
built by lmms-eval's ``llava_onevision`` / ``llava_vid`` wrappers are unchanged.

Example (``qwen_1_5``, the template LLaVA-OneVision and LLaVA-Video on Qwen2 use)::

    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], "<image>\\nWhat happens?")
    conv.append_message(conv.roles[1], None)
    conv.get_prompt()
    # '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'
    # '<|im_start|>user\\n<image>\\nWhat happens?<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import copy as _copy
import dataclasses
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

# A message is text, None (the turn to be generated), or LLaVA-NeXT's
# gradio form: a tuple (text, image or list of images, image_process_mode).
Message = Any


class SeparatorStyle(Enum):
    """How turns are joined; the same members (and meanings) as LLaVA-NeXT."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    CHATML = auto()
    LLAMA_2 = auto()
    LLAMA_3 = auto()
    QWEN = auto()
    GEMMA = auto()


@dataclasses.dataclass
class Conversation:
    """A conversation history plus the rules to render it as one prompt string.

    ``messages`` holds mutable ``[role, message]`` pairs (lmms-eval assigns
    ``conv.messages[-1][1] = continuation``). ``offset`` is the number of leading
    example messages that belong to the template itself (only ``default``/``v0`` has them).
    """

    system: str
    roles: tuple[str, str]
    messages: list[list[Message]]
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    tokenizer_id: str = ""
    # Only used by LLAMA_3 (its chat template); without one the template is rendered by hand.
    tokenizer: Any = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None

    skip_next: bool = False

    # ------------------------------------------------------------------ editing

    def append_message(self, role: str, message: Message) -> None:
        """Append a turn; ``message=None`` marks the turn the model should write."""
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        """A copy whose message list (and each ``[role, message]`` pair) is independent."""
        return dataclasses.replace(self, messages=[[role, msg] for role, msg in self.messages])

    def __deepcopy__(self, memo: dict) -> "Conversation":
        # The tokenizer (LLAMA_3 only) is shared, not deep-copied: it is read-only here and
        # may be large. Everything else is copied as usual.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        tokenizer = fields.pop("tokenizer")
        return Conversation(**_copy.deepcopy(fields, memo), tokenizer=tokenizer)

    def dict(self) -> dict[str, Any]:
        """A JSON-friendly view (tuple messages reduced to their text)."""
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, msg[0] if isinstance(msg, tuple) else msg] for role, msg in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    # ---------------------------------------------------------------- rendering

    def get_prompt(self) -> str:
        """Render the whole conversation as LLaVA-NeXT does for ``sep_style``.

        A turn whose message is ``None`` (or empty) contributes only its role header
        (the generation prompt); it is normally the last one.
        """
        messages = self._messages_with_leading_image()
        render = _RENDERERS.get(self.sep_style)
        if render is None:
            raise ValueError(f"Invalid style: {self.sep_style}")
        return render(self, messages)

    def _messages_with_leading_image(self) -> list[list[Message]]:
        """LLaVA-NeXT's handling of a first message given as a (text, images, mode) tuple.

        The "<image>" token is moved to the front of that message ("mmtag" templates instead
        get a synthetic "<Image><image></Image>" exchange first). Plain-text conversations are
        returned unchanged.
        """
        messages = self.messages
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        messages = [list(m) for m in messages]
        role, first = messages[0]
        text = first[0]
        if "mmtag" in self.version:
            messages[0] = [role, text.replace(DEFAULT_IMAGE_TOKEN, "").strip()]
            messages.insert(0, [self.roles[0], "<Image><image></Image>"])
            messages.insert(1, [self.roles[1], "Received."])
        elif not text.startswith(DEFAULT_IMAGE_TOKEN):
            messages[0] = [role, DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()]
        else:
            messages[0] = [role, text]
        return messages


def _text(message: Message) -> str:
    """The text part of a message (a tuple message carries it first)."""
    return message[0] if isinstance(message, tuple) else message


def _text_with_image_tokens(message: Message) -> str:
    """CHATML / LLAMA_3: a tuple message gets one "<image>" per attached image in front."""
    if not isinstance(message, tuple):
        return message
    text, images = message[0], message[1]
    return DEFAULT_IMAGE_TOKEN * len(images) + text


def _render_single(conv: Conversation, messages: list) -> str:
    out = conv.system + conv.sep
    for role, message in messages:
        out += f"{role}: {_text(message)}{conv.sep}" if message else f"{role}:"
    return out


def _render_two(conv: Conversation, messages: list) -> str:
    seps = (conv.sep, conv.sep2)
    out = conv.system + seps[0]
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {_text(message)}{seps[i % 2]}" if message else f"{role}:"
    return out


def _render_chatml(conv: Conversation, messages: list) -> str:
    out = "" if conv.system == "" else conv.system + conv.sep + "\n"
    for role, message in messages:
        out += f"{role}\n{_text_with_image_tokens(message)}{conv.sep}\n" if message else f"{role}\n"
    return out


def _render_mpt(conv: Conversation, messages: list) -> str:
    out = conv.system + conv.sep
    for role, message in messages:
        out += role + _text(message) + conv.sep if message else role
    return out


def _render_gemma(conv: Conversation, messages: list) -> str:
    out = ""
    for i, (role, message) in enumerate(messages):
        if role != conv.roles[i % 2]:
            raise ValueError("Conversation should alternate user/assistant/user/assistant/...")
        out += role + _text(message) + conv.sep if message else role
    return out


def _render_llama_2(conv: Conversation, messages: list) -> str:
    out = ""
    for i, (role, message) in enumerate(messages):
        if i == 0 and (not message or role != conv.roles[0]):
            raise ValueError("The first message must be a non-empty user message")
        if not message:
            continue
        text = _text(message)
        if i == 0 and conv.system:
            text = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n" + text
        if i % 2 == 0:
            out += conv.sep + f"[INST] {text} [/INST]"
        else:
            out += " " + text + " " + conv.sep2
    # str.lstrip strips a character set, exactly as LLaVA-NeXT does.
    return out.lstrip(conv.sep)


def _render_llama_3(conv: Conversation, messages: list) -> str:
    chat = [{"role": "system", "content": conv.system}]
    chat += [{"role": role, "content": _text_with_image_tokens(msg)} for role, msg in messages if msg]
    if conv.tokenizer is not None:
        return conv.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # Meta-Llama-3-Instruct's chat template, written out (LLaVA-NeXT loads it from the hub).
    out = "<|begin_of_text|>"
    for turn in chat:
        out += f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n{turn['content'].strip()}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _render_plain(conv: Conversation, messages: list) -> str:
    # LLaVA-NeXT raises TypeError on an answer when sep2 is None (the "plain" template); "" instead.
    seps = (conv.sep, conv.sep2 or "")
    out = conv.system
    for i, (_, message) in enumerate(messages):
        if message:
            out += _text(message) + seps[i % 2]
    return out


_RENDERERS = {
    SeparatorStyle.SINGLE: _render_single,
    SeparatorStyle.TWO: _render_two,
    SeparatorStyle.CHATML: _render_chatml,
    SeparatorStyle.MPT: _render_mpt,
    SeparatorStyle.GEMMA: _render_gemma,
    SeparatorStyle.LLAMA_2: _render_llama_2,
    SeparatorStyle.LLAMA_3: _render_llama_3,
    SeparatorStyle.PLAIN: _render_plain,
}


# --------------------------------------------------------------------------- templates
# System prompts and separators are LLaVA-NeXT's, verbatim: the models were trained on them.

_VICUNA_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VICUNA_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAVA_LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)
_V0_EXAMPLE_ANSWER = (
    "Renewable energy sources are those that can be replenished naturally in a relatively "
    "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
    "Non-renewable energy sources, on the other hand, are finite and will eventually be "
    "depleted, such as coal, oil, and natural gas. Here are some key differences between "
    "renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
    "energy sources are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
    "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
    "and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
    "have lower operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
    "locations than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
    "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
    "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"
)

conv_vicuna_v0 = Conversation(
    system=_VICUNA_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        ["Assistant", _V0_EXAMPLE_ANSWER],
    ],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system=_VICUNA_SYSTEM_USER,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system=_LLAMA_2_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system=_LLAVA_LLAMA_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_3 = Conversation(
    system=_LLAVA_LLAMA_SYSTEM,
    roles=("user", "assistant"),
    version="llama_v3",
    messages=[],
    sep="<|eot_id|>",
    sep_style=SeparatorStyle.LLAMA_3,
    tokenizer_id="meta-llama/Meta-Llama-3-8B-Instruct",
    stop_token_ids=[128009],
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_llava_llama_2_simple = Conversation(
    system="Answer the questions about the visual content that the user provides.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2_mmtag = Conversation(
    system="Answer the questions about the visual content that the user provides."
    "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2_mmtag",
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_qwen = Conversation(
    system="<|im_start|>system\nYou are a helpful assistant.",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    version="qwen",
    messages=[],
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
)

conv_qwen_2_5 = Conversation(
    system="<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    version="qwen",
    messages=[],
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
)

conv_gemma_instruct = Conversation(
    system="",
    roles=("<start_of_turn>user\n", "<start_of_turn>model\n"),
    version="gemma",
    messages=[],
    sep_style=SeparatorStyle.GEMMA,
    sep="<end_of_turn>\n",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_VICUNA_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=[],
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system=_VICUNA_SYSTEM_HUMAN,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

conv_mistral_orca = Conversation(
    system="<|im_start|>system\nYou are MistralOrca, a large language model trained by Alignment Lab AI. "
    "Write out your reasoning step-by-step to be sure you get the right answers!",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_mistral_zephyr = Conversation(
    system="<|system|>\nYou are a helpful AI assistant.",
    roles=("<|user|>\n", "<|assistant|>\n"),
    version="mpt",
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="</s>",
)

conv_mistral_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

default_conversation = conv_vicuna_v0

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "mistral_orca": conv_mistral_orca,
    "mistral_zephyr": conv_mistral_zephyr,
    "mistral_direct": conv_mistral_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "chatml_direct": conv_chatml_direct,
    "llava_v0": conv_llava_v0,
    "llava_v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "llava_v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "llava_llama_3": conv_llava_llama_3,
    "llava_llama_2_simple": conv_llava_llama_2_simple,
    "llava_llama_2_mmtag": conv_llava_llama_2_mmtag,
    "llava_mistral_instruct": conv_mistral_instruct,
    "mpt": conv_mpt,
    "qwen_1_5": conv_qwen,
    "qwen_2": conv_qwen,
    "qwen_2_5": conv_qwen_2_5,
    "gemma_instruct": conv_gemma_instruct,
}
