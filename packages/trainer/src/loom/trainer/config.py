"""Run configuration: a YAML file plus dotted command-line overrides, validated.

Relative paths are taken from the current working directory, as every other tool does.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loom.trainer.data_check import first_bad_line
from loom.trainer.errors import ConfigError, DataError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: Path = Field(description="model directory: config.json, tokenizer, optional safetensors")
    trust_remote_code: bool = False


class DataConfig(Section):
    path: Path = Field(description="JSON-lines file, one record per line")
    text_field: str = "text"
    max_seq_len: int = Field(2048, gt=1)


class TrainConfig(Section):
    output_dir: Path
    overwrite: bool = False
    seed: int = 0
    steps: int = Field(gt=0)
    global_batch_size: int = Field(gt=0, description="rows per optimizer step, all ranks")
    micro_batch_size: int = Field(1, gt=0, description="rows per forward pass on one rank")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max total grad norm; 0 turns clipping off")


class ParallelConfig(Section):
    dp_replicate: int = Field(1, gt=0)
    dp_shard: int = Field(-1, description="-1: whatever the world size leaves")
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    @model_validator(mode="after")
    def _dp_shard_positive_or_auto(self) -> ParallelConfig:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError("dp_shard must be a positive size or -1 (auto)")
        return self


class Config(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()

    def check_world(self, world_size: int) -> int:
        """Gradient-accumulation steps for ``world_size`` data-parallel ranks."""
        rows_per_pass = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % rows_per_pass:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x {world_size} "
                "data-parallel ranks; change one of them."
            )
        return self.train.global_batch_size // rows_per_pass


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
            raise ConfigError(f"expected an override like --train.lr 1e-4, got {flag!r}")
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


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(Config), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
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
    """Files the run needs exist: fail before any process is started."""
    if not (config.model.path / "config.json").is_file():
        raise ConfigError(
            f"model.path {config.model.path} has no config.json; point it at a model directory"
        )
    if not config.data.path.is_file():
        raise ConfigError(f"data.path {config.data.path} does not exist")
    problem = first_bad_line(config.data.path, config.data.text_field)
    if problem:
        raise DataError(problem)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
