"""torchtitan as a benchmark peer: its own Qwen3, parallelize path, loss and optimizer.

Code path (torchtitan 0.3.0 wheel on torch 2.11), the steps of ``torchtitan.trainer.Trainer``
at world size 1 without importing the trainer (it pulls in datasets/torchdata/tokenizers):

- model: ``torchtitan.models.qwen3.Qwen3Model.Config`` from the package's own
  ``_build_qwen3_layers`` (fused wqkv, qk-norm, ``CosSinRoPE`` with ``max_seq_len=seq`` as
  ``update_from_config`` sets it), its init (normal 0.02 linears; tied embedding initialised
  through ``lm_head``, as its 0.6B/1.7B flavors do), the dims and eps of the HF config dict;
  built on meta, then ``to_empty`` + ``init_weights``. Attention is torchtitan's own causal
  ``ScaledDotProductAttention`` module: its FlexAttention default compiles with max-autotune,
  minutes per shape.
- parallelize: ``torchtitan.models.qwen3.parallelize_qwen3`` itself, with
  ``ParallelDims(world_size=1, spmd_backend="partial_dtensor")``, ``TrainingConfig``
  (bf16 param / fp32 reduce defaults), ``ParallelismConfig``, ``CompileConfig``: AC
  (``FullAC``, like the HF peer's per-layer checkpointing), then per-block
  ``torch.compile(fullgraph=True)`` (``apply_compile``), then ``apply_fsdp_to_decoder``
  (FSDP2 ``fully_shard`` with ``MixedPrecisionPolicy(bf16, fp32)``). Its default
  ``spmd_types`` backend needs ``fully_shard(dp_mesh_dims=...)``, which torch 2.11 lacks.
- loss: ``torchtitan.components.loss.CrossEntropyLoss`` (fp32 CE, sum / valid tokens of the
  whole step), compiled when ``compile``. Its recipes wrap it in ``ChunkedLossWrapper``; on
  torch 2.11 that fails in backward (the final norm's FSDP-resharded weight: "tensor ...
  data is not allocated yet"), so logits are whole.
- data: labels are torchtitan's dataloader shift (``labels[t] = tokens[t+1]``, last one
  ``IGNORE_INDEX``: the same targets as HF's ``labels=tokens``); ``positions`` = arange(seq).
- optimizer: ``default_adamw(lr)`` -> ``OptimizersContainer`` (AdamW, betas (0.9, 0.95),
  eps 1e-8, weight_decay 0.1, ``implementation="fused"``). Trainer steps left out, as for
  the other systems: grad clipping, LR schedule, metrics, checkpointing (and the 0.3.0
  trainer's CUDA-graph capture of forward+backward, its GC control).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loom.dist.mesh import init_parallel


def _torch_compat() -> None:
    """torchtitan 0.3.0 imports ``torch.distributed.fsdp.DataParallelMeshDims`` (torch newer
    than 2.11) at module level, but uses it only with the backends not used here: a
    placeholder."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})


def _qwen3_config(cfg: dict[str, Any], seq: int):
    import torchtitan.models.qwen3 as q3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.nn_modules import RMSNorm

    dim, head_dim, vocab = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))

    def norm(n: int) -> RMSNorm.Config:
        return RMSNorm.Config(normalized_shape=n, eps=cfg["rms_norm_eps"], param_init=q3._NORM_INIT)

    layers = q3._build_qwen3_layers(
        n_layers=cfg["num_hidden_layers"],
        dim=dim,
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg["num_key_value_heads"],
        head_dim=head_dim,
        hidden_dim=cfg["intermediate_size"],
        attn_backend="flex",  # its LM configs refuse "sdpa" by name: swapped below
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=seq, theta=cfg["rope_theta"]),
    )
    for layer in layers:  # _build_qwen3_layers hard-codes eps 1e-6; honour the shape's eps
        layer.attention_norm, layer.ffn_norm = norm(dim), norm(dim)
        layer.attention.qk_norm = norm(head_dim)
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return q3.Qwen3Model.Config(
        vocab_size=vocab,
        dim=dim,
        norm=norm(dim),
        enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab,
            embedding_dim=dim,
            param_init=q3._EMBEDDING_SKIP_INIT if tied else q3._EMBEDDING_INIT,
        ),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=q3._LINEAR_INIT),
        layers=layers,
    )


def torchtitan_step_fn(
    shape_cfg: dict[str, Any], seq: int, micro: int, accum: int, compile: bool, ac: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchtitan's Qwen3 with ``shape_cfg``'s dims, on this process's device (world size 1);
    returns ``step``.

    ``step(tokens)`` takes int64 ids ``[micro, seq]`` on that device, runs ``accum``
    forward+backward micro-batches on them, then the optimizer step and zero_grad, and
    returns the last micro-batch's loss (its sum / the step's valid tokens: mean / accum, as
    the HF peer's ``loss / accum``).
    """
    _torch_compat()
    device = init_parallel().device

    import torchtitan.distributed.parallel_dims as parallel_dims_module
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.models.qwen3 import parallelize_qwen3

    parallel_dims_module.device_type = device.type  # it assumes "cuda" (the CPU tests)
    backend = "partial_dtensor"
    dist_utils.set_spmd_backend(backend)
    parallelism = ParallelismConfig(spmd_backend=backend)
    compile_config = CompileConfig(enable=compile)  # components: model + loss
    with torch.device("meta"):
        model = _qwen3_config(shape_cfg, seq).build()
    model = parallelize_qwen3(
        model,
        parallel_dims=ParallelDims.from_config(parallelism, world_size=1),
        training=TrainingConfig(local_batch_size=micro, seq_len=seq),  # bf16 param / fp32 reduce
        parallelism=parallelism,
        compile_config=compile_config,
        ac_config=FullAC.Config() if ac else None,
        dump_folder="",
    )
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_fn = CrossEntropyLoss.Config(global_vocab_size=shape_cfg["vocab_size"]).build(
        compile_config=compile_config
    )
    optimizers = default_adamw(lr=1e-5).build(model_parts=[model])  # the other systems' lr
    positions = torch.arange(seq, device=device).expand(micro, seq)

    made: dict[str, torch.Tensor] = {}  # labels once per batch of tokens, outside the step

    def step(tokens: torch.Tensor) -> torch.Tensor:
        if made.get("tokens") is not tokens:
            labels = torch.full_like(tokens, IGNORE_INDEX)
            labels[:, :-1] = tokens[:, 1:]
            made.update(tokens=tokens, labels=labels, valid=(labels != IGNORE_INDEX).sum() * accum)
        labels, valid = made["labels"], made["valid"]
        for _ in range(accum):
            loss, _ = loss_fn(
                model(tokens, positions=positions[:, : tokens.shape[1]]), labels, valid
            )
            loss.backward()
        optimizers.step()
        optimizers.zero_grad()
        return loss

    return step
