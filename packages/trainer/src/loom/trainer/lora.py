"""LoRA through peft on Loom's ports, under FSDP2.

``apply_lora`` injects peft's LoRA layers into the decoder's linear layers named in
``lora.targets`` (the vision tower keeps its own) before the model is sharded; every
other parameter is frozen, so the fused kernels (RMSNorm, rotary, SwiGLU, the fused loss
on ``lm_head``) run on the frozen base as before. A wrapped layer's weight becomes
``<layer>.base_layer.weight``: ``base_renames`` reads the HF checkpoint's names into it.
``init_adapters`` draws each adapter whole from the seed and the parameter's name (A as
peft does, B zeros), so every rank and every world size starts from the same adapters.

On the GPU the frozen base is stored in bf16, the dtype it computes in: it is never
updated, so it needs no fp32 master copy (half the memory, the same bf16 values FSDP would
cast to). With ``lora.quantize: nf4`` (QLoRA) the targeted layers' base weights are
torchao's ``NF4Tensor`` (4-bit NormalFloat in blocks of 64, their scales in 8 bits per
block of 256: about 0.52 bytes a weight), dequantized to bf16 one layer at a time in
forward and backward; FSDP2 leaves them out (``ignored_params``). QLoRA runs on one CUDA
GPU; anything else is refused by name (``check_qlora``).

Checkpoints keep the adapters and their optimizer state only; the base is read from
``model.path`` again on resume (and quantized again, the same way). The export writes the
adapter as peft saves it (``adapter_model.safetensors``, ``adapter_config.json``) and,
with ``lora.merge_on_export``, the merged model to ``hf/merged``.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from loom.dist.export import full_tensor
from loom.dist.loading import add_from_full, fill_from_full, load_targets
from loom.trainer.config import LoraConfig
from loom.trainer.errors import ConfigError


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def target_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """The decoder's linear layers named in ``targets`` (not the vision tower's)."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in targets
        and ".visual." not in f".{name}."
    ]
    if not names:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"lora.targets {targets}: no linear layer has these names; it has {linear}"
        )
    return names


def apply_lora(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Wrap the target layers with peft's LoRA layer (meta or real parameters alike);
    freeze the rest. Layer by layer, not peft's model-level injection: under transformers
    5 that also turns targets such as ``down_proj`` into adapters on a MoE model's stacked
    expert parameters, which the grouped GEMM reads directly."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = target_layers(model, lora.targets)
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    for name in layers:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        wrapped = LoraLinear(
            getattr(module, child), "default", config, r=lora.rank, lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
        )  # fmt: skip
        setattr(module, child, wrapped)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    model.loom_lora_layers = layers
    return layers


def store_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating-point parameters stored in ``dtype`` (meta or real alike)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


QLORA_CPU = (
    "lora.quantize: nf4 (QLoRA) runs on a CUDA GPU only; on the CPU use plain LoRA "
    "(lora.quantize: none)"
)


def check_qlora(device: torch.device, world_size: int) -> None:
    """QLoRA's limits, each refused by name before anything is built."""
    if device.type != "cuda":
        raise ConfigError(QLORA_CPU)
    if world_size != 1:
        raise ConfigError(
            f"lora.quantize: nf4 (QLoRA) runs on one GPU; this run has {world_size} ranks. "
            "Sharding the 4-bit base over several GPUs is not proven yet: use plain LoRA there"
        )
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ConfigError(
            "lora.quantize: nf4 needs torchao: pip install 'loom-trainer[qlora]'"
        ) from None


NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def quantize_base(model: nn.Module) -> None:
    """Each LoRA layer's base weight (real, bf16) -> torchao's NF4 tensor, in place; the
    bf16 copy is freed layer by layer."""
    from torchao.quantization import to_nf4

    for layer in model.loom_lora_layers:
        base = model.get_submodule(layer).base_layer
        if base.weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise ConfigError(
                f"lora.quantize: nf4: {layer} has {base.weight.numel()} weights; NF4 quantizes "
                f"in groups of {NF4_BLOCK} x {NF4_SCALER_BLOCK} = {NF4_BLOCK * NF4_SCALER_BLOCK}"
            )
        weight = base.weight.detach().to(torch.bfloat16)
        base.weight = nn.Parameter(to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK), False)


def is_nf4(param: torch.Tensor) -> bool:
    return type(param.data).__name__ == "NF4Tensor"


def quantized_weights(model: nn.Module) -> set[nn.Parameter]:
    """The NF4 parameters, which FSDP leaves alone."""
    return {p for p in model.parameters() if is_nf4(p)}


def base_renames(layers: list[str]) -> tuple[tuple[str, str], ...]:
    """HF checkpoint key of a wrapped layer -> its ``base_layer`` parameter."""
    return tuple((rf"^{re.escape(n)}\.(weight|bias)$", rf"{n}.base_layer.\1") for n in layers)


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, _ in model.named_parameters() if is_adapter(name))


def init_adapters(model: nn.Module, seed: int) -> None:
    """A uniform in +-1/sqrt(fan_in) (peft's kaiming-uniform), B zeros: each drawn whole
    from ``seed`` and the name; each rank keeps its part."""
    for name, param in model.named_parameters():
        if not is_adapter(name):
            continue
        full = torch.zeros(tuple(param.shape), dtype=torch.float32)
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1 / math.sqrt(param.shape[1])
            full.uniform_(-bound, bound, generator=generator)
        fill_from_full(param, full.to(param.device))


def _peft_key(name: str) -> str:
    """Our parameter name -> the key peft saves (``base_model.model.``, no adapter name)."""
    return "base_model.model." + name.replace(".default.", ".")


def export_adapter(model: nn.Module, lora: LoraConfig, out: Path, source: Path) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` as peft writes them;
    every rank calls it (the adapters are gathered), rank 0 writes."""
    from peft import LoraConfig as PeftLoraConfig

    tensors = {
        k: full_tensor(v).detach().cpu().contiguous()
        for k, v in load_targets(model).items()
        if is_adapter(k)
    }
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {_peft_key(k): v for k, v in tensors.items()},
            out / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=model.loom_lora_layers, bias="none", task_type="CAUSAL_LM",
            base_model_name_or_path=str(source),
        ).save_pretrained(out)  # fmt: skip
    dist.barrier()


def merge_adapters_(model: nn.Module, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """Add each layer's update (B @ A times alpha / rank) into its base weight, in place
    (at the end of a run); the merged model's tensors under HF's names."""
    scale = lora.alpha / lora.rank
    for layer in model.loom_lora_layers:
        base = model.get_submodule(layer).base_layer
        if is_nf4(base.weight):  # QLoRA: merge in fp32 into the dequantized base
            base.weight = nn.Parameter(base.weight.get_original_weight().float(), False)
    params = dict(model.named_parameters())
    for layer in model.loom_lora_layers:
        a = full_tensor(params[f"{layer}.lora_A.default.weight"]).float()
        b = full_tensor(params[f"{layer}.lora_B.default.weight"]).float()
        add_from_full(params[f"{layer}.base_layer.weight"], (b @ a) * scale)
    return {
        k.replace(".base_layer.", "."): v
        for k, v in load_targets(model).items()
        if not is_adapter(k)
    }
