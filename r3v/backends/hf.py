"""Generation with Hugging Face transformers: any image-text-to-text model (Qwen2-VL, LLaVA, ...).

Bootstrapping draws N samples for every question, so the prefill (vision tower plus the whole
prompt) is the part worth sharing. ``model.generate(num_return_sequences=N)`` repeats input ids
and pixel values *before* the prefill, so it encodes the image and the prompt N times. Here each
question is prefilled once (questions batched together), then its KV cache, last-position logits
and position state are repeated N times, and a short decoding loop draws the N completions.

The loop feeds the model exactly what ``generate`` feeds it: 2D attention masks, and position ids
from the model's own ``_prepare_position_ids_for_generation`` (for Qwen2-VL, the M-RoPE positions
with their text row), advanced by one per new token. Greedy output therefore equals
``model.generate``'s greedy output, and a repeated cache continues every copy at the right
position.

Sampling draws from per-row uniforms seeded by (seed, request index, sample index), so a
request's completions do not depend on which other requests share its batch. Rows that have
finished are dropped from the cache once they are a quarter of the batch, so long stragglers do
not drag the finished rows along.

Models whose ``prepare_inputs_for_generation`` differs from GenerationMixin's (extra inputs the
loop does not reproduce) fall back to ``generate`` with ``num_return_sequences``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch

from r3v.records import Completion, Request, Sampling
from r3v.registry import backends
from r3v.seeds import derive_seed

# Finished rows are dropped from the batch once they are at least this share of it: dropping
# copies the whole cache, so doing it for every single finished row would cost more than it saves.
COMPACT_FRACTION = 0.25


def row_seed(seed: int, request_index: int, sample_index: int) -> int:
    """A 63-bit seed for one completion, independent of batching (the top 63 of 64 derived bits)."""
    return derive_seed(seed, request_index, sample_index, bits=64) >> 1


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), in the order ``generate`` applies them.

    Filtered-out tokens get ``-inf``; the most likely token always survives.
    """
    scores = logits / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already hold top_p of the mass.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def penalize_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logit of every token a row has seen is divided by
    ``penalty`` when positive and multiplied by it when negative."""
    seen = torch.gather(logits, 1, history)
    return logits.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def draw(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the row's CDF at its uniform in [0, 1).

    Using a given uniform (instead of ``torch.multinomial``) makes each row's draw depend only on
    its own random stream, whatever the batch holds.
    """
    probs = scores.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]
    # right=True: a token with zero probability has a zero-width interval and is never chosen.
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp_(max=scores.shape[-1] - 1)


def _base_model(model):
    """The transformers model under a PEFT wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(type(_base_model(model)).forward).parameters)


@dataclass
class DecodeState:
    """Everything one decoding step needs, one row per sequence being decoded.

    ``rows`` maps each batch row to the caller's output slot, so rows can be repeated (N samples
    of one prefill) and dropped (finished) while results still land in the right place.
    """

    cache: Any
    logits: torch.Tensor  # (rows, vocab), float32: the distribution of the next token
    attention_mask: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor | None  # (..., rows, length): 2D, or (4, rows, length) for M-RoPE
    step_inputs: dict[str, torch.Tensor]  # per-row inputs every decoding step repeats (token types)
    rows: torch.Tensor  # (rows,) output slot of each row
    cache_key: str
    #: (rows, length): every token id each row has seen, prompt padding included, as ``generate``'s
    #: ``input_ids``; read by the repetition penalty.
    history: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows in ``index`` (in that order), cache included."""
        self.cache.batch_select_indices(index.to(self.attention_mask.device))
        self.logits = self.logits[index]
        self.attention_mask = self.attention_mask[index]
        if self.position_ids is not None:
            self.position_ids = self.position_ids.index_select(self.position_ids.dim() - 2, index)
        self.step_inputs = {k: v[index] for k, v in self.step_inputs.items()}
        self.rows = self.rows[index]
        if self.history is not None:
            self.history = self.history[index]

    def repeat(self, n: int) -> None:
        """Each row becomes ``n`` consecutive rows sharing its prefill; slot s becomes s*n .. s*n+n-1."""
        if n == 1:
            return
        self.cache.batch_repeat_interleave(n)
        self.logits = self.logits.repeat_interleave(n, dim=0)
        self.attention_mask = self.attention_mask.repeat_interleave(n, dim=0)
        if self.position_ids is not None:
            self.position_ids = self.position_ids.repeat_interleave(n, dim=self.position_ids.dim() - 2)
        self.step_inputs = {k: v.repeat_interleave(n, dim=0) for k, v in self.step_inputs.items()}
        self.rows = (self.rows[:, None] * n + torch.arange(n, device=self.rows.device)).flatten()
        if self.history is not None:
            self.history = self.history.repeat_interleave(n, dim=0)


def prefill(model, batch: dict[str, torch.Tensor]) -> DecodeState:
    """One forward pass over left-padded prompts (vision inputs included); returns the state to decode from."""
    params = _forward_parameters(model)
    cache_key = "cache" if "cache" in params else "past_key_values"
    inputs = dict(batch)
    input_ids = inputs.pop("input_ids")
    attention_mask = inputs["attention_mask"]
    position_ids = None
    if "position_ids" in params:
        position_ids = _initial_positions(model, input_ids, inputs)
        inputs["position_ids"] = position_ids
    if "logits_to_keep" in params:
        inputs["logits_to_keep"] = 1
    output = model(input_ids=input_ids, use_cache=True, return_dict=True, **inputs)
    step_inputs = {}
    if "mm_token_type_ids" in batch:  # generated tokens are text
        step_inputs["mm_token_type_ids"] = torch.zeros_like(batch["mm_token_type_ids"][:, -1:])
    if "token_type_ids" in batch:  # generate repeats the last token type
        step_inputs["token_type_ids"] = batch["token_type_ids"][:, -1:]
    return DecodeState(
        cache=getattr(output, cache_key),
        logits=output.logits[:, -1].float(),
        attention_mask=attention_mask,
        position_ids=position_ids,
        step_inputs=step_inputs,
        rows=torch.arange(input_ids.shape[0], device=input_ids.device),
        cache_key=cache_key,
        history=input_ids,
    )


def _initial_positions(model, input_ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The position ids ``generate`` would build: models with special positions (M-RoPE) override
    ``_prepare_position_ids_for_generation``; the fallback counts non-padding tokens."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if callable(prepare):
        return prepare(input_ids, dict(inputs))
    positions = inputs["attention_mask"].long().cumsum(-1) - 1
    return positions.masked_fill(inputs["attention_mask"] == 0, 0)


@dataclass
class Decoded:
    """Decoding output per slot: token ids (stop token included), finish reason, and, when asked,
    the float32 logits each token was drawn from (one (vocab,) tensor per token)."""

    tokens: list[list[int]]
    finish: list[str]
    logits: list[list[torch.Tensor]] | None = None


def decode(
    model,
    state: DecodeState,
    sampling: Sampling,
    seeds: list[int],
    stop_ids: set[int],
    pad_token_id: int,
    keep_logits: bool = False,
    compact_fraction: float = COMPACT_FRACTION,
) -> Decoded:
    """Draw up to ``sampling.max_new_tokens`` tokens for every row of ``state``.

    ``seeds[slot]`` seeds the random stream of the row whose output slot is ``slot``; greedy
    decoding ignores them. Finished rows leave the batch once they are ``compact_fraction`` of it.
    """
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
    slots = int(state.rows.shape[0])
    device = state.logits.device
    greedy = sampling.greedy or sampling.temperature <= 0
    if not greedy:
        uniforms = torch.stack(
            [torch.rand(sampling.max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out = torch.full((slots, sampling.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(slots, dtype=torch.long, device=device)
    stopped_slots = torch.zeros(slots, dtype=torch.bool, device=device)
    kept: list[list[torch.Tensor]] | None = [[] for _ in range(slots)] if keep_logits else None
    done = torch.zeros(slots, dtype=torch.bool, device=device)  # by row of the current batch
    penalty = sampling.repetition_penalty or 1.0
    for step in range(sampling.max_new_tokens):
        logits = state.logits
        if penalty != 1.0:  # before temperature and the filters, as generate's processors run
            logits = penalize_repeats(logits, state.history, penalty)
        if greedy:
            next_tokens = logits.argmax(dim=-1)
        else:
            scores = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            next_tokens = draw(scores, uniforms[state.rows, step])
        # Finished rows still in the batch feed padding, as generate does.
        next_tokens = next_tokens.masked_fill(done, pad_token_id)
        if penalty != 1.0:
            state.history = torch.cat([state.history, next_tokens[:, None]], dim=1)
        live = state.rows[~done]
        out[live, step] = next_tokens[~done]
        lengths[live] += 1
        if kept is not None:
            for row in (~done).nonzero().flatten().tolist():
                kept[int(state.rows[row])].append(logits[row].clone())
        stopped = torch.isin(next_tokens, stop) & ~done
        stopped_slots[state.rows[stopped]] = True
        done |= stopped
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        if int(done.sum()) >= max(1, compact_fraction * done.shape[0]):
            alive = (~done).nonzero().flatten()
            state.select(alive)
            next_tokens = next_tokens[alive]
            done = done[alive]
        _advance(model, state, next_tokens)
    tokens = [row[:length] for row, length in zip(out.tolist(), lengths.tolist(), strict=True)]
    finish = ["stop" if s else "length" for s in stopped_slots.tolist()]
    return Decoded(tokens=tokens, finish=finish, logits=kept)


def _advance(model, state: DecodeState, next_tokens: torch.Tensor) -> None:
    """Feed one token per row; the new logits replace ``state.logits``."""
    rows = next_tokens.shape[0]
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(rows, 1)], dim=-1)
    inputs: dict[str, Any] = dict(state.step_inputs)
    if state.position_ids is not None:
        state.position_ids = torch.cat([state.position_ids, state.position_ids[..., -1:] + 1], dim=-1)
        inputs["position_ids"] = state.position_ids[..., -1:]
    inputs[state.cache_key] = state.cache
    output = model(
        input_ids=next_tokens[:, None],
        attention_mask=state.attention_mask,
        use_cache=True,
        return_dict=True,
        **inputs,
    )
    state.cache = getattr(output, state.cache_key)
    state.logits = output.logits[:, -1].float()


def supports_shared_prefill(model) -> bool:
    """Whether ``prefill``/``decode`` reproduce ``generate`` for this model.

    They mirror GenerationMixin's own input preparation; models that override
    ``prepare_inputs_for_generation`` (Gemma 3, Mllama, PaliGemma, ...) add inputs the loop does
    not know about, so they go through ``generate`` instead. Of the families r3v builds tiny models
    of, Gemma 3 alone falls back: its token types (bidirectional attention over each image's tokens)
    go to the prefill only, which the loop does not mirror; tests/test_families.py checks both paths
    against ``generate``.
    """
    from transformers import GenerationMixin

    takes_cache = bool({"cache", "past_key_values"} & _forward_parameters(model))
    own = type(_base_model(model)).prepare_inputs_for_generation
    return takes_cache and own is GenerationMixin.prepare_inputs_for_generation


def generate_group(
    model, batch: dict[str, torch.Tensor], sampling: Sampling, seed: int, stop_ids: set[int], pad_token_id: int
) -> Decoded:
    """The fallback: HF ``generate`` with ``num_return_sequences`` (prefill repeated N times).

    Seeded from ``seed`` through torch's global generator, so its samples depend on the batch.
    """
    n = 1 if sampling.greedy else sampling.n
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "pad_token_id": pad_token_id,
        "eos_token_id": sorted(stop_ids),
        "repetition_penalty": sampling.repetition_penalty or 1.0,
    }
    if sampling.greedy:
        kwargs.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            num_return_sequences=n,
        )
    torch.manual_seed(seed)
    output = model.generate(**batch, **kwargs)
    tokens, finish = [], []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
        tokens.append(row[:cut] if cut else row)
        finish.append("stop" if cut else "length")
    return Decoded(tokens=tokens, finish=finish)


def batch_seed(seed: int, batch_index: int) -> int:
    return derive_seed(seed, batch_index, bits=32)


@backends.register("hf")
class HFBackend:
    """N completions per request from one shared prefill, over a transformers model.

    Prompts are encoded once, sorted by length and grouped by a token budget (prompt plus new
    tokens, times N, summed over a group), so padding stays small and the KV cache bounded.
    ``shared_prefill=None`` uses the shared prefill where the model supports it
    (``supports_shared_prefill``) and ``generate`` with ``num_return_sequences`` elsewhere.
    """

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        token_budget: int = 16384,
        trust_remote_code: bool = False,
        loaded=None,
        shared_prefill: bool | None = None,
        max_pixels: int | None = None,
    ) -> None:
        from r3v.models.loading import load_model
        from r3v.models.processors import set_pixel_cap

        self.loaded = loaded or load_model(
            model, adapter=adapter, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            max_pixels=max_pixels,
        )
        if loaded is not None and max_pixels is not None:
            set_pixel_cap(self.loaded.processor, max_pixels)
        self.model_id = model
        self.adapter = adapter
        self.token_budget = token_budget
        self.processor = self.loaded.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        supported = supports_shared_prefill(self.loaded.model)
        if shared_prefill and not supported:
            raise ValueError(f"{type(self.loaded.model).__name__} does not support the shared prefill")
        self.shared_prefill = supported if shared_prefill is None else shared_prefill

    def prompt_text(self, request: Request) -> str:
        return self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        from r3v.models.batching import batches_by_token_budget, collate, encode

        if sampling.repetition_penalty is None:  # the model's own, as generate would apply it
            sampling = replace(sampling, repetition_penalty=self.repetition_penalty)
        encoded = [encode(self.processor, self.prompt_text(r), r.images) for r in requests]
        lengths = [e["input_ids"].shape[0] for e in encoded]
        n = 1 if sampling.greedy else sampling.n
        groups = batches_by_token_budget(
            [length * n for length in lengths], self.token_budget, cost_per_item=sampling.max_new_tokens * n
        )
        results: list[list[Completion]] = [[] for _ in requests]
        stop_ids = set(self._stop_ids())
        model = self.loaded.model
        pad = self.tokenizer.pad_token_id
        for group_index, group in enumerate(groups):
            batch = collate([encoded[i] for i in group], pad, padding_side="left")
            batch = {k: v.to(self.loaded.device) for k, v in batch.items()}
            with torch.inference_mode():
                if self.shared_prefill:
                    seeds = [row_seed(sampling.seed, i, k) for i in group for k in range(n)]
                    state = prefill(model, batch)
                    state.repeat(n)
                    decoded = decode(model, state, sampling, seeds, stop_ids, pad)
                else:
                    seed = batch_seed(sampling.seed, group_index)
                    decoded = generate_group(model, batch, sampling, seed, stop_ids, pad)
            for slot, (ids, reason) in enumerate(zip(decoded.tokens, decoded.finish, strict=True)):
                request_index = group[slot // n]
                results[request_index].append(
                    Completion(
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        prompt_tokens=lengths[request_index],
                        completion_tokens=len(ids),
                        finish_reason=reason,
                    )
                )
        if sampling.greedy and sampling.n > 1:
            results = [r * sampling.n for r in results]
        return results

    @property
    def repetition_penalty(self) -> float:
        """The model's generation config's repetition penalty (1: none)."""
        return float(getattr(self.loaded.model.generation_config, "repetition_penalty", None) or 1.0)

    def _stop_ids(self) -> list[int]:
        ids = self.loaded.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids
