"""Regenerate the embedded tiny vision-language example: images, conversations, tokenizer,
processor and model config.

    uv run python examples/tiny-vlm/make_example.py

Everything is made offline and deterministically. Each image is a 32x32 picture of one
coloured square on a grey background, left or right; each conversation asks about its
colour or its side, so the answers can only be learned by looking. The model is a
two-layer Qwen3-VL text decoder with a two-block vision tower, random weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
}
SIDES = ("left", "right")
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
QUESTIONS = {
    "color": ["What color is the square?", "Which color do you see?", "Name the square's color."],
    "side": ["Is the square on the left or the right?", "Where is the square?"],
}
# Qwen's chat format; an image or video part renders as one placeholder between vision
# markers (the processor expands it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def write_images(folder: Path) -> list[tuple[str, str, str]]:
    """One image per colour and side and shade of grey: (file name, colour, side)."""
    folder.mkdir(exist_ok=True)
    out = []
    for color, rgb in COLORS.items():
        for side in SIDES:
            for shade in (90, 130, 170):
                image = Image.new("RGB", (32, 32), (shade, shade, shade))
                x0 = 2 if side == "left" else 18
                image.paste(rgb, (x0, 8, x0 + 12, 20))
                name = f"{color}-{side}-{shade}.png"
                image.save(folder / name, optimize=True)
                out.append((name, color, side))
    return out


def write_conversations(path: Path, images, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    with path.open("w") as f:
        for _ in range(n):
            name, color, side = rng.choice(images)
            kind = rng.choice(list(QUESTIONS))
            question = rng.choice(QUESTIONS[kind])
            answer = f"The square is {color}." if kind == "color" else f"It is on the {side}."
            messages = [
                {"role": "user", "content": [
                    {"type": "image", "image": f"images/{name}"},
                    {"type": "text", "text": question},
                ]},
                {"role": "assistant", "content": answer},
            ]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
            texts += [question, answer]
    return texts


def write_tokenizer(texts: list[str], out: Path, vocab_size: int):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([*texts, "user", "assistant", "system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=SPECIAL[0], pad_token=SPECIAL[1]
    )
    fast.model_max_length = 1024
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(vocab_size: int, tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
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
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|pad|>"],
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": 8,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
            "initializer_range": 0.02,
        },
        "torch_dtype": "float32",
    }


# Written by hand so both transformers majors read them alike: 32x32 images stay 32x32
# (4x4 patches of 8 pixels, 4 placeholder tokens after the 2x2 merge).
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
    "patch_size": 8,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 1024,
    "max_pixels": 4096,
    "size": {"shortest_edge": 1024, "longest_edge": 4096},
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}
# Videos come as frames already sampled (a folder or a list of images); the processor
# keeps every frame and takes their rate from the record (``fps``) or this default.
VIDEO_PREPROCESSOR = {
    **{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"},
    "video_processor_type": "Qwen3VLVideoProcessor",
    "do_sample_frames": False,
    "fps": 2,
}


def write_model(texts: list[str], out: Path, vocab_size: int) -> None:
    """The tokenizer learns up to ``vocab_size - 32`` tokens (its 256 bytes and the special
    tokens first); the model's embedding has ``vocab_size`` rows."""
    out.mkdir(exist_ok=True)
    tokenizer = write_tokenizer(texts, out, vocab_size - 32)
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(model_config(vocab_size, tokenizer), indent=2) + "\n")  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    video = json.dumps(VIDEO_PREPROCESSOR, indent=2) + "\n"
    (out / "video_preprocessor_config.json").write_text(video)


def main() -> None:
    images = write_images(HERE / "images")
    texts = write_conversations(HERE / "conversations.jsonl", images, n=600, seed=0)
    write_model(texts, HERE / "model", vocab_size=320)


if __name__ == "__main__":
    main()
