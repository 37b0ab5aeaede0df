import datasets
import pytest

from loom.trainer.data.samples import (
    IGNORE_INDEX,
    encode_chat,
    encode_text,
    shift_labels,
    split_long,
    tokenize_source,
)
from loom.trainer.errors import DataError

X = IGNORE_INDEX


def test_shift_labels():
    assert shift_labels([5, 6, 7, 8], [True, True, False, True]) == [6, X, 8, X]


def test_text_sample_ends_with_eos(tokenizer):
    ids, labels = encode_text(tokenizer, "Ada had a cat.")
    assert ids[-1] == tokenizer.eos_token_id
    assert labels == [*ids[1:], X]


def test_chat_loss_only_on_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who had a cat?"},
        {"role": "assistant", "content": "Ada."},
        {"role": "user", "content": "And a dog?"},
        {"role": "assistant", "content": "Ben."},
    ]
    ids, labels = encode_chat(tok, messages)

    # Expected mask built by hand: encode each rendered piece, supervise assistant replies
    # and their end-of-turn marker, never the prompts.
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    expected_ids, supervised = [], []
    for m in messages:
        header = enc(f"<|im_start|>{m['role']}\n")
        body = enc(f"{m['content']}<|im_end|>\n")
        expected_ids += header + body
        supervised += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    assert ids == expected_ids
    assert labels == shift_labels(expected_ids, supervised)
    targets = [t for t in labels if t != X]
    assert tok.decode(targets) == "Ada.<|im_end|>\nBen.<|im_end|>\n"


def test_chat_needs_a_template(tokenizer):
    with pytest.raises(DataError, match="chat_template"):
        encode_chat(tokenizer, [{"role": "assistant", "content": "hi"}])


def test_split_long_keeps_shifted_labels():
    ids, labels = list(range(10)), shift_labels(list(range(10)), [True] * 10)
    pieces = split_long(ids, labels, 4)
    assert [len(p[0]) for p in pieces] == [4, 4, 2]
    assert [t for p in pieces for t in p[1]] == labels  # boundary labels are not lost


def test_tokenize_source_splits_and_drops_unsupervised(tokenizer):
    table = datasets.Dataset.from_dict({"text": ["Ada had a small cat. " * 8, "Ben."]})
    out = tokenize_source(table, tokenizer, "text", "text", max_len=16)
    lengths = [len(x) for x in out["input_ids"]]
    assert max(lengths) <= 16 and sum(lengths) == sum(
        len(encode_text(tokenizer, t)[0]) for t in table["text"]
    )
