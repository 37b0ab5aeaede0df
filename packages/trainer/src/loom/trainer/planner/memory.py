"""Per-GPU memory of a Loom training step, predicted from the config (no GPU needed).

What one rank holds, in bytes (N = the FSDP size, dp x sp; P = parameters, P_t = the
trainable ones: all, or the LoRA adapters; T = tokens of a micro-batch on this rank,
``micro_batch_size * max_seq_len / sp``):

- ``params``: fp32 master weights, sharded: 4 P / N. With LoRA the frozen base is stored
  in bf16 (2 bytes, sharded); with QLoRA the targeted layers' weights are NF4, about
  0.52 bytes each (``NF4_BYTES``), whole on the GPU (FSDP leaves them out).
- ``gathered``: the bf16 copy FSDP gathers for compute. At N = 1 the whole model is one
  group kept gathered through the step (2 bytes a parameter FSDP manages); else two layers
  at a time (the one computing and the one prefetched) plus the embedding and head. QLoRA
  adds the bf16 weight of the one layer being dequantized.
- ``optimizer``: AdamW's two fp32 states, sharded: 8 P_t / N.
- ``grads``: fp32 sharded gradients (4 P_t / N) and, as the backward ends, the unsharded
  bf16 gradients being reduced: the whole model's at N = 1 (2 P_t; there the
  reduce-scatter needs no second copy), else the group being reduced and its fp32 copy
  (6 bytes a parameter of two layers).
- ``activations``: what a decoder layer saves for its backward, per token, in bf16:
  2 (4 h + 3 q + 3.5 kv + 3 I) bytes (h hidden, q = heads x head_dim, kv = kv heads x
  head_dim, I intermediate; a MoE layer's I is top_k x the expert size, its routing
  buffers aside): the norms' inputs and outputs, q and k before and after their norm and
  rotary and the attention output, v, the MLP's gate, up and SwiGLU outputs. The
  coefficients are fitted to the measured slopes of two Qwen3 widths (benchmarks/
  memory_model.py, RESULTS.md 2026-12-06: within 3% of both). With activation
  checkpointing a layer keeps its input (2 h) and one layer at a time is recomputed;
  with offload those inputs wait in host memory but the one in use. With MLP tiles the
  MLP's 3 I are held for one tile of tokens only.
- ``loss``: the fused linear cross-entropy's buffers, as ``loss_bytes`` plans them from
  the kernel's own chunking: a logits chunk, ``d hidden``, and ``d weight`` when
  ``lm_head`` trains.

The step's peak is the larger of the forward's end (static, the sharded gradients of
earlier micro-batches when the step accumulates, activations and loss) and the
backward's end (static and both gradient copies), static being params, gathered and
optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.trainer.planner.size import count_parameters

GIB = 2**30
# 4 bits a weight, an 8-bit scale per block of 64, an fp32 factor per 256 blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Setup:
    """What the config decides for one rank."""

    seq: int  # tokens per row (data.max_seq_len)
    micro: int = 1  # rows per forward (train.micro_batch_size)
    accum: int = 1  # forwards per optimizer step on this rank
    fsdp: int = 1  # ranks sharing the parameters (dp x sp)
    sp: int = 1
    activation_checkpointing: bool = False
    activation_offload: bool = False  # the checkpointed inputs wait in host memory
    mlp_tile: int = 0  # tokens per MLP tile (memory.mlp_tile; 0: the whole sequence)
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_quantize: bool = False  # QLoRA: the targeted layers' base weights in NF4


@dataclass(frozen=True)
class Estimate:
    components: dict[str, int] = field(default_factory=dict)  # bytes
    peak: int = 0

    def gib(self, name: str) -> float:
        return self.components[name] / GIB


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _target_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer LoRA can target in a decoder layer."""
    text = _text(config)
    h = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    kv = text.num_key_value_heads * head_dim
    inter = text.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip


def lora_parameters(config, rank: int, targets: tuple[str, ...]) -> int:
    """r x (in + out) per targeted projection, in every decoder layer."""
    shapes = _target_shapes(config)
    per_layer = sum(rank * sum(shapes[t]) for t in targets if t in shapes)
    return _text(config).num_hidden_layers * per_layer


def targeted_weights(config, targets: tuple[str, ...]) -> tuple[int, int]:
    """The targeted layers' base weights: in all decoder layers, and the largest one."""
    sizes = [i * o for t, (i, o) in _target_shapes(config).items() if t in targets]
    return _text(config).num_hidden_layers * sum(sizes), max(sizes, default=0)


def _mlp_width(config) -> int:
    text = _text(config)
    experts = getattr(text, "num_experts", 0) or getattr(text, "num_local_experts", 0)
    if experts:
        return text.num_experts_per_tok * (
            getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        )
    return text.intermediate_size


def activation_bytes_per_token(config) -> int:
    """bf16 bytes one decoder layer saves per token for its backward (docstring)."""
    text = _text(config)
    h = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    kv = text.num_key_value_heads * head_dim
    return int(2 * (4 * h + 3 * q + 3.5 * kv + 3 * _mlp_width(config)))


def loss_bytes(config, tokens: int, needs_dw: bool) -> int:
    """What the fused linear cross-entropy holds (``loom.kernels.linear_cross_entropy``
    plans its chunks from the same sizes): its bf16 logits chunk, ``d hidden``, and
    ``d weight`` when ``lm_head`` trains (fp32 when it sums several chunks); in two
    passes, the weight pass's block buffer too."""
    import torch

    from loom.kernels.linear_cross_entropy import plan_chunks

    text = _text(config)
    vocab, h = text.vocab_size, text.hidden_size
    weight = torch.empty(vocab, h, dtype=torch.bfloat16, device="meta")
    chunk, block = plan_chunks(tokens, h, weight, needs_dw=needs_dw)
    held = 2 * chunk * vocab + 2 * tokens * h
    if block is not None:
        return held + 2 * tokens * block + (2 * vocab * h if needs_dw else 0)
    return held + ((4 if chunk < tokens else 2) * vocab * h if needs_dw else 0)


def estimate(config, setup: Setup) -> Estimate:
    """The per-rank memory of a training step of ``config`` under ``setup``."""
    text = _text(config)
    total = count_parameters(config).total
    trainable = (
        lora_parameters(config, setup.lora_rank, setup.lora_targets) if setup.lora_rank else total
    )
    n, layers = setup.fsdp, text.num_hidden_layers
    tokens = setup.micro * setup.seq // setup.sp
    frozen = total - trainable
    quantized, largest = (
        targeted_weights(config, setup.lora_targets) if setup.lora_quantize else (0, 0)
    )
    params = (4 * trainable + 2 * (frozen - quantized)) / n + NF4_BYTES * quantized
    managed = total - quantized  # what FSDP gathers
    if n == 1:
        gathered, unsharded_grads = 2 * managed, 2 * trainable
    else:
        gathered, unsharded_grads = 2 * 2 * managed / layers, 6 * 2 * trainable / layers
    gathered += 2 * largest  # QLoRA: one layer's weight dequantized to bf16
    per_layer_tokens = activation_bytes_per_token(config) * tokens
    if 0 < setup.mlp_tile < tokens:  # the MLP keeps its input; a tile's rest is transient
        per_layer_tokens -= 2 * 3 * _mlp_width(config) * (tokens - setup.mlp_tile)
    if setup.activation_checkpointing and setup.activation_offload:
        activations = 2 * text.hidden_size * tokens + per_layer_tokens
    elif setup.activation_checkpointing:
        activations = layers * 2 * text.hidden_size * tokens + per_layer_tokens
    else:
        activations = layers * per_layer_tokens
    components = {
        "params": int(params),
        "gathered": int(gathered),
        "optimizer": 8 * trainable // n,
        "grads": 4 * trainable // n + int(unsharded_grads),
        "activations": int(activations),
        "loss": loss_bytes(config, tokens, needs_dw=not setup.lora_rank),
    }
    static = components["params"] + components["gathered"] + components["optimizer"]
    # With accumulation the sharded gradients of the micro-batches before are held too.
    held_grads = 4 * trainable // n if setup.accum > 1 else 0
    forward_end = static + held_grads + components["activations"] + components["loss"]
    backward_end = static + components["grads"]
    return Estimate(components, max(forward_end, backward_end))
