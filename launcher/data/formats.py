"""data.format: each row becomes one text, the character spans whose tokens carry the loss, and where the prompt ends.

text trains on all of it; prompt_completion and alpaca (Stanford Alpaca's prompt) on
the completion; chat, rendered by the tokenizer's chat template (or the fallback
FALLBACK_CHAT_TEMPLATE), on the assistant turns. data.train_on_prompt=true trains on
the whole text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from launcher.config import DataConfig
from launcher.data.checks import _first_line, _line_start

log = logging.getLogger(__name__)


# The prompt of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Set on a tokenizer that has no chat template when data.format=chat (and so exported
# with it): "<|role|>\n" + content, each assistant turn closed by the eos token.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented fallback (FALLBACK_CHAT_TEMPLATE)."""
    if not getattr(tokenizer, "chat_template", None):
        log.info("data.format=chat: the tokenizer has no chat template; using the fallback '<|role|>\\n' template")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


@dataclass
class _Rendered:
    """One row as text: the character spans whose tokens are targets and where the prompt ends."""

    text: str
    spans: list[tuple[int, int]]
    prompt_end: int  # the (last) target starts here; what comes before is the prompt at evaluation
    target: str
    bos_eos: bool  # prepend the tokenizer's bos and append a target eos (chat templates do their own)


def _render_rows(batch: dict[str, list], cfg: DataConfig, tokenizer, label: str, first_row: int) -> list[_Rendered]:
    n = len(next(iter(batch.values())))

    def column(key: str, optional: bool = False) -> list[str]:
        name = getattr(cfg, key)
        values = batch.get(name)
        if values is None:  # an optional column that is absent
            return [""] * n
        if all(isinstance(v, str) for v in values):
            return values
        for i, v in enumerate(values):
            if v is None and not optional:
                raise ValueError(f"{label} row {first_row + i + 1}: column {name!r} is empty (null)")
        return ["" if v is None else v if isinstance(v, str) else str(v) for v in values]

    if cfg.format == "text":
        return [_Rendered(text, [(0, len(text))], 0, text, True) for text in column("text_column")]
    if cfg.format == "chat":
        return [_render_chat(messages, tokenizer, cfg.train_on_prompt, f"{label} row {first_row + i + 1}")
                for i, messages in enumerate(batch[cfg.messages_column])]
    if cfg.format == "prompt_completion":
        prompts, targets = column("prompt_column"), column("completion_column")
    else:  # alpaca
        prompts = [(ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction,
                                                                                      input=extra)
                   for instruction, extra in zip(column("instruction_column"), column("input_column", True))]
        targets = column("output_column")
    rendered = []
    for prompt, target in zip(prompts, targets):
        text = prompt + target
        spans = [(0, len(text))] if cfg.train_on_prompt else [(len(prompt), len(text))]
        rendered.append(_Rendered(text, spans, len(prompt), target, True))
    return rendered


def _render_chat(messages, tokenizer, train_on_prompt: bool, where: str) -> _Rendered:
    """The conversation through the chat template; the targets are the assistant turns.

    An assistant turn spans from the end of the conversation before it rendered with
    the generation prompt to the end of the conversation through it (so its
    end-of-turn marker is a target, trailing whitespace is not). A template whose
    renderings are not prefixes of each other falls back to the turn's content plus
    any special tokens right after it.
    """
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise ValueError(f"{where}: expected a non-empty list of {{'role': ..., 'content': ...}} messages, "
                         f"got {_line_start(repr(messages))}")

    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        text = render(messages)
    except Exception as err:  # noqa: BLE001 - jinja raises anything the template author chose
        raise ValueError(f"{where}: the chat template failed on this conversation: {_first_line(err)}") from None
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t), key=len, reverse=True)
    spans, cursor, last = [], 0, None
    for i, message in enumerate(messages):
        content = str(message["content"])
        if message["role"] != "assistant":  # only moves the cursor past the turn, where the content is found
            found = text.find(content, cursor)
            cursor = found + len(content) if found >= 0 and content else cursor
            continue
        try:
            before, through = render(messages[:i], True), render(messages[: i + 1])
        except Exception:  # noqa: BLE001
            before = through = None
        if (before is not None and text.startswith(before) and text.startswith(through)
                and cursor <= len(before) <= len(through)):
            start, end = len(before), len(through)
        else:
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"{where}: the chat template's output does not contain assistant turn {i + 1}'s "
                                 f"content; use data.train_on_prompt=true or another template")
            end = start + len(content)
            while special := next((t for t in specials if text.startswith(t, end)), None):
                end += len(special)
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        cursor, last = max(cursor, end), message
    prompt_end = spans[-1][0] if spans else len(text)
    target = str(last["content"]) if last is not None else ""
    return _Rendered(text, [(0, len(text))] if train_on_prompt else spans, prompt_end, target, False)
