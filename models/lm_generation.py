"""Token generation shared by every language model of this project (arch=hrm_lm_*, arch=lm_transformer).

A model that mixes in `LMGeneration` provides three methods over an opaque `state` dict:

    prepare_generation(encoder_ids [B,Lp], encoder_mask [B,Lp]) -> state   (reads the prompt once)
    decode_step(tokens [B], state) -> logits [B,V]        (the newest decoder input; extends the KV caches)
    decode_prefix(decoder_input_ids [B,t], state) -> logits [B,V]   (no cache: recomputes all t inputs)

and `config.bos_id` / `config.eos_id`. The decoder inputs start with BOS, as in training (lm_dataset.py:
decoder_input_ids = [BOS] + target), so generation from the cache and without it see the same inputs.
"""
from __future__ import annotations

from typing import Iterator

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. greedy (or temperature 0) = argmax; otherwise temperature, then top-k,
    then nucleus (top-p) filtering, and a draw from the explicit generator."""
    if greedy or temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class LMGeneration:
    """The generation loop; see the module docstring for what the model must provide."""

    @torch.no_grad()
    def generate(self, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 state: dict | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token [B] for each step, starting from BOS; stops early once every row emitted EOS
        (rows that finished keep emitting EOS). use_cache=False recomputes the whole decoder prefix at every
        step (the reference the KV cache must equal, and the bench's uncached baseline). `state`: this
        prompt batch's prepare_generation result, passed in by a caller that also reads its diagnostics
        afterwards (utils/lm_eval.py: gate and halting statistics); None = prepared here."""
        if state is None:
            state = self.prepare_generation(encoder_ids, encoder_mask)
        B = encoder_ids.shape[0]
        tok = torch.full((B,), self.config.bos_id, dtype=torch.long, device=encoder_ids.device)
        inputs = [tok]
        finished = torch.zeros(B, dtype=torch.bool, device=encoder_ids.device)
        for _ in range(max_new_tokens):
            logits = self.decode_step(tok, state) if use_cache else self.decode_prefix(torch.stack(inputs, 1), state)
            tok = sample_next(logits, temperature, top_k, top_p, greedy, generator)
            tok = torch.where(finished, torch.full_like(tok, self.config.eos_id), tok)
            finished |= tok == self.config.eos_id
            yield tok
            if bool(finished.all()):  # one host sync per generated token: generation is not a training step
                break
            if not use_cache:
                inputs.append(tok)
