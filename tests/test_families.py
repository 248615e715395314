"""Conformance of every supported VLM family, on the built-in tiny models (real HF classes, random
weights, a tokenizer trained here, each family's own chat format), loaded from ``save_pretrained``
folders as a hub checkpoint is.

One parametrised test per property: the model loads without torchvision with its family's
processor; greedy shared-prefill output equals ``model.generate`` (or the family falls back to
``generate``); samples are reproducible from the seed; training labels cover exactly the target
and the end-of-turn token, and predicted lengths equal the encodings; the shared-image forward
gives the plain loss and gradients; LoRA lands on the language model's linear layers only; the
pixel cap acts through the family's own knob; self-select builds and parses its request; the vLLM
request translation is right (strict stand-in); a full ``r3v train`` and ``r3v bench`` run from
the CLI with nothing but ``--model FOLDER`` and the size limits.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import test_vllm_backend
import torch
from PIL import Image
from test_shared_images import repeated_image_items

from r3v.backends.hf import HFBackend, supports_shared_prefill
from r3v.models import families, shared_images
from r3v.models.batching import SEQUENCE_KEYS, collate, encode
from r3v.models.loading import built_in_models, load_model
from r3v.models.presets import (
    PRESETS,
    default_preset,
    model_family,
    preset_for_model,
    reference_preset,
    tiny_preset,
)
from r3v.models.processors import pixel_cap, set_pixel_cap
from r3v.models.tiny import TINY_MODELS, TINY_SPECS, tiny_model_path
from r3v.records import Request, Sample, Sampling
from r3v.train import TrainConfig, prepare_model
from r3v.train.data import CompletionCollator, ItemDataset, LengthMeter, encode_item, end_of_turn, prompt_text

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Expected:
    """What each family's tiny model must look like, from its public format (not from r3v's code)."""

    model_class: str
    processor_class: str
    generation_prompt: str
    """How the rendered prompt ends: the family's assistant turn opener."""
    end_of_turn: str
    image_placeholder: str
    """What the chat template writes per image (the processor, or vLLM, expands it)."""
    image_tokens: int
    """Image tokens for one 112 px image (tiles / crops / anyres grid included)."""
    language_model: str
    """The module that holds the language model, in the family's module tree."""
    shared_prefill: bool
    preset: str


EXPECTED = {
    "tiny-qwen2-vl": Expected("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "<|im_start|>assistant\n",
                              "<|im_end|>", QWEN_IMAGE, 16, "model.language_model", True, "qwen2-vl"),
    "tiny-llava": Expected("LlavaForConditionalGeneration", "LlavaProcessor", "<|im_start|>assistant\n",
                           "<|im_end|>", "<image>", 16, "model.language_model", True, "llava"),
    "tiny-qwen2.5-vl": Expected("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                                "<|im_start|>assistant\n", "<|im_end|>", QWEN_IMAGE, 16, "model.language_model", True,
                                "qwen2.5-vl"),
    # 112 px is resized to 128 px: 8x8 patches of 16 px, merged 2x2
    "tiny-qwen3-vl": Expected("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "<|im_start|>assistant\n",
                              "<|im_end|>", QWEN_IMAGE, 16, "model.language_model", True, "qwen3-vl"),
    # 2x2 tiles of 56 px plus the thumbnail, 4 tokens each
    "tiny-internvl": Expected("InternVLForConditionalGeneration", "InternVLProcessor", "<|im_start|>assistant\n",
                              "<|im_end|>", "<IMG_CONTEXT>", 20, "model.language_model", True, "internvl"),
    # 2x2 crops of 56 px plus the global image, 4 tokens each
    "tiny-smolvlm": Expected("Idefics3ForConditionalGeneration", "Idefics3Processor", "Assistant:",
                             "<end_of_utterance>", "<image>", 20, "model.text_model", True, "smolvlm"),
    # Gemma 3 overrides prepare_inputs_for_generation (pixel values on the first step only, token types)
    "tiny-gemma3": Expected("Gemma3ForConditionalGeneration", "Gemma3Processor", "<start_of_turn>model\n",
                            "<end_of_turn>", "<start_of_image>", 4, "model.language_model", False, "gemma3"),
    # anyres: a 2x2 grid of 56 px crops (8x8 patches + 8 newlines) plus the 4x4 base
    "tiny-llava-onevision": Expected("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
                                     "<|im_start|>assistant\n", "<|im_end|>", "<image>", 88, "model.language_model",
                                     True, "llava-onevision"),
}
FAMILY_NAMES = list(EXPECTED)


def test_the_table_covers_every_built_in_family():
    assert sorted(EXPECTED) == sorted(TINY_MODELS)
    described = built_in_models()
    assert set(TINY_MODELS) < set(described) and "r3v-clevr-base" in described
    assert all(text and "\n" not in text for text in described.values())


@pytest.fixture(scope="session")
def family_path(r3v_cache):
    """Name -> the built model's folder (built once per session, cached under R3V_CACHE)."""
    return lambda name: str(tiny_model_path(name))


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory, family_path):
    """Name -> a copy of the built folder as a hub checkpoint has it: only what ``save_pretrained``
    wrote, without r3v's own ``r3v.json`` (so r3v picks the settings from the family)."""
    root = tmp_path_factory.mktemp("hub")

    def make(name: str) -> str:
        target = root / name
        if not target.exists():
            shutil.copytree(family_path(name), target, ignore=shutil.ignore_patterns("r3v.json", "r3v_tiny.json"))
        return str(target)

    return make


@pytest.fixture(scope="module")
def examples(clevr_task):
    return clevr_task.load("train", limit=2)


def image_token_count(model, encoded) -> int:
    return int((encoded["input_ids"] == model.config.image_token_id).sum())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_loads_as_a_hub_checkpoint_with_its_family_processor_and_chat_format(name, hub_folder, clevr_task):
    expected = EXPECTED[name]
    lm = load_model(hub_folder(name))
    assert type(lm.model).__name__ == expected.model_class
    processor = lm.processor
    # the stock class (or the same class without its video part): no torchvision needed
    assert type(processor).__name__ == expected.processor_class
    assert getattr(processor, "video_processor", None) is None
    assert type(processor.image_processor).__name__.endswith("Pil")
    example = clevr_task.load("test", limit=1)[0]
    text = processor.apply_chat_template(Request.user("How many?", example.load_images()).messages,
                                         add_generation_prompt=True, tokenize=False)
    assert text.endswith(expected.generation_prompt) and text.count(expected.image_placeholder) == 1
    encoded = encode(processor, text, example.load_images())
    assert image_token_count(lm.model, encoded) == expected.image_tokens
    assert end_of_turn(processor) == expected.end_of_turn
    saved = json.loads((Path(hub_folder(name)) / "processor_config.json").read_text())
    assert saved["processor_class"] == expected.processor_class  # AutoProcessor builds it where torchvision is


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_output_equals_generate_and_a_text_only_prompt_keeps_the_batch_images(name, family_path, clevr_task):
    """Greedy decoding equals ``model.generate`` per request; the shortest request, text-only,
    opens the batch, and the other requests still see their images."""
    expected = EXPECTED[name]
    backend = HFBackend(model=family_path(name))
    assert backend.shared_prefill is expected.shared_prefill
    assert supports_shared_prefill(backend.loaded.model) is expected.shared_prefill
    examples = clevr_task.load("test", limit=3)
    requests = [Request.user(clevr_task.cot_prompt(e), e.load_images()) for e in examples]
    requests.append(Request.user("What is 2 + 3?"))
    greedy = backend.generate(requests, Sampling(greedy=True, max_new_tokens=10))
    model, pad = backend.loaded.model, backend.tokenizer.pad_token_id
    for request, completions in zip(requests, greedy, strict=True):
        batch = collate([encode(backend.processor, backend.prompt_text(request), request.images)], pad, "left")
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=pad,
                                    eos_token_id=backend._stop_ids())
        reference = backend.tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert completions[0].text == reference


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sampled_completions_are_reproducible_from_the_seed(name, family_path, clevr_task):
    backend = HFBackend(model=family_path(name))
    examples = clevr_task.load("test", limit=2)
    requests = [Request.user(clevr_task.cot_prompt(e), e.load_images()) for e in examples]
    sampling = Sampling(n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, seed=11)

    def texts(batch, seed=11):
        return [[c.text for c in cs] for cs in backend.generate(batch, replace(sampling, seed=seed))]

    first = texts(requests)
    assert texts(requests) == first
    assert texts(requests, seed=12) != first
    assert all(len(set(row)) > 1 for row in first)  # n distinct draws per request, not one repeated
    if EXPECTED[name].shared_prefill:  # per-request random streams: one request per batch changes nothing
        alone = HFBackend(model=family_path(name), loaded=backend.loaded, token_budget=1)
        assert [[c.text for c in cs] for cs in alone.generate(requests, sampling)] == first


#: (width, height) lists: square, wide, tall, small, and two images of different sizes. InternVL's
#: tiles and Idefics3's crops follow the size and aspect ratio, LLaVA-OneVision's anyres grid too.
IMAGE_SIZES = [[(112, 112)], [(168, 84)], [(56, 140)], [(40, 40)], [(112, 112), (84, 168)]]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_labels_cover_the_target_and_end_of_turn_and_lengths_are_predicted_exactly(name, family_path, examples):
    expected = EXPECTED[name]
    lm = load_model(family_path(name))
    processor, tokenizer = lm.processor, lm.processor.tokenizer
    image = examples[0].load_images()[0]
    target = "There are 3 red objects. 3 + 2 = 5\nAnswer: 5"
    end = end_of_turn(processor)
    assert end == expected.end_of_turn
    features, status = encode_item(processor, "How many objects?", target, [image], end, max_length=2048)
    assert status == "ok"
    labels, ids = features["labels"], features["input_ids"]
    prompt = encode(processor, prompt_text(processor, "How many objects?", 1), [image])
    length = prompt["input_ids"].shape[0]
    # the prompt is what generation sees; the labels are exactly the target and the end token
    assert torch.equal(ids[:length], prompt["input_ids"]) and bool((labels[:length] == -100).all())
    assert torch.equal(labels[length:], ids[length:])
    assert tokenizer.decode(ids[length:]) == target + end
    assert ids[-1].item() == tokenizer.convert_tokens_to_ids(end)

    meter = LengthMeter(processor)
    rows = set()
    for sizes in IMAGE_SIZES:
        images = [image.resize(size) for size in sizes]
        text = prompt_text(processor, "How many objects?", len(images))
        real = encode(processor, text, images)
        assert meter.prompt_lengths([text], [sizes]) == [real["input_ids"].shape[0]], sizes
        rows.add(real["pixel_values"].shape[0])
    if name in ("tiny-internvl", "tiny-smolvlm"):
        assert len(rows) > 2, "tiles / crops must vary with the image size in this check"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_batch_of_differently_sized_images_gives_each_row_its_own_logits(name, family_path, examples):
    """Vision tensors of different shapes (LLaVA-OneVision's crops per image, InternVL's tiles,
    Idefics3's crops) batch together, padded where a family needs it, and each row of a training
    batch computes what the item computes alone."""
    lm = load_model(family_path(name))
    image = examples[0].load_images()[0]
    end = end_of_turn(lm.processor)
    features = []
    for images in ([image], [image.resize((168, 84))], [], [image.resize((56, 140)), image]):
        encoded, _ = encode_item(lm.processor, "How many objects?", "Answer: 3", images, end, max_length=2048)
        features.append({**encoded, "objective": 0})
    batch = CompletionCollator(lm.processor.tokenizer.pad_token_id)(features)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "objective", "padding")}
    with torch.no_grad():
        logits = lm.model(**inputs).logits
        for row, feature in enumerate(features):
            length = feature["input_ids"].shape[0]
            single = {k: (v[None] if k in SEQUENCE_KEYS else v) for k, v in feature.items()
                      if k not in ("labels", "objective")}
            assert torch.allclose(logits[row, :length], lm.model(**single).logits[0], atol=1e-4), row


def assert_close_grads(actual: dict, expected: dict) -> None:
    """Gradients equal up to float32 summation order, relative to each tensor's scale: Gemma 3
    scales embeddings by sqrt(hidden), so its projector's gradient reaches ~500 and an element-wise
    relative tolerance would judge the rounding of its near-zero entries."""
    assert actual.keys() == expected.keys() and expected
    for key, grad in expected.items():
        scale = float(grad.abs().max())
        assert float((actual[key] - grad).abs().max()) <= 1e-5 * scale + 1e-7, key


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_shared_image_forward_gives_the_plain_loss_and_gradients(name, family_path, clevr_task, examples):
    """Every family takes the shared-image path (none falls back): with a trainable encoder, and
    with LoRA (frozen encoder) whose features come from the cache on the next step."""
    lm = load_model(family_path(name))
    model = lm.model.train(False)  # no dropout: both forwards must compute the same function
    assert shared_images.supports_shared_images(model)
    dataset = ItemDataset(lm.processor, repeated_image_items(clevr_task, examples),
                          {ex.id: ex for ex in examples}, max_length=2048)
    features = [dataset[i] for i in range(len(dataset))]
    pad = lm.processor.tokenizer.pad_token_id
    plain = CompletionCollator(pad)(features)
    shared = CompletionCollator(pad, share_images=True)(features)
    units = [features[i][shared_images.IMAGE_SET_KEY][1] for i in (0, 4)]  # one image; the pair
    # each distinct set once: A, B and {B, A}; items in order A, B, A, -, {B, A}, A, {B, A}
    assert shared["pixel_values"].shape[0] < plain["pixel_values"].shape[0]
    assert len(shared[shared_images.IMAGE_INDEX_KEY]) == 4 * units[0] + 2 * units[1]

    def loss_and_grads(network, batch, cache=None):
        batch = {k: v for k, v in batch.items() if k not in ("objective", "padding")}
        network.zero_grad(set_to_none=True)
        loss = shared_images.forward(network, batch, cache=cache).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(model, plain)
    shared_loss, shared_grads = loss_and_grads(model, shared)
    assert torch.allclose(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert {n for n, _ in families.image_path_parameters(model)} & plain_grads.keys(), "the encoder must train here"
    assert_close_grads(shared_grads, plain_grads)

    peft = prepare_model(load_model(family_path(name)).model, TrainConfig(lora=True)).train(False)
    assert shared_images.encoder_is_frozen(peft)
    expected_loss, expected_grads = loss_and_grads(peft, plain)
    cache = shared_images.EncoderCache(budget_bytes=1 << 30)
    loss_and_grads(peft, CompletionCollator(pad, share_images=True)(features[:4]), cache)  # sets A and B
    loss, grads = loss_and_grads(peft, shared, cache)
    assert (cache.misses, cache.hits) == (3, 2)
    assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, expected_grads)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_lands_on_the_language_model_linear_layers_and_nowhere_else(name, family_path):
    base = load_model(family_path(name)).model
    prefix = EXPECTED[name].language_model + "."
    expected = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}
    assert expected and families.module_name(base, families.language_model(base)) == prefix[:-1]
    peft = prepare_model(base, TrainConfig(lora=True))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not trainable & {n for n, _ in families.image_path_parameters(peft)}
    # an explicit lora_target still wins
    only_o = prepare_model(load_model(family_path(name)).model, TrainConfig(lora=True, lora_target=r".*\.o_proj"))
    named = {n.removeprefix("base_model.model.") for n, m in only_o.named_modules() if hasattr(m, "lora_A")}
    assert named and all(n.endswith(".o_proj") for n in named)


#: Each capping family's token count for one 112 px image at max_pixels 56 x 112 (half its pixels):
#: a 56 px image (Qwen), 1 tile without a thumbnail (InternVL), 1 crop without a split (Idefics3,
#: whose edge rounds down to whole crops), a 1x1 anyres grid plus the base (LLaVA-OneVision).
CAPPED_TOKENS = {"tiny-qwen2-vl": 4, "tiny-qwen2.5-vl": 4, "tiny-qwen3-vl": 4, "tiny-internvl": 4,
                 "tiny-smolvlm": 4, "tiny-llava-onevision": 36}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_pixel_cap_acts_through_the_family_knob(name, family_path, examples):
    lm = load_model(family_path(name))
    image = examples[0].load_images()[0]
    text = prompt_text(lm.processor, "x", 1)
    before = image_token_count(lm.model, encode(lm.processor, text, [image]))
    capped = set_pixel_cap(lm.processor, 56 * 112)
    after = image_token_count(lm.model, encode(lm.processor, text, [image]))
    if name in ("tiny-llava", "tiny-gemma3"):  # fixed-size processors: nothing to cap
        assert not capped and pixel_cap(lm.processor) is None and after == before
        return
    assert capped and pixel_cap(lm.processor) <= 56 * 112
    assert after == CAPPED_TOKENS[name] < before
    assert set_pixel_cap(lm.processor, 10**9) and pixel_cap(lm.processor) <= 56 * 112  # never raised


def test_the_smolvlm_cap_cuts_crops_of_a_larger_image(family_path, examples):
    """Idefics3 resizes the longest edge and splits into crops: a 224 px image is cut into 2x2
    crops at the tiny model's own 112 px edge, into one crop (and no split) at a cap of 56 x 56."""
    lm = load_model(family_path("tiny-smolvlm"))
    image = examples[0].load_images()[0].resize((224, 224))
    text = prompt_text(lm.processor, "x", 1)
    before = encode(lm.processor, text, [image])["pixel_values"].shape[0]
    set_pixel_cap(lm.processor, 56 * 56)
    assert (before, encode(lm.processor, text, [image])["pixel_values"].shape[0]) == (5, 1)
    with pytest.raises(ValueError, match="below one 56x56 crop"):
        set_pixel_cap(lm.processor, 50 * 50)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_self_select_builds_its_request_in_the_family_format_and_parses_the_reply(name, family_path, clevr_task):
    from r3v.selectors.self_select import SelfSelectSelector

    backend = HFBackend(model=family_path(name))
    example = clevr_task.load("test", limit=1)[0]
    wrong = str(int(example.answer) + 1)
    candidates = [Sample(example.id, i, f"There are some objects.\nAnswer: {a}", a, a == str(example.answer),
                         "hand-made", {}, 0) for i, a in enumerate([wrong, str(example.answer), str(example.answer)])]
    selector = SelfSelectSelector(max_new_tokens=6)
    rendered = backend.prompt_text(Request.user(selector.prompt(clevr_task, example, candidates), example.load_images()))
    assert rendered.count(EXPECTED[name].image_placeholder) == 1 and "Answer: " + wrong in rendered
    choice = selector.select(clevr_task, example, candidates, backend)
    assert choice.raw_output is not None and choice.how in ("model", "fallback")
    if choice.how == "fallback":  # the random model's reply has no answer: the majority decides
        assert clevr_task.extract(choice.raw_output, example) is None and choice.answer == str(example.answer)


# ---------------------------------------------------------------------------------------------
# vLLM request translation, against the strict stand-in (tests/vllm_standin)
# ---------------------------------------------------------------------------------------------

#: The strict vLLM stand-in (tests/vllm_standin) as ``vllm``, for one test: test_vllm_backend's fixture.
standin_vllm = test_vllm_backend.standin_vllm

#: What ``max_pixels=6272`` (56 x 112) becomes in vLLM's ``mm_processor_kwargs`` per family;
#: None: refused (fixed-size processors); {}: images downscaled by r3v instead (anyres).
VLLM_CAP = {"tiny-qwen2-vl": {"max_pixels": 6272}, "tiny-qwen2.5-vl": {"max_pixels": 6272},
            "tiny-qwen3-vl": {"max_pixels": 6272}, "tiny-internvl": {"max_patches": 2},
            "tiny-smolvlm": {"size": {"longest_edge": 56}}, "tiny-llava-onevision": {},
            "tiny-llava": None, "tiny-gemma3": None}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vllm_requests_carry_the_family_prompt_images_and_limits(name, standin_vllm, family_path, clevr_task):
    from r3v.backends.vllm import VLLMBackend
    from r3v.errors import DataError

    expected = EXPECTED[name]
    path = family_path(name)
    hf_processor = load_model(path).processor
    examples = clevr_task.load("test", limit=2)
    one = Request.user(clevr_task.cot_prompt(examples[0]), examples[0].load_images())
    two = Request.user("Same count?", examples[0].load_images() + examples[1].load_images())

    backend = VLLMBackend(model=path)
    assert standin_vllm.ENGINES[-1].given == {"limit_mm_per_prompt": {"image": 1}}
    inputs = backend.engine_inputs(one)
    rendered = hf_processor.apply_chat_template(one.messages, add_generation_prompt=True, tokenize=False)
    assert inputs["prompt"] == rendered and rendered.count(expected.image_placeholder) == 1
    assert inputs["multi_modal_data"]["image"] is one.images[0]
    stops = {hf_processor.tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECS[name].stop_tokens}
    assert stops <= set(backend.stop_token_ids)
    with pytest.raises(DataError, match="raise max_images_per_prompt"):
        backend.engine_inputs(two)
    completions = backend.generate([one], Sampling(n=2, max_new_tokens=6, seed=1))
    assert len(completions[0]) == 2
    assert standin_vllm.ENGINES[-1].calls[-1]["prompts"][0]["prompt"] == rendered

    pair = VLLMBackend(model=path, max_images_per_prompt=2).engine_inputs(two)
    assert pair["prompt"].count(expected.image_placeholder) == 2 and len(pair["multi_modal_data"]["image"]) == 2

    cap = VLLM_CAP[name]
    if cap is None:
        with pytest.raises(ValueError, match="fixed"):
            VLLMBackend(model=path, max_pixels=6272)
        return
    capped = VLLMBackend(model=path, max_pixels=6272)
    assert standin_vllm.ENGINES[-1].given.get("mm_processor_kwargs", {}) == cap
    sent = capped.engine_inputs(one)["multi_modal_data"]["image"]
    if name == "tiny-llava-onevision":  # the anyres grid follows the image size: r3v sends it smaller
        assert sent.size[0] * sent.size[1] <= 6272 < one.images[0].size[0] * one.images[0].size[1]
    else:
        assert sent is one.images[0]


# ---------------------------------------------------------------------------------------------
# Presets and loading rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_has_a_preset_found_from_its_config(name, family_path, hub_folder):
    preset_name = EXPECTED[name].preset
    assert preset_name in PRESETS
    assert model_family(hub_folder(name)) == preset_name
    assert preset_for_model(hub_folder(name)) == reference_preset(preset_name)
    assert preset_for_model(family_path(name)) == tiny_preset()  # r3v.json names the tiny preset
    preset = reference_preset(preset_name)
    published = {"qwen2-vl": (8, 16), "qwen2.5-vl": (8, 16), "qwen3-vl": (8, 16), "llava": (128, 256)}
    assert (preset.lora_r, preset.lora_alpha) == published.get(preset_name, families.DEFAULT_LORA)
    assert preset.lora and preset.global_batch == 64 and preset.learning_rate == 3e-5


def test_family_presets_and_their_pixel_caps():
    assert reference_preset("qwen2-vl").max_pixels == 768 * 768 == reference_preset("qwen2.5-vl").max_pixels
    assert reference_preset("qwen3-vl").max_pixels == 896 * 896
    assert reference_preset("internvl").max_pixels == 4 * 448 * 448
    assert reference_preset("smolvlm").max_pixels == 768 * 768 == reference_preset("idefics3").max_pixels
    assert reference_preset("llava-onevision").max_pixels == 384 * 384
    assert reference_preset("gemma3").max_pixels is None and reference_preset("llava").max_pixels is None
    assert (reference_preset("qwen-vl").lora_r, reference_preset("qwen-vl").lora_alpha) == (64, 16)
    assert reference_preset("qwen-vl").lora_target == families.QWEN_VL_LORA_TARGET
    assert {f.name for f in families.FAMILIES} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown model family 'gpt-2'; known: qwen-vl, llava"):
        reference_preset("gpt-2")


def test_an_unknown_family_trains_with_the_default_preset_and_says_so_once(tmp_path, caplog):
    folder = tmp_path / "aya"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "aya_vision"}))
    assert model_family(str(folder)) is None
    with caplog.at_level(logging.WARNING, logger="r3v.models.presets"):
        preset = preset_for_model(str(folder))
    assert preset == default_preset() and preset.lora and preset.max_pixels is None
    lines = [r.getMessage() for r in caplog.records if r.name == "r3v.models.presets"]
    assert len(lines) == 1 and "'aya_vision'" in lines[0] and "default preset" in lines[0]


def remote_code_folder(root: Path, auto_map: dict[str, str], model_type: str = "qwen") -> str:
    """A folder shaped like Qwen-VL-Chat's: a config whose classes live in the repository's own code."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(
        {"model_type": model_type, "architectures": ["QWenLMHeadModel"], "auto_map": auto_map}))
    return str(root)


def test_remote_code_models_get_a_plain_error(tmp_path):
    from click.testing import CliRunner

    from r3v.cli import main
    from r3v.errors import DataError

    qwen_vl = remote_code_folder(tmp_path / "qwen-vl-chat", {
        "AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"})
    for trust in (False, True):
        with pytest.raises(DataError, match="cannot run this model, with or without --trust-remote-code") as error:
            load_model(qwen_vl, trust_remote_code=trust)
        assert "Qwen/Qwen2-VL-7B-Instruct" in str(error.value)
    other = remote_code_folder(tmp_path / "custom-vlm", {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForImageTextToText": "modeling_x.XModel"}, "x_vlm")
    with pytest.raises(DataError, match="pass --trust-remote-code"):
        load_model(other)
    result = CliRunner().invoke(main, ["bench", "--model", qwen_vl, "--limit", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "cannot run this model" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Training and the CLI, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_full_fine_tuning_trains_the_language_model_and_saves_a_loadable_model(name, family_path, clevr_task,
                                                                                 examples, tmp_path):
    from r3v.train import train

    items = repeated_image_items(clevr_task, examples)[:4]  # images by example id: a job file holds no pixels
    # no warm-up: one step at a warm-up start would apply a learning rate of 0
    config = replace(tiny_preset(), epochs=1, warmup_ratio=0.0, batch_size=len(items), global_batch=len(items))
    result = train(family_path(name), items, {ex.id: ex for ex in examples}, config, tmp_path / "run")
    assert result.steps == 1 and not result.is_adapter and all(v == v for v in result.losses.values())
    base, tuned = load_model(family_path(name)).model, load_model(result.output_path).model
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    image_path = {n for n, _ in families.image_path_parameters(base)}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and not changed & image_path  # the tiny preset keeps the image path frozen


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_r3v_generate_train_and_bench_run_from_the_cli_on_a_saved_folder(name, hub_folder, tmp_path):
    """``r3v generate``, ``r3v train`` and ``r3v bench`` with only ``--model FOLDER`` and the size
    limits: the family's preset (LoRA on the language model), its processor and its chat format, end
    to end."""
    from click.testing import CliRunner

    from r3v.cli import main

    folder = hub_folder(name)
    runner = CliRunner()
    generate = runner.invoke(main, ["generate", "--model", folder, "--limit", "2", "--n", "2", "--max-new-tokens", "8",
                                    "--out", str(tmp_path / "samples.jsonl")])
    assert generate.exit_code == 0, generate.output
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["sample_index"] for s in samples} == {0, 1}
    assert all(isinstance(s["text"], str) and s["completion_tokens"] >= 1 for s in samples)
    train = runner.invoke(main, ["train", "--model", folder, "--iterations", "1", "--train-limit", "4", "--test-limit",
                                 "2", "--epochs", "1", "--max-new-tokens", "16", "--out", str(tmp_path / "run")])
    assert train.exit_code == 0, train.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    adapter = json.loads((tmp_path / "run" / "iter1" / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"].startswith(EXPECTED[name].language_model.replace(".", r"\."))
    assert adapter["r"] == reference_preset(EXPECTED[name].preset).lora_r
    bench = runner.invoke(main, ["bench", "--model", folder, "--limit", "2", "--n", "2", "--out", str(tmp_path / "b")])
    assert bench.exit_code == 0, bench.output
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results


def test_an_image_bigger_than_the_llava_onevision_cap_is_downscaled_before_the_processor(family_path, examples):
    lm = load_model(family_path("tiny-llava-onevision"))
    image = examples[0].load_images()[0].resize((224, 224), Image.NEAREST)
    set_pixel_cap(lm.processor, 56 * 56)
    encoded = encode(lm.processor, prompt_text(lm.processor, "x", 1), [image])
    assert encoded["image_sizes"].tolist() == [[56, 56]]  # the anyres grid is chosen from the smaller image
