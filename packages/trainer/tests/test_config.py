import re
from pathlib import Path

import pytest
import yaml

from loom.trainer.cli import main
from loom.trainer.config import apply_overrides, load_config
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
    cfg = load_config(write(tmp_path, BASE), ["--train.lr", "1e-4", "--data.max_seq_len=64"])
    assert cfg.train.lr == 1e-4
    assert cfg.data.max_seq_len == 64
    assert cfg.train.micro_batch_size == 1  # default kept
    assert cfg.model.path == Path("model")


def test_override_creates_nested_and_parses_yaml_values():
    raw = apply_overrides({}, ["--train.betas", "[0.8, 0.9]", "--parallel.cpu_offload", "true"])
    assert raw == {"train": {"betas": [0.8, 0.9]}, "parallel": {"cpu_offload": True}}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--train.lrr", "1"], "unknown config key train.lrr (did you mean train.lr?)"),
        (["--train.steps", "many"], "config key train.steps"),
        (["--train.steps", "0"], "config key train.steps"),
        (["--bogus.key", "1"], "unknown config key bogus"),
        (["--train.lr"], "override --train.lr has no value"),
        (["train.lr", "1"], "expected an override like --train.lr 1e-4"),
        (["--parallel.dp_shard", "0"], "dp_shard must be a positive size or -1"),
        (["--train.activation_offload", "true"], "it needs activation_checkpointing: true"),
        (["--train.mlp_tile", "512", "--train.compile", "true"], "mlp_tile and compile"),
        (["--train.mlp_tile", "-1"], "config key train.mlp_tile"),
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
    assert main(["train", str(write(tmp_path, BASE)), "--print-config", "--train.lr", "0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5
    assert printed["train"]["schedule"] == "cosine"  # a default, made visible
    assert printed["data"]["sources"][0]["path"] == "data.jsonl"


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
