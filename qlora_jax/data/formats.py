"""Turn one dataset row into token ids and a loss mask, for each supported format.

alpaca             instruction / input (optional) / output, in the Stanford Alpaca prompt
chat               messages [{role, content}] through the tokenizer's chat template; rows with
                   prompt/completion keys become one user and one assistant message
prompt_completion  prompt and completion text joined as they are
text               plain text, every token in the loss
For instruction formats only completion (assistant) tokens count in the loss unless
`train_on_prompt` is set. Completions end with the EOS token so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

FORMATS = ("alpaca", "chat", "prompt_completion", "text")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    format: str = "prompt_completion"
    prompt_key: str = "prompt"  # for prompt_completion and chat rows without messages
    completion_key: str = "completion"
    text_key: str = "text"
    messages_key: str = "messages"
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format {self.format!r} unknown; valid: {FORMATS}")


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids of one example and, per token, whether predicting it counts in the loss."""

    ids: list[int]
    loss_mask: list[bool]


def _require(row: Mapping[str, Any], keys: tuple[str, ...], fmt: str, index: int) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise ValueError(
            f"row {index}: format {fmt!r} needs keys {list(keys)}, missing {missing}; "
            f"row has {sorted(k for k, v in row.items() if v is not None)}"
        )


def _join(prompt: list[int], completion: list[int], train_on_prompt: bool) -> Example:
    return Example(prompt + completion, [train_on_prompt] * len(prompt) + [True] * len(completion))


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def alpaca(row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int) -> Example:
    _require(row, ("instruction", "output"), "alpaca", index)
    extra = row.get("input") or ""
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=row["instruction"],
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    completion = _encode(tokenizer, str(row["output"]), False) + _eos(tokenizer)
    return _join(_encode(tokenizer, prompt, True), completion, cfg.train_on_prompt)


def prompt_completion(row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int) -> Example:
    _require(row, (cfg.prompt_key, cfg.completion_key), "prompt_completion", index)
    completion = _encode(tokenizer, str(row[cfg.completion_key]), False) + _eos(tokenizer)
    return _join(_encode(tokenizer, str(row[cfg.prompt_key]), True), completion, cfg.train_on_prompt)


def text(row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int) -> Example:
    _require(row, (cfg.text_key,), "text", index)
    ids = _encode(tokenizer, str(row[cfg.text_key]), True) + _eos(tokenizer)
    return Example(ids, [True] * len(ids))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return _encode(tokenizer, rendered, False)


def chat(row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int) -> Example:
    """Render the conversation turn by turn; assistant turns are the completion tokens."""
    if not tokenizer.chat_template:
        raise ValueError("data.format='chat' needs a tokenizer with a chat template; use prompt_completion")
    if cfg.messages_key in row:
        messages = list(row[cfg.messages_key])
    else:
        _require(row, (cfg.prompt_key, cfg.completion_key), "chat", index)
        messages = [
            {"role": "user", "content": str(row[cfg.prompt_key])},
            {"role": "assistant", "content": str(row[cfg.completion_key])},
        ]
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"row {index}: every chat message needs 'role' and 'content', got {m!r}")
    ids: list[int] = []
    mask: list[bool] = []
    for turn in range(len(messages)):
        if messages[turn]["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:turn], generation_prompt=True)
        upto = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        if prefix[: len(ids)] != ids or upto[: len(prefix)] != prefix:
            raise ValueError(
                f"row {index}: the chat template does not render turns as prefixes of each other"
            )
        mask += [cfg.train_on_prompt] * (len(prefix) - len(ids)) + [True] * (len(upto) - len(prefix))
        ids = upto
    if not ids:
        raise ValueError(f"row {index}: chat row has no assistant message to learn from")
    return Example(ids, mask)


FORMATTERS = {"alpaca": alpaca, "chat": chat, "prompt_completion": prompt_completion, "text": text}


def format_row(row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int) -> Example:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index}: expected a JSON object, got {type(row).__name__}")
    return FORMATTERS[cfg.format](row, tokenizer, cfg, index)


def prompt_and_reference(
    row: Mapping[str, Any], tokenizer: Any, cfg: FormatConfig, index: int
) -> tuple[list[int], str]:
    """Prompt token ids (what the model sees before answering) and the reference answer text."""
    if cfg.format == "text":
        raise ValueError("exact-match evaluation needs an instruction format, not data.format='text'")
    if cfg.format == "alpaca":
        full = alpaca(row, tokenizer, cfg, index)
        reference = str(row["output"])
    elif cfg.format == "prompt_completion":
        full = prompt_completion(row, tokenizer, cfg, index)
        reference = str(row[cfg.completion_key])
    else:
        full = chat(row, tokenizer, cfg, index)
        messages = row.get(cfg.messages_key)
        reference = str(messages[-1]["content"]) if messages else str(row[cfg.completion_key])
    prompt_len = full.loss_mask.index(True) if not cfg.train_on_prompt else None
    if prompt_len is None:  # train_on_prompt hides the boundary: re-derive it with the mask off
        return prompt_and_reference(row, tokenizer, dataclasses.replace(cfg, train_on_prompt=False), index)
    return full.ids[:prompt_len], reference
