"""Regenerate the embedded tiny example: corpus, tokenizer and model config.

    uv run python examples/tiny/make_example.py

Everything is made offline and deterministically: the corpus comes from a small
grammar (so the loss has structure to learn), the byte-level BPE tokenizer is trained
on that corpus, and the model is a two-layer Qwen3 with random weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
EOS = "<|endoftext|>"
PAD = "<|pad|>"

NAMES = ["Ada", "Ben", "Cleo", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Juno"]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "mole", "crow", "frog", "bear"]
ADJECTIVES = ["small", "old", "quiet", "brave", "lazy", "clever", "tired", "happy"]
PLACES = ["barn", "forest", "garden", "river", "hill", "village", "field", "kitchen"]
THINGS = ["apple", "ball", "lamp", "book", "stone", "rope", "bell", "hat"]
VERBS = ["found", "lost", "carried", "painted", "hid", "dropped", "washed", "kept"]


def story(rng: random.Random) -> str:
    name, animal = rng.choice(NAMES), rng.choice(ANIMALS)
    adjective, place = rng.choice(ADJECTIVES), rng.choice(PLACES)
    sentences = [f"{name} had a {adjective} {animal} that lived near the {place}."]
    for _ in range(rng.randint(2, 5)):
        thing, verb = rng.choice(THINGS), rng.choice(VERBS)
        sentences.append(
            rng.choice(
                [
                    f"One day the {animal} {verb} a {thing} in the {place}.",
                    f"{name} said the {thing} was {rng.choice(ADJECTIVES)}.",
                    f"Then {name} {verb} the {thing} and went to the {rng.choice(PLACES)}.",
                ]
            )
        )
    sentences.append(f"The {animal} and {name} were {rng.choice(ADJECTIVES)} that night.")
    return " ".join(sentences)


def write_corpus(path: Path, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [story(rng) for _ in range(n_docs)]
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return texts


def write_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)
    fast.model_max_length = 1024
    fast.save_pretrained(out)
    # Name the class both transformers majors know (v5 would write its own backend name).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def write_model_config(out: Path, vocab_size: int) -> None:
    # Written by hand, not by Qwen3Config.save_pretrained, so that transformers v4 and
    # v5 both read it the same way (v5 would write its own rope layout).
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    texts = write_corpus(HERE / "corpus.jsonl", n_docs=2000, seed=0)
    model_dir = HERE / "model"
    model_dir.mkdir(exist_ok=True)
    write_tokenizer(texts, model_dir, vocab_size=384)
    write_model_config(model_dir, vocab_size=384)


if __name__ == "__main__":
    main()
