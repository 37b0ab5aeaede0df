"""The MoE ports' losses: the load-balancing aux loss, upstream's (Switch Transformer,
eqs. 4-6, as transformers v4 and v5 write it), over the whole sequence under sequence
parallelism; and ``moe_causal_lm_output``, the tail of every MoE port's
``ForCausalLM.forward`` (both majors): fused cross-entropy plus the scaled aux loss.

The loss is ``num_experts * sum_e f_e * P_e`` with ``f_e`` the share of routing slots
that picked expert ``e`` and ``P_e`` its mean router probability, both over every token
of the batch. Under SP each rank routes only its slice of the sequence, and a product of
per-slice means is not the product of the sequence's means: the per-expert sums and the
token count are added up over the SP group first (the probability sums with their
gradient, ``loom.dist.ulysses.sum_over_ranks``), so every layout gives the sp=1 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.dist.ulysses import sum_over_ranks
from loom.models.attention import sequence_parallel_group
from loom.models.loss import loss_or_logits


def load_balancing_loss_func(
    gate_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """Upstream's function, with upstream's parameters (the ports replace it by name):
    the loss over this process's tokens. Loom's forward calls ``load_balancing_loss``."""
    return load_balancing_loss(gate_logits, num_experts, top_k, attention_mask, group=None)


def load_balancing_loss(
    gate_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int | None,
    top_k: int,
    attention_mask: torch.Tensor | None,
    *,
    group: torch.distributed.ProcessGroup | None,
) -> torch.Tensor | int:
    """gate_logits: one [tokens, experts] tensor per MoE layer (this rank's tokens);
    attention_mask: [batch, seq] of this rank's tokens, or None; group: the sequence-
    parallel group the sums are taken over (None: this rank's tokens are all of them).
    Returns the int 0 without router logits, as upstream does."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    slots = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for layer_logits in gate_logits:
        routing = F.softmax(layer_logits.to(device), dim=-1)
        _, selected = torch.topk(routing, top_k, dim=-1)
        if mask is None:
            slots = slots + torch.bincount(selected.reshape(-1), minlength=num_experts).float()
            probs = probs + routing.float().sum(dim=0)
            rows = rows + routing.shape[0]
        else:
            weights = mask.repeat_interleave(top_k)
            slots = slots + torch.zeros_like(slots).scatter_add_(0, selected.reshape(-1), weights)
            probs = probs + (routing.float() * mask.unsqueeze(-1)).sum(dim=0)
            rows = rows + mask.sum()
    if group is not None:
        slots, rows = (sum_over_ranks(t.detach(), group) for t in (slots, rows))
        probs = sum_over_ranks(probs, group)
    return torch.sum((slots / rows) * (probs / rows).unsqueeze(0)) * num_experts


def moe_causal_lm_output(
    model,
    outputs,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    num_items_in_batch: int | float | torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    attention_mask: torch.Tensor | None,
    output_router_logits: bool,
    aux_loss_scale: float,
):
    """``MoeCausalLMOutputWithPast`` from the decoder's ``outputs``: the hidden states
    sliced by ``logits_to_keep``; the fused loss when there are labels (``labels`` HF-style
    or already aligned ``shift_labels``), else the logits; with ``output_router_logits``
    the aux loss, added to the loss times ``aux_loss_scale * model.router_aux_loss_coef``
    only when it is a tensor (without router logits it is the int 0: ``aux_loss`` None)."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    loss, logits = loss_or_logits(
        model, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep
    )
    aux_loss = None
    if output_router_logits:
        aux_loss = load_balancing_loss(
            outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask,
            group=sequence_parallel_group(model),
        )  # fmt: skip
        if not isinstance(aux_loss, torch.Tensor):
            aux_loss = None
        elif loss is not None:  # out of place: upstream's `loss +=` is in place
            scaled = aux_loss_scale * model.router_aux_loss_coef
            loss = loss + scaled * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(
        loss=loss,
        aux_loss=aux_loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        router_logits=outputs.router_logits,
    )
