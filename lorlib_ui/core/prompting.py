"""From a user's text to the token ids the model sees, the same way for routing, scoring,
training and evaluation: the chat template (when the tokenizer has one), undecodable bytes made
safe, and the limits of the model's context. Imports no torch, so the worker interface can share
its constants with the UI.
"""

from __future__ import annotations

from collections.abc import Callable

from lorlib_ui.core.errors import LorlibError

MAX_NEW_TOKENS = 512  # the most tokens one request may generate, everywhere (CLI, worker, UI)
FALLBACK_CONTEXT = 2048  # for model configs that do not state their context


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, wrapped in the chat template when the tokenizer has one."""
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(prompt)["input_ids"]


def answer_ids(tokenizer, chat: bool = True) -> Callable[[str], list[int]]:
    """How an answer is tokenized after its prompt, for scoring: as the trainer does, without the EOS."""
    templated = chat and bool(tokenizer.chat_template)

    def ids(answer: str) -> list[int]:
        return tokenizer(answer if templated else " " + answer, add_special_tokens=False)["input_ids"]

    return ids


def checked_text(text: str, what: str) -> str:
    """The text, refused when empty. Undecodable bytes (binary pasted in, or command-line bytes that
    are not UTF-8, which Python keeps as lone surrogates) become U+FFFD: tokenizers refuse them."""
    if not isinstance(text, str) or not text.strip():
        raise LorlibError(f"{what} is empty")
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def check_max_new_tokens(n: int) -> None:
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise LorlibError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {n}")


def context_length(model) -> int:
    """How many tokens the model attends to at once, from its config."""
    return getattr(model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT


def template_span(tokenizer, chat: bool) -> tuple[int, int]:
    """How many tokens the chat template puts before and after a prompt's content: the common
    prefix and suffix of two prompts whose contents share no token."""
    a = encode_prompt(tokenizer, "alpha", chat)
    b = encode_prompt(tokenizer, "7 + 8 = ?", chat)
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    suffix = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y), min(len(a), len(b)))
    return prefix, min(suffix, min(len(a), len(b)) - prefix)


def template_positions(tokenizer, chat: bool, n_prompt: int, truncated: bool = False) -> list[int]:
    """The positions of the chat template's tokens in a prompt of `n_prompt` tokens (`template_span`
    before and after the content). A prompt cut from the left (`truncated`) lost its leading ones."""
    prefix, suffix = template_span(tokenizer, chat)
    start = 0 if truncated else min(prefix, n_prompt)
    end = max(start, n_prompt - suffix)
    return [*range(start), *range(end, n_prompt)]
