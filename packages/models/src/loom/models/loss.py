"""The causal-LM loss of Loom's ports: fused linear cross-entropy, no full logits.

``shift_labels`` are already aligned with the hidden states (Loom's data pipeline
shifts per sample); HF-style ``labels`` are shifted here. With ``num_items_in_batch``
the summed token loss is divided by it: Loom's trainer passes the global count of
loss tokens divided by the number of ranks that average gradients, so that the
gradient FSDP averages is the gradient of the global token mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.kernels import fused_linear_cross_entropy

IGNORE_INDEX = -100


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """hidden_states: [batch, seq, hidden]; lm_head_weight: [vocab, hidden]; labels or
    shift_labels: [batch, seq]. Returns the fp32 loss (0-d)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    total = fused_linear_cross_entropy(
        hidden_states, lm_head_weight, shift_labels, ignore_index=ignore_index, reduction="sum"
    )
    if num_items_in_batch is None:
        return total / (shift_labels != ignore_index).sum().clamp(min=1)
    return total / num_items_in_batch


def causal_lm_output(model, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep):
    """The tail every dense port's ``ForCausalLM.forward`` shares: slice the hidden states
    by ``logits_to_keep``, then the fused loss when there are labels, else the logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    loss, logits = loss_or_logits(
        model, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def loss_or_logits(model, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep):
    """(loss, None) with labels, else (None, logits), from the decoder's last hidden states
    sliced by ``logits_to_keep``: the part every causal-LM head of the ports shares."""
    hidden_states = outputs.last_hidden_state
    keep = logits_to_keep
    hidden_states = hidden_states[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    if labels is None and shift_labels is None:
        return None, model.lm_head(hidden_states)
    weight = model.lm_head.weight
    return causal_lm_loss(hidden_states, weight, labels, shift_labels, num_items_in_batch), None
