from pathlib import Path

import pytest
from transformers import AutoTokenizer

TINY_MODEL = Path(__file__).resolve().parents[3] / "examples/tiny/model"
# ChatML, rendered turn by turn like most chat models' templates.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture
def chat_tokenizer():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok
