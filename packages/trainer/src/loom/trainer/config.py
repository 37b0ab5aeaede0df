"""Run configuration: a YAML file plus dotted command-line overrides, validated.

Relative paths are taken from the current working directory, as every other tool does.
"""

from __future__ import annotations

import difflib
import glob
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from loom.trainer.data.sources import first_bad_line
from loom.trainer.data.streaming import first_record_problem, stream_shards
from loom.trainer.errors import ConfigError, DataError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: Path = Field(description="model directory: config.json, tokenizer, optional safetensors")
    attn_implementation: Literal["loom_sdpa", "loom_varlen", "sdpa", "eager"] = "loom_sdpa"
    freeze_vit: bool = Field(
        False,
        description="vision-language models: train the text decoder only, the vision "
        "tower (and its merger) frozen",
    )


class SourceConfig(Section):
    path: Path = Field(
        description="a .jsonl / .json / .parquet file or a datasets folder; streaming: also "
        "a folder of .jsonl / .parquet shards or a glob"
    )
    format: Literal["text", "chat"] = "text"
    field: str | None = Field(None, description='default: "text", or "messages" for chat')
    weight: float = Field(1.0, gt=0, description="relative share of the samples drawn")
    streaming: bool = Field(
        False, description="read and tokenize records as training goes, not all up front"
    )
    shuffle_buffer: int = Field(
        10_000, ge=0, description="streaming: samples in the seeded shuffle buffer (0: in order)"
    )

    @property
    def column(self) -> str:
        return self.field or ("text" if self.format == "text" else "messages")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    max_seq_len: int = Field(2048, gt=1, description="tokens per packed row")
    strict: bool = Field(True, description="stop at the first bad record (else skip, count)")

    @model_validator(mode="before")
    @classmethod
    def _one_source_shorthand(cls, raw: Any) -> Any:
        # data.path / data.format / data.field stand for a single source.
        if isinstance(raw, dict) and "path" in raw and "sources" not in raw:
            raw = dict(raw)
            keys = ("path", "format", "field", "weight", "streaming", "shuffle_buffer")
            source = {k: raw.pop(k) for k in keys if k in raw}
            raw["sources"] = [source]
        return raw


class TrainConfig(Section):
    output_dir: Path
    overwrite: bool = False
    seed: int = 0
    steps: int = Field(gt=0)
    global_batch_size: int = Field(gt=0, description="per optimizer step, all ranks, in batch_unit")
    batch_unit: Literal["rows", "tokens", "samples"] = "rows"
    micro_batch_size: int = Field(1, gt=0, description="rows per forward pass on one rank")
    nan_policy: Literal["skip", "stop"] = Field(
        "stop", description="on a non-finite loss or grad norm: skip the update, or stop"
    )
    auto: bool = Field(
        False,
        description="choose micro_batch_size, activation checkpointing / offload and "
        "sp_size to fit the GPUs (loom plan's memory model); keys set in the config win",
    )


class OptimConfig(Section):
    """AdamW and its learning-rate schedule: ``loom.trainer.optim`` takes it whole."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="max total grad norm; 0 turns clipping off")
    vision_lr: float | None = Field(
        None,
        gt=0,
        description="vision-language models: the vision tower's (and merger's) peak "
        "lr; default: lr",
    )


class MemoryConfig(Section):
    """What trades time for device memory: ``loom.trainer.parallelize`` takes it whole."""

    activation_checkpointing: bool = False
    ac_every: int = Field(1, gt=0, description="checkpoint every n-th decoder layer")
    activation_offload: bool = Field(
        False, description="keep the checkpointed layers' inputs in host memory"
    )
    mlp_tile: int = Field(0, ge=0, description="tokens per MLP tile (0: the whole sequence)")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (fuses the elementwise ops)"
    )

    @model_validator(mode="after")
    def _options_compose(self) -> MemoryConfig:
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError(
                "memory.activation_offload moves the checkpointed layers' inputs to host "
                "memory: it needs memory.activation_checkpointing: true"
            )
        if self.mlp_tile and self.compile:
            raise ValueError(
                "memory.mlp_tile and memory.compile cannot be used together: use one of them"
            )
        return self


# Keys that were train keys before their component had a section; the name is kept.
MOVED_FROM_TRAIN = {
    "lr": "optim",
    "betas": "optim",
    "eps": "optim",
    "weight_decay": "optim",
    "schedule": "optim",
    "warmup_steps": "optim",
    "min_lr_ratio": "optim",
    "grad_clip": "optim",
    "activation_checkpointing": "memory",
    "ac_every": "memory",
    "activation_offload": "memory",
    "mlp_tile": "memory",
    "compile": "memory",
}


class MovedKeyWarning(FutureWarning):
    """A config key given under its old name; the message names the new one."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every n steps (0: only when stopped)")
    keep_last: int = Field(2, ge=0, description="complete checkpoints kept (0: all)")
    resume: str = Field("auto", description='"auto" (newest in output_dir), "none", or a path')


class LogConfig(Section):
    every: int = Field(1, gt=0, description="write metrics every n steps (and the last)")
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None
    peak_tflops: float | None = Field(None, gt=0, description="per device, for MFU")


class ParallelConfig(Section):
    dp_replicate: int = Field(1, gt=0)
    dp_shard: int = Field(-1, description="-1: whatever the world size leaves")
    sp_size: int = Field(1, gt=0, description="Ulysses sequence parallelism: ranks per sequence")
    ep_size: int = Field(1, gt=0, description="expert parallelism: ranks the experts spread over")
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    @model_validator(mode="after")
    def _dp_shard_positive_or_auto(self) -> ParallelConfig:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError("dp_shard must be a positive size or -1 (auto)")
        return self


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """LoRA adapters (peft) on the text decoder's linear layers; the base model frozen."""

    rank: int | Literal["auto"] = Field(
        0,
        description="adapter rank (0: LoRA off, the whole model trains; auto: by the model's "
        "size, halved where the GPUs are short of memory under train.auto)",
    )
    alpha: float = Field(
        16.0, gt=0, description="the update is scaled by alpha / rank (rank auto: 2 x rank)"
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="names of the decoder's linear layers that get adapters",
    )
    merge_on_export: bool = Field(
        False, description="also write the merged model to hf/merged (hf/ holds the adapter)"
    )
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="nf4: QLoRA, the targeted layers' frozen weights in 4-bit NF4 (torchao; "
        "one CUDA GPU)",
    )

    @field_validator("rank")
    @classmethod
    def _rank_off_positive_or_auto(cls, rank: int | str) -> int | str:
        if isinstance(rank, int) and rank < 0:
            raise ValueError(f"must be 0 (off), a positive rank or auto; got {rank}")
        return rank

    @model_validator(mode="after")
    def _no_untargetable(self) -> LoraConfig:
        # the fused loss reads lm_head's weight directly; embeddings are not linear layers
        bad = [t for t in self.targets if t in ("lm_head", "embed_tokens")]
        if bad:
            raise ValueError(f"targets {bad}: only the decoder layers' linear layers take adapters")
        if self.quantize != "none" and not self.enabled:
            raise ValueError(f"quantize: {self.quantize} is QLoRA: it needs lora.rank > 0")
        return self

    @property
    def enabled(self) -> bool:
        return self.rank == "auto" or self.rank > 0


class Config(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    memory: MemoryConfig = MemoryConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    lora: LoraConfig = LoraConfig()
    hardware: str | dict[str, Any] | None = Field(
        None,
        description="the device profile train.auto and loom plan use: auto (detected), a "
        "built-in name (h100-sxm, h200, a100-80gb, ...), a YAML file, or a mapping of name, "
        "memory_gib, bf16_tflops, interconnect",
    )

    @model_validator(mode="after")
    def _qlora_composes(self) -> Config:
        if self.lora.quantize == "nf4":
            for key, on in (("memory.compile", self.memory.compile),
                            ("parallel.cpu_offload", self.parallel.cpu_offload)):  # fmt: skip
                if on:
                    raise ValueError(
                        f"lora.quantize: nf4 with {key} is not proven yet (torchao's NF4 "
                        f"weights under it): turn {key} off for QLoRA"
                    )
        return self

    @model_validator(mode="after")
    def _hardware_is_a_profile(self) -> Config:
        if self.hardware not in (None, "auto"):
            from loom.trainer.planner.hardware import resolve

            resolve(self.hardware)  # a malformed profile is named before anything runs
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        # Old configs and command lines keep working until the old names are removed.
        if not (isinstance(raw, dict) and isinstance(raw.get("train"), dict)):
            return raw
        raw, train = dict(raw), dict(raw["train"])
        for key in [k for k in train if k in MOVED_FROM_TRAIN]:
            section = MOVED_FROM_TRAIN[key]
            if not isinstance(raw.get(section) or {}, dict):
                continue  # not a section: validation names it
            new = raw[section] = dict(raw.get(section) or {})
            value = train.pop(key)
            if key in new and new[key] != value:
                raise ValueError(
                    f"train.{key}={value!r} and {section}.{key}={new[key]!r} are both given; "
                    f"train.{key} is the old name of {section}.{key}: keep {section}.{key} only"
                )
            new[key] = value
            warnings.warn(
                f"train.{key} is now {section}.{key}; train.{key} still works but will be removed",
                MovedKeyWarning,
                stacklevel=2,
            )
        raw["train"] = train
        return raw

    @model_validator(mode="after")
    def _sequence_parallel_fits(self) -> Config:
        sp = self.parallel.sp_size
        if sp > 1 and self.data.max_seq_len % sp:
            raise ValueError(
                f"data.max_seq_len={self.data.max_seq_len} must be a multiple of "
                f"parallel.sp_size={sp}: each rank holds an equal slice of every row"
            )
        if sp > 1 and not self.model.attn_implementation.startswith("loom_"):
            raise ValueError(
                f"parallel.sp_size={sp} needs a Loom attention backend (loom_sdpa or "
                f"loom_varlen), not model.attn_implementation={self.model.attn_implementation}"
            )
        return self

    def global_rows(self) -> int | None:
        """Rows per optimizer step, or None when the batch is counted in samples."""
        train, row_len = self.train, self.data.max_seq_len
        if train.batch_unit == "samples":
            return None
        if train.batch_unit == "rows":
            return train.global_batch_size
        if train.global_batch_size % row_len:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} tokens is not a multiple "
                f"of data.max_seq_len={row_len}, the tokens of one row"
            )
        return train.global_batch_size // row_len

    def check_world(self, dp_size: int) -> int | None:
        """Micro-batches per rank and step (None when counted in samples: it varies)."""
        rows = self.global_rows()
        if rows is None:
            return None
        per_pass = self.train.micro_batch_size * dp_size
        if rows % per_pass:
            raise ConfigError(
                f"a global batch of {rows} rows is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x {dp_size} "
                "data-parallel ranks; change one of them."
            )
        return rows // per_pass


def _parse_value(text: str) -> Any:
    # YAML reading gives numbers, booleans and lists from command-line strings.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--section.key value`` / ``--section.key=value`` pairs to a raw config dict."""
    i = 0
    while i < len(overrides):
        flag = overrides[i]
        if not flag.startswith("--") or len(flag) == 2:
            raise ConfigError(f"expected an override like --optim.lr 1e-4, got {flag!r}")
        if "=" in flag:
            key, value = flag[2:].split("=", 1)
            i += 1
        elif i + 1 < len(overrides):
            key, value = flag[2:], overrides[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {flag} has no value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[leaf] = _parse_value(value)
    return raw


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _known_keys(field.annotation, f"{prefix}{name}.")
    return keys


def _key(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _describe(err: dict[str, Any]) -> str:
    key = _key(err["loc"])
    if not key:  # a check across sections; its message names the keys
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        # A near miss of an old name points at the new one.
        names = {k: k for k in _known_keys(Config)}
        names |= {f"train.{k}": f"{section}.{k}" for k, section in MOVED_FROM_TRAIN.items()}
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {names[close[0]]}?)" if close else ""
        return f"unknown config key {key}{hint}"
    if err["type"] == "missing":
        return f"missing config key {key}"
    return f"config key {key}: {err['msg']} (got {err.get('input')!r})"


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; raise ``ConfigError`` naming every bad key."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {raw!r}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise ConfigError(f"{path}: {problems}") from None


def check_inputs(config: Config) -> None:
    """Files the run needs exist and hold good records: fail before any process starts."""
    if not (config.model.path / "config.json").is_file():
        raise ConfigError(
            f"model.path {config.model.path} has no config.json; point it at a model directory"
        )
    for i, source in enumerate(config.data.sources):
        if source.streaming:
            _check_stream(f"data.sources[{i}]", source, config.data.strict)
            continue
        if glob.has_magic(str(source.path)):
            raise ConfigError(
                f"data.sources[{i}].path {source.path} is a pattern; shards found by a glob "
                f"are read by streaming sources only: set data.sources[{i}].streaming: true"
            )
        if not source.path.exists():
            raise ConfigError(f"data.sources[{i}].path {source.path} does not exist")
        if config.data.strict and source.path.suffix in (".jsonl", ".json"):
            problem = first_bad_line(source.path, source.column, source.format)
            if problem:
                raise DataError(problem)
    check_model(config)


def check_model(config: Config) -> None:
    """Refuse, before any process starts, a model Loom cannot train with upstream's
    numbers under this config: no port and not a proven family, an attention feature
    the chosen backend would drop, a layout only ports support."""
    from loom.models.registry import PORTS, load_config, model_type, refusal

    try:
        model_config = load_config(config.model.path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"model.path {config.model.path}: cannot read config.json: {err}"
        ) from None
    problem = refusal(model_config, config.model.attn_implementation)
    if problem:
        raise ConfigError(f"model.path {config.model.path}: {problem}")
    name, p = model_type(model_config), config.parallel
    for key, size in (("sp_size", p.sp_size), ("ep_size", p.ep_size)):
        if size > 1 and name not in PORTS:
            raise ConfigError(
                f"parallel.{key}={size}, but {name} has no Loom port: only ports are "
                "proven under sequence and expert parallelism; use 1"
            )


def _check_stream(key: str, source: SourceConfig, strict: bool) -> None:
    # Records are checked as they are read; only the first one here, not the whole corpus.
    try:
        stream_shards(source.path)
    except DataError as err:
        raise ConfigError(f"{key}.streaming: {err}") from None
    problem = first_record_problem(source.path, source.format, source.column)
    if strict and problem:
        raise DataError(problem)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
