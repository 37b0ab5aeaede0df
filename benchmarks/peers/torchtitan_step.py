"""torchtitan as a benchmark peer: its own Qwen3 model, parallelize path, loss and optimizer.

Code path (torchtitan 0.3.0 wheel on torch 2.11), the steps of ``torchtitan.trainer.Trainer``
at world size 1 without importing the trainer (it pulls in datasets/torchdata/tokenizers):

- model: ``torchtitan.models.qwen3.Qwen3Model.Config`` from the package's own
  ``_build_qwen3_layers`` (fused wqkv, qk-norm, ``CosSinRoPE`` with ``max_seq_len=seq`` as
  ``update_from_config`` sets it, FlexAttention by default), its init (normal 0.02 linears;
  tied embedding initialised through ``lm_head``, as its 0.6B/1.7B flavors do), the dims and
  eps of the HF config dict; built on meta, then ``to_empty`` + ``init_weights``.
- parallelize: ``torchtitan.models.qwen3.parallelize_qwen3`` itself, with
  ``ParallelDims(world_size=1, spmd_backend="partial_dtensor")``, ``TrainingConfig``
  (bf16 param / fp32 reduce defaults), ``ParallelismConfig``, ``CompileConfig``: AC
  (``FullAC``; ``SelectiveAC``, its qwen3 recipes' choice, with ``ac_mode="selective"``), then
  per-block ``torch.compile(fullgraph=True)`` (``apply_compile``), then
  ``apply_fsdp_to_decoder`` (FSDP2 ``fully_shard`` with ``MixedPrecisionPolicy(bf16, fp32)``
  on its always-kept size-1 "fsdp" mesh). Its default ``spmd_types`` backend needs
  ``fully_shard(dp_mesh_dims=...)``, which torch 2.11 lacks, so it is not used.
- loss: ``torchtitan.components.loss.CrossEntropyLoss`` (fp32 CE, sum / valid tokens of the
  whole step), compiled when ``compile`` (CompileConfig's components: model and loss). Its
  recipes wrap it in ``ChunkedLossWrapper``; on torch 2.11 that fails in backward (the final
  norm's FSDP-resharded weight: "tensor ... data is not allocated yet"), so logits are whole.
- data: labels are torchtitan's dataloader shift (``labels[t] = tokens[t+1]``, last one
  ``IGNORE_INDEX``: the same targets as HF's ``labels=tokens``); ``positions`` = arange(seq)
  per row; the flex BlockMask is built per micro-batch by ``model.get_attention_masks``, as
  ``Trainer.post_dataloading_process`` does.
- optimizer: ``default_adamw(lr)`` -> ``OptimizersContainer`` (AdamW, betas (0.9, 0.95),
  eps 1e-8, weight_decay 0.1, ``implementation="fused"``). Trainer steps left out: grad
  clipping (``max_norm`` > 0 adds it), LR schedule, the 0.3.0 trainer's CUDA-graph capture of
  forward+backward, its GC control, metrics, checkpointing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch


def _torch_compat() -> None:
    """torchtitan 0.3.0 targets a torch newer than 2.11; two shims, no-ops on a newer torch:

    - it imports ``torch.distributed.fsdp.DataParallelMeshDims`` at module level but uses it
      only with ``dp_mesh_dims`` (full_dtensor/spmd_types backends, unused here): placeholder.
    - ``Decoder`` passes ``create_block_mask(separate_full_blocks=True)``; torch 2.11 has no
      such argument and always separates full blocks (the same mask): the argument is dropped.
    """
    import inspect

    import torch.distributed.fsdp as fsdp
    from torch.nn.attention.flex_attention import create_block_mask

    if not hasattr(fsdp, "DataParallelMeshDims"):
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})
    if "separate_full_blocks" not in inspect.signature(create_block_mask).parameters:
        import torchtitan.models.common.decoder as decoder

        original = decoder.create_attention_mask
        if not getattr(original, "_loom_compat", False):

            def create_attention_mask(*args: Any, separate_full_blocks: bool = True, **kw: Any):
                assert separate_full_blocks, "torch 2.11 always separates full blocks"
                return original(*args, **kw)

            create_attention_mask._loom_compat = True  # type: ignore[attr-defined]
            decoder.create_attention_mask = create_attention_mask


def _init_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )


def _qwen3_config(cfg: dict[str, Any], seq: int, attn_backend: str):
    import torchtitan.models.qwen3 as q3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.nn_modules import RMSNorm

    dim, head_dim, vocab = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))

    def norm(n: int) -> RMSNorm.Config:
        return RMSNorm.Config(normalized_shape=n, eps=cfg["rms_norm_eps"], param_init=q3._NORM_INIT)

    sdpa = attn_backend == "sdpa"
    layers = q3._build_qwen3_layers(
        n_layers=cfg["num_hidden_layers"],
        dim=dim,
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg["num_key_value_heads"],
        head_dim=head_dim,
        hidden_dim=cfg["intermediate_size"],
        attn_backend="flex" if sdpa else attn_backend,
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=seq, theta=cfg["rope_theta"]),
    )
    for layer in layers:  # _build_qwen3_layers hard-codes eps 1e-6; honour the shape's eps
        layer.attention_norm, layer.ffn_norm = norm(dim), norm(dim)
        layer.attention.qk_norm = norm(head_dim)
        if sdpa:  # torchtitan's own causal SDPA module (its LM configs refuse "sdpa" by name)
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
    shape_cfg: dict[str, Any],
    seq: int,
    micro: int,
    accum: int,
    compile: bool,
    ac: bool,
    device: torch.device | str,
    *,
    ac_mode: str = "full",
    attn_backend: str = "flex",
    lr: float = 1e-5,
    max_norm: float = 0.0,
    seed: int = 0,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Build torchtitan's Qwen3 with ``shape_cfg``'s dims and return ``(step, n_params)``.

    ``step(tokens)`` takes int64 ids ``[micro, seq]`` on ``device``, runs ``accum``
    forward+backward micro-batches on them, then the optimizer step and zero_grad, and
    returns the last micro-batch's loss (its sum / the step's valid tokens: mean / accum, as
    the HF peer's ``loss / accum``).
    ``ac_mode``: "full" (FullAC, like the HF peer's per-layer checkpointing) or
    "selective" (SelectiveAC, torchtitan's qwen3 recipe default). ``attn_backend``: "flex"
    (torchtitan's default; torch has no flex backward on CPU), "varlen" (CUDA, untested
    here) or "sdpa" (torchtitan's own causal ``ScaledDotProductAttention``; cuDNN, flash or
    math). ``max_norm`` > 0 adds torchtitan's ``clip_grad_norm_`` (its trainer's is 1.0).
    """
    _torch_compat()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _init_process_group(device)

    import torchtitan.distributed.parallel_dims as parallel_dims_module
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.models.qwen3 import parallelize_qwen3

    parallel_dims_module.device_type = device.type  # "cuda" even with no GPU (CPU tests)
    backend = "partial_dtensor"
    dist_utils.set_spmd_backend(backend)
    parallelism = ParallelismConfig(spmd_backend=backend)
    parallel_dims = ParallelDims.from_config(parallelism, world_size=1)
    compile_config = CompileConfig(enable=compile)  # components: model + loss
    ac_config = {"full": FullAC.Config, "selective": SelectiveAC.Config}[ac_mode]() if ac else None

    torch.manual_seed(seed)
    model_config = _qwen3_config(shape_cfg, seq, attn_backend)
    with torch.device("meta"):
        model = model_config.build()
    model = parallelize_qwen3(
        model,
        parallel_dims=parallel_dims,
        training=TrainingConfig(local_batch_size=micro, seq_len=seq),  # bf16 param / fp32 reduce
        parallelism=parallelism,
        compile_config=compile_config,
        ac_config=ac_config,
        dump_folder="",
    )
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    loss_fn = CrossEntropyLoss.Config(global_vocab_size=shape_cfg["vocab_size"]).build(
        compile_config=compile_config
    )
    optimizers = default_adamw(lr=lr).build(model_parts=[model])
    n_params = sum(p.numel() for p in model.parameters())  # tied weight counted once

    positions = torch.arange(seq, device=device).expand(micro, seq)
    cache: dict[str, torch.Tensor] = {}

    def step(tokens: torch.Tensor) -> torch.Tensor:
        if cache.get("tokens") is not tokens:  # labels as torchtitan's dataloader shifts them
            labels = torch.full_like(tokens, IGNORE_INDEX)
            labels[:, :-1] = tokens[:, 1:]
            cache.update(tokens=tokens, labels=labels)
            cache["valid"] = (labels != IGNORE_INDEX).sum() * accum
        labels, valid = cache["labels"], cache["valid"]
        for _ in range(accum):
            masks = (
                None if attn_backend == "sdpa" else model.get_attention_masks(positions=positions)
            )
            logits = model(tokens, positions=positions, attention_masks=masks)
            loss, _ = loss_fn(logits, labels, valid)
            del logits
            loss.backward()
        if max_norm > 0:
            dist_utils.clip_grad_norm_(list(model.parameters()), max_norm, foreach=True)
        optimizers.step()
        optimizers.zero_grad()
        return loss

    return step, n_params
