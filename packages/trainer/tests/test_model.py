"""The model side of the trainer against plain HF: packing isolation and HF export."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import destroy_parallel, init_parallel
from loom.trainer.export import export_hf
from loom.trainer.model import decoder_layers


def tiny_model(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_cache=False, tie_word_embeddings=tied,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_restarting_position_ids_keep_documents_apart():
    model = tiny_model()
    docs = [torch.randint(0, 64, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip(tmp_path, tied):
    class Tok:  # the exporter only asks the tokenizer to save itself
        def save_pretrained(self, out):
            (out / "tokenizer_marker").write_text("ok")

    model = tiny_model(tied)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    state = init_parallel()
    try:
        apply_fsdp(model, decoder_layers(model), state.fsdp_mesh, mixed_precision(state.device))
        export_hf(model, Tok(), tmp_path / "hf")
    finally:
        destroy_parallel()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    shared = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shared == tied
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    assert (tmp_path / "hf" / "tokenizer_marker").is_file()


def test_pretrained_model_is_built_on_meta_and_loaded_by_shards(tmp_path):
    from loom.trainer.config import load_config
    from loom.trainer.parallelize import build_parallel_model

    reference = tiny_model()
    reference.save_pretrained(tmp_path / "m")
    config = load_config(
        Path(__file__).resolve().parents[3] / "examples/tiny/train.yaml",
        ["--model.path", str(tmp_path / "m")],
    )
    state = init_parallel()
    try:
        model = build_parallel_model(config, state)
        ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    finally:
        destroy_parallel()
    assert model.loom_port
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
