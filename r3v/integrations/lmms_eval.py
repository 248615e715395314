"""An lmms-eval model that runs r3v's test-time selection (self-select@N, maj@N, ...) on any task.

For each document lmms-eval hands over, the model samples N candidates with an r3v backend,
extracts an answer from each (with an r3v task's extractor when ``task`` is given, else the
stripped text), lets an r3v selector choose, and returns the chosen answer (or text). The task's
own ``process_results`` then scores it, so lmms-eval's metrics apply unchanged.

Two ways in (install with ``pip install r3v[lmms]``, see docs/gpu.md for a lean install):

- by name: ``lmms-eval --model r3v --model_args model=M,selector=self-select,n=8,task=chartqa``
  (registered through the ``lmms_eval.models`` entry point, see ``r3v.integrations``);
- as an object: ``simple_evaluate(model=R3VLmms(...), tasks=[...])``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

try:
    from lmms_eval.api.model import lmms
except ImportError as exc:  # keep the hint: lmms-eval is an optional extra
    raise ImportError(
        "r3v's lmms-eval model needs lmms-eval: pip install 'r3v[lmms]' (or the lean install in docs/gpu.md)"
    ) from exc

from r3v.records import Completion, Example, Request, Sample, Sampling, load_image
from r3v.reference import REFERENCE_A
from r3v.seeds import stride_seed

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

#: Doc fields (lmms-eval datasets and r3v exports) that hold the bare question and the gold answer.
_QUESTION_FIELDS = ("question", "query", "problem")
_ANSWER_FIELDS = ("answer", "label", "gold")
_CHOICE_FIELDS = ("choices", "options")


class RawTextTask:
    """The stand-in task when no r3v task is named: the answer is the stripped output text.

    Good for short-answer prompts (e.g. ChartQA's "answer with a single word"); majority votes
    then count identical answers. Prompts are the lmms-eval context as given.
    """

    name = "raw-text"
    # what the self-select prompt reads from a task (r3v.prompts): r3v's wording, the bare question
    prompt_style = "r3v"
    reference = REFERENCE_A
    body = None
    qa_target = None

    def cot_prompt(self, example: Example) -> str:
        return example.question

    def qa_prompt(self, example: Example) -> str:
        return example.question

    def select_instruction(self, example: Example) -> str:
        return "Which prediction is correct? Give the final answer."

    def extract(self, text: str, example: Example) -> str | None:
        return text.strip() or None

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and example.answer is not None and answer.strip() == str(example.answer).strip()


def _none_if_empty(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class R3VLmms(lmms):
    """lmms-eval model: N sampled candidates per document, one answer chosen by an r3v selector.

    Every argument can come from lmms-eval's ``--model_args`` string (key=value pairs).

    Args:
        model: hub id, local folder or built-in tiny model name.
        adapter: PEFT adapter folder applied on top of ``model``.
        backend: r3v backend name (``hf``, ``vllm``, ...) or a ready backend object.
        selector: r3v selector name (``self-select``, ``majority``, ``first``, ``oracle``) or object.
        n: candidates sampled per document.
        task: r3v task whose extractor, normaliser and select prompt are used (e.g. ``chartqa``);
            None uses the raw output text as the answer.
        prompt: ``lmms`` sends lmms-eval's context as the prompt; ``cot`` / ``qa`` rebuild it with
            the r3v task's own prompt from the document's question (what R3V models train on).
        output: ``answer`` returns the chosen answer; ``text`` the chosen candidate's full text.
        temperature, top_p, top_k, max_new_tokens, seed: sampling of the N candidates. The task
            yaml's generation_kwargs are not used: self-select needs sampled chains of thought.
        select_max_new_tokens: token budget of the self-select call (the selector's default if None).
        chunk_size: documents per backend call.
        backend_options: passed to the backend's constructor (e.g. ``tensor_parallel_size``).
    """

    is_simple = True

    def __init__(
        self,
        model: str = "tiny-qwen2-vl",
        adapter: str | None = None,
        backend: Any = "hf",
        selector: Any = "self-select",
        n: int = 3,
        task: Task | None = None,
        prompt: str = "lmms",
        output: str = "answer",
        temperature: float = 0.9,
        top_p: float = 0.95,
        top_k: int = 50,
        max_new_tokens: int = 384,
        seed: int = 0,
        select_max_new_tokens: int | None = None,
        chunk_size: int = 16,
        trust_remote_code: bool = False,
        device: str | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        backend_options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__()
        from r3v.registry import backends, selectors
        from r3v.tasks.base import build_task

        if prompt not in ("lmms", "cot", "qa"):
            raise ValueError(f"prompt must be lmms, cot or qa, not {prompt!r}")
        if output not in ("answer", "text"):
            raise ValueError(f"output must be answer or text, not {output!r}")
        self.n = int(n)
        self.seed = int(seed)
        self.prompt = prompt
        self.output = output
        self.chunk_size = max(1, int(chunk_size))
        self.sampling = Sampling(
            n=self.n,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_new_tokens=int(max_new_tokens),
            seed=self.seed,
            greedy=float(temperature) == 0.0,
        )
        task = _none_if_empty(task)
        if task is None:
            self.task = RawTextTask()
        else:
            self.task = build_task(task) if isinstance(task, str) else task
        if prompt != "lmms" and isinstance(self.task, RawTextTask):
            raise ValueError(f"prompt={prompt} needs an r3v task (task=...) to build the prompt")

        if isinstance(selector, str):
            selector_cls = selectors.get(selector)
            wanted = {"seed": self.seed, "max_new_tokens": select_max_new_tokens}
            accepted = inspect.signature(selector_cls).parameters
            self.selector = selector_cls(**{k: int(v) for k, v in wanted.items() if k in accepted and v is not None})
        else:
            self.selector = selector

        if isinstance(backend, str):
            options = dict(backend_options or {})
            options.update({k: v for k, v in extra.items()})  # remaining model_args go to the backend
            if device is not None:
                options["device"] = device
            self.backend = backends.get(backend)(
                model=model, adapter=_none_if_empty(adapter), trust_remote_code=_as_bool(trust_remote_code), **options
            )
        else:
            self.backend = backend
        self.model_id = getattr(self.backend, "model_id", model)

    # lmms-eval entry points -------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        docs = [self._document(request) for request in requests]
        examples = [example for example, _ in docs]
        prompts = [self._request(example, context) for example, context in docs]
        candidates: dict[str, list[Sample]] = {}
        for start in range(0, len(examples), self.chunk_size):
            chunk = range(start, min(start + self.chunk_size, len(examples)))
            sampling = Sampling(**{**self.sampling.to_dict(), "seed": stride_seed(self.seed, start // self.chunk_size)})
            outputs = self.backend.generate([prompts[i] for i in chunk], sampling)
            for i, completions in zip(chunk, outputs, strict=True):
                candidates[examples[i].id] = [
                    self._sample(examples[i], k, completion, sampling) for k, completion in enumerate(completions)
                ]
        choices = self._select(examples, candidates)
        results = []
        for request, example, choice in zip(requests, examples, choices, strict=True):
            result = self._result(example, candidates[example.id], choice)
            self.cache_hook.add_partial("generate_until", request.args[:2], result)
            results.append(result)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("the r3v model answers by sampling and selecting; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the r3v model does not support multi-round tasks")

    # pieces -------------------------------------------------------------------------------------

    def _document(self, request) -> tuple[Example, str]:
        """The r3v Example behind one lmms-eval request, and the request's context (prompt text)."""
        context, _gen_kwargs, doc_to_visual, doc_id, task_name, split = request.args[:6]
        doc = self.task_dict[task_name][split][doc_id]
        images = [_as_image(v, f"{task_name}/{doc_id}") for v in _flatten(doc_to_visual(doc))]
        example_id = f"{task_name}/{split}/{doc_id}"
        if "r3v_example" in doc:  # a task exported by r3v: the exact Example, images from its files
            from r3v.integrations.lmms_tasks import example_from_doc

            example = example_from_doc(doc)
            example.images = images or example.images
            example.metadata = {**example.metadata, "r3v_id": example.id}
            example.id = example_id
            return example, context
        question = next((doc[f] for f in _QUESTION_FIELDS if isinstance(doc.get(f), str)), context)
        answer = next((doc[f] for f in _ANSWER_FIELDS if doc.get(f) is not None), None)
        choices = next((list(doc[f]) for f in _CHOICE_FIELDS if isinstance(doc.get(f), list)), None)
        example = Example(
            id=example_id,
            task=task_name,
            question=question,
            answer=answer,
            images=images,
            choices=choices,
            metadata={"context": context},
        )
        return example, context

    def _request(self, example: Example, context: str) -> Request:
        if self.prompt == "cot":
            text = self.task.cot_prompt(example)
        elif self.prompt == "qa":
            text = self.task.qa_prompt(example)
        else:
            text = context
        return Request.user(text, example.load_images())

    def _sample(self, example: Example, index: int, completion: Completion, sampling: Sampling) -> Sample:
        answer = self.task.extract(completion.text, example)
        try:
            correct = bool(self.task.is_correct(answer, example)) if example.answer is not None else False
        except (TypeError, ValueError):  # lmms-eval golds need not be in the r3v task's format
            correct = False
        return Sample(
            example_id=example.id,
            sample_index=index,
            text=completion.text,
            answer=answer,
            correct=correct,
            model=self.model_id,
            sampling={k: v for k, v in sampling.to_dict().items() if k != "seed"},
            seed=sampling.seed,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason,
        )

    def _select(self, examples: list[Example], candidates: dict[str, list[Sample]]) -> list[Any]:
        if hasattr(self.selector, "select_many"):  # one model call for every document that needs one
            return self.selector.select_many(self.task, examples, candidates, self.backend)
        return [self.selector.select(self.task, ex, candidates[ex.id], self.backend) for ex in examples]

    def _result(self, example: Example, samples: list[Sample], choice: Any) -> str:
        if self.output == "answer":
            return "" if choice.answer is None else str(choice.answer)
        if choice.answer is not None:
            wanted = self.task.normalize(choice.answer, example)
            for sample in samples:
                if sample.answer is not None and self.task.normalize(sample.answer, example) == wanted:
                    return sample.text
        return choice.raw_output or (samples[0].text if samples else "")


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out: list[Any] = []
    for item in visuals:
        out += _flatten(item)
    return out


def _as_image(visual: Any, record: str):
    """PIL images pass through; paths are opened. Other media (video, audio) are refused."""
    from PIL import Image

    if isinstance(visual, Image.Image) or isinstance(visual, str):
        return load_image(visual, record=record)
    raise TypeError(f"document {record}: r3v handles images only, got {type(visual).__name__}")
