"""Prompt text to token ids: the one place a prompt is encoded, for sampling, training and sketching."""

from __future__ import annotations


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the policy sees it: a user turn plus the assistant header when the tokenizer
    has a chat template, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of :func:`prompt_text`: a chat-formatted prompt is tokenised without adding special
    tokens (the template has them), a raw one with the tokenizer's special tokens."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not templated)["input_ids"])
