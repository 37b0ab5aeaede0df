import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from loom.trainer.flops import flop_model, peak_flops, sum_sq_lengths


@pytest.mark.parametrize("tied", [True, False])
def test_flop_model_counts_matmul_weights(tied):
    config = Qwen3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    fm = flop_model(model)
    # Count by hand: per layer q,k,v,o + gate,up,down + norms; then final norm and head.
    attn = 32 * 4 * 8 + 2 * (32 * 2 * 8) + 4 * 8 * 32
    mlp = 3 * 32 * 64
    norms = 2 * 32 + 2 * 8  # input/post norms, q/k norms
    expected = 3 * (attn + mlp + norms) + 32 + 100 * 32  # + final norm + lm_head
    assert fm.matmul_params == expected
    assert (fm.layers, fm.heads, fm.head_dim) == (3, 4, 8)
    assert fm.step_flops(10, 30) == 6 * expected * 10 + 6 * 3 * 4 * 8 * 30


def test_sum_sq_lengths_and_peak():
    assert sum_sq_lengths([np.array([0, 3, 5]), np.array([0, 4])]) == 9 + 4 + 16
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 100.0) == 1e14
