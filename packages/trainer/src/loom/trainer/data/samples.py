"""Records to samples: token ids and labels already shifted, so ``labels[i]`` is the
token that position ``i`` must predict (``IGNORE_INDEX`` where nothing is learned).

Shifting inside each sample, before packing or sequence-parallel slicing, means a
packed row or a rank's slice never needs its neighbour's tokens to find its labels.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import datasets
import numpy as np

from loom.trainer.data.sources import Format
from loom.trainer.errors import ConfigError, DataError

IGNORE_INDEX = -100


def check_vocab(tokenizer, model_path: Path) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for, before any
    data is read: the forward would otherwise stop on the first such token (an IndexError
    on the CPU, a device-side assert on CUDA)."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
    largest = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1) - 1
    if largest >= vocab_size:
        raise ConfigError(
            f"model.path {model_path}: the tokenizer's largest token id is {largest} "
            f"({len(tokenizer)} tokens), but the model's vocab_size is {vocab_size}, so ids "
            f"{vocab_size} and up have no embedding; use the tokenizer the model was trained "
            f"with, or resize the model's embeddings to at least {largest + 1} rows first"
        )


def shift_labels(ids: list[int], supervised: list[bool]) -> list[int]:
    """``labels[i] = ids[i + 1]`` where token ``i + 1`` is supervised; the last is ignored."""
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], supervised[1:], strict=True)]
    return [*labels, IGNORE_INDEX]


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text's ids (then end-of-sequence) and labels; one tokenizer call for all."""
    if not texts:
        return []
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = [*ids, tokenizer.eos_token_id]
        out.append((ids, shift_labels(ids, [True] * len(ids))))
    return out


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    return encode_texts(tokenizer, [text])[0]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the end of the generation prompt before an assistant message to the
    end of that message as the template renders it (end-of-turn tokens included).
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation, so Loom cannot find the assistant turns; use a template "
                "that renders turn by turn"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Loss only on assistant turns (their content and end-of-turn markers)."""
    if tokenizer.chat_template is None:
        raise DataError("chat data needs a tokenizer with a chat_template; this one has none")
    if any(not isinstance(m["content"], str) for m in messages):
        raise DataError(
            "a message's content is a list of parts (images); only a vision-language model "
            "(a config.json with a vision_config) trains on those"
        )
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in spans]
    supervised = []
    for start, _ in encoded["offset_mapping"]:
        k = bisect.bisect_right(starts, start) - 1
        supervised.append(k >= 0 and start < spans[k][1])
    return encoded["input_ids"], shift_labels(encoded["input_ids"], supervised)


def split_long(ids: list[int], labels: list[int], max_len: int) -> list[tuple[list, list]]:
    """Cut a sample longer than ``max_len`` into pieces; labels stay as shifted."""
    return [(ids[i : i + max_len], labels[i : i + max_len]) for i in range(0, len(ids), max_len)]


Sample = tuple[np.ndarray, np.ndarray]  # ids, labels: [tokens] int32 each


def encode_records(tokenizer, fmt: Format, values: list, max_len: int) -> list[list[Sample]]:
    """Each record's samples (``values``: its text or messages): pieces of at most
    ``max_len`` tokens, those with nothing to learn dropped."""
    if fmt == "text":
        encoded = encode_texts(tokenizer, values)
    else:
        encoded = [encode_chat(tokenizer, messages) for messages in values]
    return [
        [
            (np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
            for ids, labels in split_long(*pair, max_len)
            if any(label != IGNORE_INDEX for label in labels)
        ]
        for pair in encoded
    ]


def tokenize_source(
    table: datasets.Dataset, tokenizer, fmt: Format, field: str, max_len: int
) -> datasets.Dataset:
    """Columns ``input_ids`` and ``labels``, one row per sample of at most ``max_len``."""

    def batch_encode(batch: dict) -> dict:
        samples = [s for r in encode_records(tokenizer, fmt, batch[field], max_len) for s in r]
        return {"input_ids": [ids for ids, _ in samples], "labels": [lab for _, lab in samples]}

    return table.map(batch_encode, batched=True, remove_columns=table.column_names)
