"""Generation with Hugging Face transformers: any image-text-to-text model (Qwen2-VL, LLaVA, ...)."""

from __future__ import annotations

import hashlib

from r3v.backends.base import Completion, Request, Sampling
from r3v.registry import backends


def batch_seed(seed: int, batch_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@backends.register("hf")
class HFBackend:
    """Batched ``generate`` over a transformers model.

    Prompts are encoded once, sorted by length and grouped by a token budget, so padding stays
    small. Each group is seeded from (seed, group index), so a given request list with a given
    seed always gives the same completions.
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
    ) -> None:
        from r3v.models.loading import load_model

        self.loaded = loaded or load_model(
            model, adapter=adapter, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.model_id = model
        self.adapter = adapter
        self.token_budget = token_budget
        self.processor = self.loaded.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)

    def prompt_text(self, request: Request) -> str:
        return self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        import torch

        from r3v.models.batching import batches_by_token_budget, collate, encode

        encoded = [encode(self.processor, self.prompt_text(r), r.images) for r in requests]
        lengths = [e["input_ids"].shape[0] for e in encoded]
        n = 1 if sampling.greedy else sampling.n
        groups = batches_by_token_budget(
            [length * n for length in lengths], self.token_budget, cost_per_item=sampling.max_new_tokens * n
        )
        results: list[list[Completion]] = [[] for _ in requests]
        model = self.loaded.model
        for group_index, group in enumerate(groups):
            batch = collate([encoded[i] for i in group], self.tokenizer.pad_token_id, padding_side="left")
            batch = {k: v.to(self.loaded.device) for k, v in batch.items()}
            torch.manual_seed(batch_seed(sampling.seed, group_index))
            with torch.inference_mode():
                output = model.generate(**batch, **self._generate_kwargs(sampling))
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for row, request_index in enumerate(group):
                for k in range(n):
                    tokens = new_tokens[row * n + k]
                    results[request_index].append(self._completion(tokens, lengths[request_index], sampling))
        if sampling.greedy and sampling.n > 1:
            results = [r * sampling.n for r in results]
        return results

    def _generate_kwargs(self, sampling: Sampling) -> dict:
        kwargs = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._stop_ids(),
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,
                num_return_sequences=sampling.n,
            )
        return kwargs

    def _stop_ids(self) -> list[int]:
        ids = self.loaded.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _completion(self, tokens, prompt_tokens: int, sampling: Sampling) -> Completion:
        stops = set(self._stop_ids())
        ids = tokens.tolist()
        length, finish = len(ids), "length"
        for position, token in enumerate(ids):
            if token in stops:
                length, finish = position + 1, "stop"
                break
        text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=length, finish_reason=finish)
