"""The PyTorch side of a comparison: the same masked loss, AdamW, HF schedule and clipping, step by step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers

from qlora_jax.train.optim import OptimConfig

# our schedule names -> transformers.get_scheduler's (ours apply warmup to "constant" too)
HF_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def segment_mask(segment_ids_BxT: np.ndarray, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, inside one packed segment and within the sliding window (Mistral,
    Phi-3: a 4-D mask replaces transformers' own, window included), as qlora_jax.models.attention."""
    seg = torch.as_tensor(np.asarray(segment_ids_BxT))
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    return causal[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])


def model_attention_mask(
    config: Any, segment_ids_BxT: np.ndarray, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask `config`'s model takes: segment_mask, or for a family with sliding-window layers
    (Gemma) the per-layer-type masks its forward takes as prepared, windowed for sliding layers,
    additive (0 / `dtype`'s min, the model's dtype) since its eager attention adds them to the scores."""
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return segment_mask(segment_ids_BxT, getattr(config, "sliding_window", None))
    mask = segment_mask(segment_ids_BxT)
    slots = torch.arange(mask.shape[-1])
    window = slots[None, :] > slots[:, None] - config.sliding_window

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    return {"full_attention": additive(mask), "sliding_attention": additive(mask & window)}


def loss_sum(peft_model, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, float]:
    """(summed token loss, loss tokens) of one (B, T) batch: float32 logits, as qlora_jax.train.loss."""
    causal_lm = peft_model.base_model.model
    hidden = causal_lm.base_model(
        input_ids=torch.as_tensor(batch["inputs"]).long(),
        attention_mask=model_attention_mask(causal_lm.config, batch["segment_ids"], causal_lm.dtype),
        position_ids=torch.as_tensor(batch["positions"]).long(),
    ).last_hidden_state
    logits = torch.nn.functional.linear(hidden.float(), causal_lm.lm_head.weight.float())
    if (cap := getattr(causal_lm.config, "final_logit_softcapping", None)) is not None:  # Gemma 2
        logits = cap * torch.tanh(logits / cap)
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.as_tensor(batch["targets"]).long().flatten(), reduction="none"
    )
    mask = torch.as_tensor(batch["loss_mask"]).float().flatten()
    return (token_loss * mask).sum(), float(mask.sum())


class TorchTrainer:
    """torch.optim.AdamW (decay on LoRA A/B only, as ours) + clip_grad_norm_ + get_scheduler."""

    def __init__(self, peft_model, cfg: OptimConfig):
        self.model, self.cfg = peft_model, cfg
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        decay = [p for n, p in named if "lora_A" in n or "lora_B" in n]
        rest = [p for n, p in named if not ("lora_A" in n or "lora_B" in n)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        groups += [{"params": rest, "weight_decay": 0.0}] if rest else []
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
        self.scheduler = transformers.get_scheduler(
            HF_SCHEDULES[cfg.schedule], self.optimizer, cfg.warmup_steps, cfg.total_steps
        )

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a (B, T) batch ((k, B, T) when accumulating): loss before it, lr, norm."""
        self.model.train()
        micro = (
            [batch]
            if self.cfg.accumulation_steps == 1
            else [{k: v[i] for k, v in batch.items()} for i in range(self.cfg.accumulation_steps)]
        )
        count = max(float(np.sum(batch["loss_mask"])), 1.0)
        self.optimizer.zero_grad()
        total = 0.0
        for micro_batch in micro:
            summed, _ = loss_sum(self.model, micro_batch)
            (summed / count).backward()
            total += summed.item()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": total / count, "lr": lr, "grad_norm": float(norm)}

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[dict[str, np.ndarray]]) -> float:
        self.model.eval()
        total = count = 0.0
        for batch in batches:
            summed, n = loss_sum(self.model, batch)
            total, count = total + summed.item(), count + n
        return total / max(count, 1.0)

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
        """Greedy new tokens per prompt (one prompt at a time, no padding) with HF generate."""
        self.model.eval()
        outs = []
        for ids in prompts:
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
            )
            outs.append(out[0, len(ids) :].tolist())
        return outs
