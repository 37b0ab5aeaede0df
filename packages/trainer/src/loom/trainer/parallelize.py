"""The one place a model is made parallel, in this order (each step assumes the ones
before it):

1. activation checkpointing (HF's per-layer switch, every ``ac_every``-th layer);
2. offload of the checkpointed layers' inputs to host memory (needs 1);
3. MLP tiles (the MLP a tile of tokens at a time);
4. compile (each decoder layer's forward; the hooks of 1 and 6 stay eager around it);
5. expert sharding (a MoE port's experts ``Shard(0)`` over the ep mesh);
6. FSDP2 (per decoder layer and the root over dp x sp; experts over the expert mesh);
7. sequence parallelism (the SP group set on the model's modules, read by attention and
   the MoE aux loss);
8. weight loading (meta-built parameters materialised shard by shard, filled from HF
   safetensors through the port's converter).
"""

from __future__ import annotations

import torch
from torch import nn

from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.loading import materialize
from loom.dist.mesh import ParallelState
from loom.models.attention import set_sequence_parallel
from loom.models.registry import load_weights, model_type, port_hooks
from loom.trainer.config import Config, MemoryConfig, ParallelConfig
from loom.trainer.errors import ConfigError
from loom.trainer.lora import (
    adapter_names,
    apply_lora,
    base_renames,
    check_qlora,
    init_adapters,
    quantize_base,
    quantized_weights,
    store_frozen,
)
from loom.trainer.memory import offload_checkpointed_inputs, tile_mlps
from loom.trainer.model import (
    build_model,
    decoder_layers,
    freeze_vision,
    has_weights,
    vision_blocks,
)


def build_parallel_model(config: Config, parallel: ParallelState) -> nn.Module:
    """The model on this rank's device, made parallel by ``parallelize``.

    With safetensors in ``model.path`` it is built with its parameters on the meta device,
    sharded, and each rank reads only its own shards (through the port's converter where
    HF's layout differs): no rank ever holds the whole model. Otherwise every rank
    initialises the whole model from the same seed and keeps its shard.
    """
    if config.lora.rank == "auto":
        raise ConfigError("lora.rank auto is resolved when the run starts (loom train)")
    pretrained = has_weights(config.model.path)
    qlora = config.lora.quantize == "nf4"
    if qlora:
        check_qlora(parallel.device, parallel.world_size)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.path, config.model.attn_implementation, meta=pretrained)
    if not pretrained:
        model.to(parallel.device)
    if config.model.freeze_vit:
        freeze_vision(model)
    layers = apply_lora(model, config.lora) if config.lora.enabled else []
    if layers:
        store_frozen(model, mixed_precision(parallel.device).param_dtype)
    if qlora:
        # The base is quantized whole, before sharding: load it first (one GPU, so the
        # bf16 model fits where its 4-bit copy will live).
        if pretrained:
            materialize(model, parallel.device, init=lambda model: None)
            load_weights(model, config.model.path, base_renames(layers), adapter_names(model))
            pretrained = False
        quantize_base(model)
    parallelize(model, parallel, memory=config.memory, parallel_config=config.parallel)
    if pretrained:
        # buffers kept their values; every parameter is filled from the checkpoint next
        materialize(model, parallel.device, init=lambda model: None)
        load_weights(model, config.model.path, base_renames(layers), adapter_names(model))
    if layers:
        init_adapters(model, config.train.seed)
    return model


def parallelize(
    model: nn.Module,
    parallel: ParallelState,
    *,
    memory: MemoryConfig,
    parallel_config: ParallelConfig,
) -> None:
    """Steps 1-7 of the module docstring, as the ``memory`` and ``parallel`` sections ask."""
    if memory.activation_checkpointing:
        enable_activation_checkpointing(model, memory.ac_every)
    if memory.activation_offload:
        offload_checkpointed_inputs(model)
    if memory.mlp_tile:
        tile_mlps(model, memory.mlp_tile)
    if memory.compile:
        compile_decoder_layers(model)
    shard_model(
        model,
        parallel,
        reshard_after_forward=parallel_config.reshard_after_forward,
        cpu_offload=parallel_config.cpu_offload,
    )
    set_sequence_parallel(model, parallel.sp_group if parallel.sp_size > 1 else None)


def enable_activation_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Recompute every ``every``-th decoder layer's activations in backward.

    Uses HF's own per-layer switch (non-reentrant ``torch.utils.checkpoint``), which runs
    inside each layer's call and so composes with FSDP2's per-layer hooks.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index % every == 0


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer's forward, and each vision block's of a
    vision-language model. The hooks around the call (FSDP's gather and reshard,
    activation checkpointing) stay eager; the layers share one code object, so they share
    the compiled graph instead of compiling once each. A vision block's attention splits
    by image on the host (a graph break); its norms and MLP compile."""
    for layer in [*decoder_layers(model), *vision_blocks(model)]:
        layer.forward = torch.compile(layer.forward)


def shard_model(
    model: nn.Module,
    parallel: ParallelState,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """A MoE port's experts ``Shard(0)`` over the ep mesh, then FSDP2 over dp x sp (and
    the experts over the expert mesh)."""
    hooks = port_hooks(model_type(model.config))
    if parallel.sp_size > 1 and not getattr(model, "loom_port", False):
        raise ConfigError(
            f"parallel.sp_size={parallel.sp_size}, but {model_type(model.config)} has no Loom "
            "port: its layers are not known to keep tokens apart outside attention; use sp_size 1"
        )
    experts = []
    if hooks.expert_plan is not None:
        hooks.expert_plan.apply(model, parallel.ep_mesh)
        experts = hooks.expert_modules(model)
    elif parallel.ep_size > 1:
        raise ConfigError(
            f"parallel.ep_size={parallel.ep_size}, but {model_type(model.config)} has no "
            "Loom port with experts to spread; use ep_size 1"
        )
    # One rank keeps whole parameters all step (nothing to reshard after forward or
    # between micro-batches), so groups per layer would save no memory and only add
    # hooks, copies and launches per layer: one group for the whole model instead.
    one_group = parallel.fsdp_size == 1 and not cpu_offload
    apply_fsdp(
        model,
        # a vision-language model's vision blocks are sharded one by one too
        layers=[] if one_group else vision_blocks(model) + decoder_layers(model),
        mesh=parallel.fsdp_mesh,
        mp_policy=mixed_precision(parallel.device),
        # One rank holds whole parameters anyway: freeing them after forward only adds
        # copies in backward.
        reshard_after_forward=reshard_after_forward and parallel.fsdp_size > 1,
        cpu_offload=cpu_offload,
        experts=experts,
        expert_mesh=parallel.expert_fsdp_mesh if experts else None,
        ignored=quantized_weights(model),
    )
