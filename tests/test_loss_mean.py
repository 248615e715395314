"""The two loss means, checked against gradients computed by hand on the tiny model.

``loss_mean="global"`` (r3v's default) is the mean over every target token of the optimizer
step; ``loss_mean="micro_batch"`` (reference A) is the mean over micro-batches of each
micro-batch's own token mean. With one item per micro-batch, the first optimizer step sees all
four items whatever the order, so the expected gradients follow from per-item sums alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from r3v.config import TrainConfig
from r3v.models.loading import load_model
from r3v.records import TrainItem
from r3v.train.data import CompletionCollator, ItemDataset
from r3v.train.trainer import objective_token_losses, train

#: Parameters compared: the first decoder layer's query projection and the last one's MLP.
WATCHED = ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight")


class FirstStepGradients(TrainerCallback):
    """Copies the gradients of the watched parameters just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self.grads:
            for name, param in model.named_parameters():
                if name.endswith(WATCHED) and param.grad is not None:
                    self.grads[_key(name)] = param.grad.detach().clone()


def _key(name: str) -> str:
    return next(w for w in WATCHED if name.endswith(w))


@pytest.fixture(scope="module")
def items(clevr_task):
    """Four items whose targets differ in length by an order of magnitude."""
    examples = clevr_task.load("train", limit=4)
    made = [
        TrainItem("qa", examples[0].id, clevr_task.qa_prompt(examples[0]), str(examples[0].answer)),
        TrainItem("cot", examples[1].id, clevr_task.cot_prompt(examples[1]), clevr_task.teacher_rationale(examples[1])),
        TrainItem("select", examples[2].id, clevr_task.qa_prompt(examples[2]), str(examples[2].answer)),
        TrainItem("cot", examples[3].id, clevr_task.cot_prompt(examples[3]), clevr_task.teacher_rationale(examples[3])),
    ]
    return made, {ex.id: ex for ex in examples}


def config(loss_mean: str) -> TrainConfig:
    # full fine-tuning (no LoRA init to reproduce), no clipping, one item per micro-batch, 4 per step
    return TrainConfig(lora=False, freeze_vision_tower=True, freeze_projector=True, epochs=1, learning_rate=1e-4,
                       warmup_ratio=0.0, lr_scheduler="constant", batch_size=1, global_batch=4, max_grad_norm=0.0,
                       loss_mean=loss_mean, group_by_length=False)


def trained_gradients(model: str, items, examples, loss_mean: str, out) -> dict[str, torch.Tensor]:
    probe = FirstStepGradients()
    train(model, items, examples, config(loss_mean), out, callbacks=[probe])
    assert set(probe.grads) == set(WATCHED)
    return probe.grads


def hand_gradients(model: str, items, examples) -> dict[str, dict[str, torch.Tensor]]:
    """Both means from each item's summed token loss and target-token count, by autograd."""
    lm = load_model(model)
    dataset = ItemDataset(lm.processor, items, examples, max_length=2048)
    collate = CompletionCollator(lm.processor.tokenizer.pad_token_id)
    sums, counts = [], []
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        objective, labels = batch.pop("objective"), batch.pop("labels")
        token_sums, token_counts = objective_token_losses(lm.model(**batch).logits, labels, objective)
        sums.append(token_sums.sum())
        counts.append(int(token_counts.sum()))
    params = {_key(n): p for n, p in lm.model.named_parameters() if n.endswith(WATCHED)}
    losses = {
        "global": sum(sums) / sum(counts),
        "micro_batch": sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums),
    }
    grads = {}
    for mean, loss in losses.items():
        values = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        grads[mean] = dict(zip(params, values, strict=True))
    assert len(set(counts)) > 1 and max(counts) > 5 * min(counts)  # the two means really differ
    return grads


def test_each_loss_mean_back_propagates_its_own_average(tiny_qwen, items, tmp_path):
    made, examples = items
    expected = hand_gradients(tiny_qwen, made, examples)
    for mean in ("global", "micro_batch"):
        got = trained_gradients(tiny_qwen, made, examples, mean, tmp_path / mean)
        other = "micro_batch" if mean == "global" else "global"
        for name in WATCHED:
            torch.testing.assert_close(got[name], expected[mean][name], rtol=1e-4, atol=1e-7)
            # and not the other mean's gradient: the check can tell them apart
            assert not torch.allclose(got[name], expected[other][name], rtol=1e-2, atol=1e-6)


def test_an_unknown_loss_mean_is_refused():
    with pytest.raises(ValueError, match="loss_mean"):
        TrainConfig(loss_mean="per_item")
