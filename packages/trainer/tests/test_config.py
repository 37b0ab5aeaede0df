import re
from pathlib import Path

import pytest
import yaml

from loom.trainer.cli import main
from loom.trainer.config import (
    MOVED_FROM_TRAIN,
    MemoryConfig,
    MovedKeyWarning,
    OptimConfig,
    apply_overrides,
    load_config,
)
from loom.trainer.errors import ConfigError

BASE = {
    "model": {"path": "model"},
    "data": {"path": "data.jsonl", "max_seq_len": 32},
    "train": {"output_dir": "out", "steps": 3, "global_batch_size": 4},
}


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def test_valid_config_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["--optim.lr", "1e-4", "--data.max_seq_len=64"])
    assert cfg.optim.lr == 1e-4
    assert cfg.data.max_seq_len == 64
    assert cfg.train.micro_batch_size == 1  # default kept
    assert cfg.model.path == Path("model")


def test_override_creates_nested_and_parses_yaml_values():
    raw = apply_overrides({}, ["--optim.betas", "[0.8, 0.9]", "--parallel.cpu_offload", "true"])
    assert raw == {"optim": {"betas": [0.8, 0.9]}, "parallel": {"cpu_offload": True}}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--optim.lrr", "1"], "unknown config key optim.lrr (did you mean optim.lr?)"),
        (["--train.lrr", "1"], "unknown config key train.lrr (did you mean optim.lr?)"),
        (["--train.steps", "many"], "config key train.steps"),
        (["--train.steps", "0"], "config key train.steps"),
        (["--bogus.key", "1"], "unknown config key bogus"),
        (["--optim.lr"], "override --optim.lr has no value"),
        (["optim.lr", "1"], "expected an override like --optim.lr 1e-4"),
        (["--parallel.dp_shard", "0"], "dp_shard must be a positive size or -1"),
        (["--memory.activation_offload", "true"], "needs memory.activation_checkpointing: true"),
        (["--memory.mlp_tile", "512", "--memory.compile", "true"], "mlp_tile and memory.compile"),
        (["--memory.mlp_tile", "-1"], "config key memory.mlp_tile"),
        (["--optim.schedule", "step"], "config key optim.schedule"),
        (["--lora.rank", "-1"], "config key lora.rank"),
        (["--lora.targets", "[]"], "config key lora.targets"),
        (["--lora.dropout", "1"], "config key lora.dropout"),
        (["--hardware", "h100"], "did you mean h100-sxm or h100-pcie"),
        (
            ["--hardware", "{name: x, memory_gib: -1, bf16_tflops: 1, interconnect: pcie}"],
            "hardware.memory_gib",
        ),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(write(tmp_path, BASE), overrides)
    assert needle in str(info.value)


def test_missing_key_is_named(tmp_path):
    raw = {k: dict(v) for k, v in BASE.items()}
    del raw["train"]["steps"]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    assert "missing config key train.steps" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_batch_must_divide_over_ranks(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["--train.micro_batch_size", "2"])
    assert cfg.check_world(2) == 1
    assert cfg.check_world(1) == 2
    with pytest.raises(ConfigError, match="a global batch of 4 rows is not a multiple"):
        cfg.check_world(3)
    tokens = load_config(write(tmp_path, BASE), ["--train.batch_unit", "tokens"])
    with pytest.raises(
        ConfigError, match=re.escape("4 tokens is not a multiple of data.max_seq_len=32")
    ):
        tokens.check_world(1)
    tokens.train.global_batch_size = 128
    assert tokens.global_rows() == 4
    samples = load_config(write(tmp_path, BASE), ["--train.batch_unit", "samples"])
    assert samples.check_world(3) is None


def test_single_source_shorthand_and_sources_list(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["--data.format", "chat"])
    assert len(cfg.data.sources) == 1
    assert cfg.data.sources[0].column == "messages"
    raw = {**BASE, "data": {"sources": [{"path": "a.jsonl", "weight": 2}, {"path": "b.parquet"}]}}
    cfg = load_config(write(tmp_path, raw))
    assert [s.weight for s in cfg.data.sources] == [2.0, 1.0]
    with pytest.raises(ConfigError, match=re.escape("data.sources[0].weight")):
        load_config(write(tmp_path, raw), ["--data.sources", "[{path: a.jsonl, weight: -1}]"])


def test_cli_reports_one_paragraph_and_exits_2(tmp_path, capsys):
    code = main(["train", str(write(tmp_path, BASE)), "--train.lrr", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and "train.lrr" in err
    assert "Traceback" not in err


def test_cli_names_missing_model_and_data(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    cfg = write(tmp_path, BASE)
    args = ["train", str(cfg), "--model.path", str(tmp_path / "model")]
    assert main(args) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(args) == 2
    assert "data.sources[0].path data.jsonl does not exist" in capsys.readouterr().err


def test_print_config_shows_resolved_values(tmp_path, capsys):
    assert main(["train", str(write(tmp_path, BASE)), "--print-config", "--optim.lr", "0.5"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    sections = [
        "model",
        "data",
        "train",
        "optim",
        "memory",
        "parallel",
        "checkpoint",
        "log",
        "lora",
        "hardware",
    ]
    assert list(printed) == sections
    assert printed["optim"]["lr"] == 0.5
    assert printed["optim"]["schedule"] == "cosine"  # a default, made visible
    assert printed["memory"]["activation_checkpointing"] is False
    assert "lr" not in printed["train"] and "compile" not in printed["train"]
    assert printed["data"]["sources"][0]["path"] == "data.jsonl"
    assert err == ""


def test_optim_and_memory_sections(tmp_path):
    raw = {
        **BASE,
        "optim": {"lr": 1e-3, "betas": [0.8, 0.99], "schedule": "linear", "grad_clip": 0},
        "memory": {"activation_checkpointing": True, "ac_every": 2, "activation_offload": True},
    }
    cfg = load_config(write(tmp_path, raw))
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.schedule) == (1e-3, (0.8, 0.99), "linear")
    assert cfg.optim.grad_clip == 0 and cfg.optim.warmup_steps == 0
    assert cfg.memory.ac_every == 2 and cfg.memory.activation_offload
    assert not cfg.memory.compile and cfg.memory.mlp_tile == 0


# Each key that moved out of train: its section, a value other than its default.
OLD_KEYS = [
    ("lr", "optim", "0.5", 0.5),
    ("betas", "optim", "[0.8, 0.9]", (0.8, 0.9)),
    ("eps", "optim", "1e-6", 1e-6),
    ("weight_decay", "optim", "0.1", 0.1),
    ("schedule", "optim", "linear", "linear"),
    ("warmup_steps", "optim", "5", 5),
    ("min_lr_ratio", "optim", "0.2", 0.2),
    ("grad_clip", "optim", "0.5", 0.5),
    ("activation_checkpointing", "memory", "true", True),
    ("ac_every", "memory", "2", 2),
    ("activation_offload", "memory", "true", True),
    ("mlp_tile", "memory", "64", 64),
    ("compile", "memory", "true", True),
]


def test_every_moved_key_is_tested():
    assert {key: section for key, section, _, _ in OLD_KEYS} == MOVED_FROM_TRAIN
    # every optim / memory key but those born in their section (no train.* ever existed)
    born_there = {"vision_lr"}
    fields = set(OptimConfig.model_fields) | set(MemoryConfig.model_fields)
    assert set(MOVED_FROM_TRAIN) == fields - born_there


@pytest.mark.parametrize("key, section, text, value", OLD_KEYS)
def test_old_train_key_lands_in_its_section_and_names_it(tmp_path, key, section, text, value):
    extra = ["--memory.activation_checkpointing", "true"] if key == "activation_offload" else []
    with pytest.warns(MovedKeyWarning) as caught:
        cfg = load_config(write(tmp_path, BASE), [f"--train.{key}", text, *extra])
    assert [str(w.message) for w in caught] == [
        f"train.{key} is now {section}.{key}; train.{key} still works but will be removed"
    ]
    assert getattr(getattr(cfg, section), key) == value
    # the same key in the YAML file
    raw = {**BASE, "train": {**BASE["train"], key: yaml.safe_load(text)}}
    with pytest.warns(MovedKeyWarning, match=rf"^train\.{key} is now {section}\.{key};"):
        cfg = load_config(write(tmp_path, raw), extra)
    assert getattr(getattr(cfg, section), key) == value


def test_old_and_new_key_together(tmp_path):
    path = write(tmp_path, {**BASE, "train": {**BASE["train"], "lr": 0.1}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--optim.lr", "0.2"])
    assert "train.lr=0.1 and optim.lr=0.2 are both given" in str(info.value)
    assert "keep optim.lr only" in str(info.value)
    with pytest.warns(MovedKeyWarning):  # the same value twice is no conflict
        assert load_config(path, ["--optim.lr", "0.1"]).optim.lr == 0.1


def test_cli_names_the_new_key_once_on_stderr(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, {**BASE, "train": {**BASE["train"], "warmup_steps": 3}})
    args = ["train", str(path), "--print-config", "--train.lr", "0.5"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    optim = yaml.safe_load(out)["optim"]
    assert (optim["lr"], optim["warmup_steps"]) == (0.5, 3)
    assert err.splitlines() == [
        "warning: train.warmup_steps is now optim.warmup_steps; train.warmup_steps still "
        "works but will be removed",
        "warning: train.lr is now optim.lr; train.lr still works but will be removed",
    ]
    # Ranks the loom launcher started read the same config again: they stay quiet.
    monkeypatch.setenv("LOOM_ERROR_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(args) == 0
    assert capsys.readouterr().err == ""


def test_plot_command(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    lines = [f'{{"step": {s}, "loss": {5 - s / 10}, "tokens_per_s": 100.0}}' for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("loss.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_streaming_keys_and_their_checks(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text('{"text": "ok"}\n')
    raw = {**BASE, "model": {"path": str(tmp_path / "model")}}
    args = ["train", str(write(tmp_path, raw)), "--data.path", str(shards)]
    assert main([*args, "--print-config", "--data.streaming", "true"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]["sources"][0]
    assert printed["streaming"] is True and printed["shuffle_buffer"] == 10_000
    assert main([*args, "--data.field", "body", "--data.streaming", "true"]) == 2
    assert 'part-0.jsonl:1: field "body" is missing' in capsys.readouterr().err
    assert main([*args[:-1], str(shards / "*.jsonl")]) == 2
    assert "set data.sources[0].streaming: true" in capsys.readouterr().err
    import datasets

    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    saved = ["--data.path", str(tmp_path / "saved"), "--data.streaming", "true"]
    assert main([*args[:2], *saved]) == 2
    assert "data.sources[0].streaming: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape("data.sources[0].shuffle_buffer")):
        load_config(write(tmp_path, BASE), ["--data.shuffle_buffer", "-1"])
