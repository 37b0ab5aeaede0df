"""``loom verify``: does Loom compute what upstream transformers computes on a checkpoint?

Both sides read the checkpoint folder in fp32 on the CPU: upstream through its Auto
class's ``from_pretrained`` (eager attention), Loom the way the trainer does (the port's
class filled by ``load_safetensors`` through the port's checkpoint converter, e.g. the MoE
ports' expert stacking). Both run the same seeded batch of random token ids (text only
for a vision-language model): the logits without labels, then the loss with the ids as
labels (shifted by each model; with the MoE aux loss where the config asks for it). A
difference is
measured relative to the reference's scale (its largest |logit|, its |loss|) and must
stay under ``BASE_TOLERANCE`` times the model's tolerance factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loom.trainer.errors import ConfigError

BASE_TOLERANCE = 1e-4  # relative, fp32: summation order and attention kernels differ
# Per model type: MoE ports sum their experts' outputs in another order than upstream's
# loop (measured: 9e-6 relative on an 8-layer, 64-expert random model, 3x a dense one's;
# deeper models add up more).
FACTORS: dict[str, float] = {"mixtral": 4.0, "qwen3_moe": 4.0, "qwen3_vl_moe": 4.0}


@dataclass(frozen=True)
class Difference:
    name: str
    max_abs: float
    scale: float
    tolerance: float

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.scale, 1e-12)

    @property
    def ok(self) -> bool:
        return self.relative <= self.tolerance  # False for NaN


def random_ids(config, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """[batch, seq] token ids drawn from the vocabulary, without a VLM's image / video
    markers (they would ask for pixels the batch does not have)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.get_text_config().vocab_size, (batch, seq), generator=gen)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    markers = [t for t in (getattr(config, n, None) for n in names) if t is not None]
    if markers:
        plain = next(t for t in range(len(markers) + 1) if t not in markers)
        ids[torch.isin(ids, torch.tensor(markers))] = plain
    return ids


def load_upstream(src: Path, config) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging

    from loom.models.registry import is_vision_language

    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # its progress bar and load report: the problems are ours
    logging.disable_progress_bar()
    try:
        model, info = auto.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except OSError as err:  # no weights, an unreadable file
        raise ConfigError(f"{src}: upstream {auto.__name__} cannot load it: {err}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise ConfigError(f"{src}: upstream {type(model).__name__} cannot load it: {problems}")
    return model.eval()


def load_loom(src: Path, attn_implementation: str) -> nn.Module:
    """The model as the trainer builds and fills it (``loom.trainer.parallelize``), on the
    CPU: without FSDP, materialising a meta-built model would untie tied embeddings."""
    from loom.dist.loading import CheckpointError
    from loom.models.registry import load_weights
    from loom.trainer.model import build_model

    model = build_model(src, attn_implementation)
    try:
        load_weights(model, src)
    except CheckpointError as err:
        raise ConfigError(f"{src}: Loom cannot load it: {err}") from None
    return model.eval()


def _difference(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> Difference:
    max_abs = (got.float() - want.float()).abs().max().item()
    return Difference(name, max_abs, want.float().abs().max().item(), tolerance)


def compare(
    src: Path, tolerance_factor: float | None = None, batch: int = 2, seq: int = 32
) -> tuple[list[Difference], str]:
    """The logits' and the loss's differences, and a line saying what ran."""
    from transformers import AutoConfig

    from loom.models.registry import eager_only_features, is_vision_language, model_type, refusal

    src = Path(src)
    if batch < 1 or seq < 2:
        raise ConfigError(f"--batch {batch} --seq {seq}: need a batch of 1+ rows of 2+ tokens")
    if tolerance_factor is not None and not tolerance_factor > 0:
        raise ConfigError(f"--tolerance-factor {tolerance_factor}: must be positive")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} has no config.json: not an HF checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{src / 'config.json'}: {err}") from None
    # Loom's backends refuse what only eager attention computes: use eager there too.
    attn = "eager" if eager_only_features(config) else "loom_sdpa"
    problem = refusal(config, attn)
    if problem:
        raise ConfigError(f"{src}: {problem}")
    name = model_type(config)
    factor = FACTORS.get(name, 1.0) if tolerance_factor is None else tolerance_factor
    tolerance = BASE_TOLERANCE * factor
    upstream, loom = load_upstream(src, config), load_loom(src, attn)
    inputs = {"input_ids": random_ids(config, batch, seq)}
    if not is_vision_language(config):  # a VLM computes its own (3-D) positions
        # each row one sample, its positions given as the trainer gives them: Loom's
        # attention reads sample boundaries from them
        inputs["position_ids"] = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        want = upstream(**inputs, labels=inputs["input_ids"])
        got_logits = loom(**inputs).logits
        got_loss = loom(**inputs, labels=inputs["input_ids"]).loss
    diffs = [
        _difference("logits", got_logits, want.logits, tolerance),
        _difference("loss", got_loss, want.loss, tolerance),
    ]
    what = (
        f"{src} ({name}, fp32, {batch} x {seq} random tokens; upstream eager attention, "
        f"Loom {attn}; tolerance {BASE_TOLERANCE:g} x {factor:g} relative)"
    )
    return diffs, what


def table(diffs: list[Difference]) -> str:
    rows = [f"{'':8} {'max |diff|':>11} {'scale':>11} {'relative':>11} {'tolerance':>11}"]
    for d in diffs:
        rows.append(
            f"{d.name:8} {d.max_abs:11.3e} {d.scale:11.3e} {d.relative:11.3e} "
            f"{d.tolerance:11.3e}  {'ok' if d.ok else 'FAIL'}"
        )
    return "\n".join(rows)


def verify(src: Path, tolerance_factor: float | None = None, batch: int = 2, seq: int = 32) -> int:
    """Print the comparison; 0 when every difference is within tolerance, else 1."""
    diffs, what = compare(src, tolerance_factor, batch, seq)
    print(what)
    print(table(diffs))
    failed = [d.name for d in diffs if not d.ok]
    if failed:
        print(f"FAILED: {' and '.join(failed)} differ from upstream beyond the tolerance")
        return 1
    return 0
