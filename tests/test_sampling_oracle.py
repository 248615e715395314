"""``filter_logits`` and ``draw`` (the HF backend's sampler) against independent oracles.

The self-training loop samples every rationale through these two functions, at T 0.9, top-p 0.95
and top-k 50. A nucleus cut one token off, or a draw that reads another row's random number,
changes which rationales exist without any other test noticing. So, on random logits without
ties:

- the distribution ``filter_logits`` leaves (the softmax of its output) must equal both
  transformers' own logits warpers, applied in ``generate``'s order, and a hand computation in
  float64 (sort, keep the top k, cumulative mass, cut);
- ``draw`` must invert each row's CDF at that row's uniform, its empirical frequencies over
  20,000 seeded uniforms must match that distribution within binomial error, it must never pick
  a token outside the nucleus, and a row's draw must not depend on the other rows of its batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from r3v.backends.hf import draw, filter_logits
from r3v.records import Sampling

VOCAB = 300
DRAWS = 20_000

#: (temperature, top_k, top_p): the loop's setting first, then each filter alone or in pairs.
SETTINGS = [
    (0.9, 50, 0.95),  # the loop's sampling (see test_loop_samples_with_the_first_setting)
    (0.7, 0, 0.9),  # top-p only, sharpened
    (1.3, 5, 1.0),  # top-k only, flattened
    (1.0, 0, 0.5),  # top-p only, a small nucleus
]


def random_logits(rows: int, seed: int) -> torch.Tensor:
    """Float32 logits without ties. At scale 1.5 the nucleus of T 0.9 / top-p 0.95 holds about 40
    tokens, so its cut falls inside the top 50 and every filter of every setting removes tokens."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * 1.5
    for row in logits:
        assert row.unique().numel() == VOCAB  # no ties: the cut is unambiguous
    return logits


def hand_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The filtered distribution of one row, computed in float64 from the definitions.

    Temperature divides the logits. Top-k keeps the k largest. Top-p walks the survivors from most
    to least likely and keeps a token while the mass of the tokens before it is below top_p (the
    first token is always kept). The kept tokens are renormalised.
    """
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(len(scaled), dtype=bool)
    candidates = order[:top_k] if 0 < top_k < len(scaled) else order
    weights = np.exp(scaled[candidates] - scaled[candidates].max())
    probs = weights / weights.sum()
    mass_before = 0.0
    for rank, token in enumerate(candidates):
        if rank > 0 and 0.0 < top_p < 1.0 and mass_before >= top_p:
            break
        keep[token] = True
        mass_before += probs[rank]
    out = np.zeros(len(scaled))
    kept_weights = np.exp(scaled[keep] - scaled[keep].max())
    out[keep] = kept_weights / kept_weights.sum()
    return out


def transformers_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers, added under the conditions and in the order ``generate`` uses
    (``GenerationMixin._get_logits_processor``: temperature if != 1, top-k if != 0, top-p if < 1)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return warpers(dummy_ids, logits.clone()).double().softmax(dim=-1)


def boundary_margin(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> float:
    """How far the cumulative masses lie from top_p: float32 and float64 agree on the cut only
    when no mass sits within rounding distance of top_p, so the test demands a clear margin."""
    if not 0.0 < top_p < 1.0:
        return math.inf
    scaled = np.sort(logits.astype(np.float64) / temperature)[::-1]
    if 0 < top_k < len(scaled):
        scaled = scaled[:top_k]
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return float(np.min(np.abs(np.cumsum(probs) - top_p)))


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_filtered_distribution_equals_transformers_and_a_hand_computation(temperature, top_k, top_p):
    logits = random_logits(rows=8, seed=17)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    ours = filtered.double().softmax(dim=-1).numpy()
    theirs = transformers_distribution(logits, temperature, top_k, top_p).numpy()
    for row in range(logits.shape[0]):
        row_logits = logits[row].numpy()
        # float32 cumulative sums over 300 terms are good to about 1e-5 at worst
        assert boundary_margin(row_logits, temperature, top_k, top_p) > 5e-5
        hand = hand_distribution(row_logits, temperature, top_k, top_p)
        support = hand > 0
        # The same tokens survive in all three (a nucleus one token too wide or narrow fails here) ...
        assert np.array_equal(ours[row] > 0, support), row
        assert np.array_equal(theirs[row] > 0, support), row
        # ... with the same probabilities (float32 logits: agreement to about 1e-6).
        np.testing.assert_allclose(ours[row], hand, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours[row], theirs[row], rtol=1e-5, atol=1e-7)
        # Filtered-out tokens are -inf (never drawable); the kept ones keep their scaled logit.
        assert torch.isneginf(filtered[row][torch.from_numpy(~support)]).all()
        kept = torch.from_numpy(support)
        torch.testing.assert_close(filtered[row][kept], logits[row][kept] / temperature)
        # Not vacuous: each active filter removed tokens, and more than one token is left.
        if top_p < 1.0:
            assert 1 < support.sum() < (top_k or VOCAB)
        else:
            assert support.sum() == top_k


@pytest.mark.parametrize("top_p, survivors", [(0.5, 2), (0.75, 3), (0.25, 1), (0.2, 1), (0.3, 2)])
def test_a_token_is_dropped_when_the_mass_before_it_is_exactly_top_p(top_p, survivors):
    """Four equal logits give probabilities of exactly 0.25, so the mass ranked before a token
    can equal top_p exactly. transformers drops that token (its ascending cumulative mass is
    <= 1 - top_p); r3v's rule ("dropped when the tokens above it already hold top_p") must too.
    Which of the tied tokens survive is arbitrary; how many is not."""
    logits = torch.full((1, 8), float("-inf"))
    logits[0, :4] = 0.0
    ours = filter_logits(logits, 1.0, 0, top_p)
    theirs = TopPLogitsWarper(top_p=top_p)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(theirs).sum()) == survivors


def test_the_most_likely_token_always_survives():
    # One token holds 0.99 of the mass: top-p 0.5 keeps it alone, never an empty row.
    logits = torch.tensor([[10.0, 5.0, 0.0, -1.0]])
    for top_p in (0.01, 0.5, 0.98):
        kept = torch.isfinite(filter_logits(logits, 1.0, 0, top_p)[0])
        assert kept.tolist() == [True, False, False, False]


def hand_inverse_cdf(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Token t is drawn for u in [cdf[t-1], cdf[t]) (cdf normalised to end at 1); tokens of zero
    probability own an empty interval."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return np.array([int(np.argmax(cdf > u)) for u in uniforms])


def chi_square_critical(dof: int, z: float = 4.753) -> float:
    """Upper critical value of chi-square at about p = 1e-6 (z = 4.753), by the Wilson-Hilferty
    cube approximation (accurate to a few percent for dof >= 3)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_draw_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    logits = random_logits(rows=1, seed=23)
    expected = hand_distribution(logits[0].numpy(), temperature, top_k, top_p)
    # One row per draw, every row with the same logits and its own uniform: the frequencies are
    # those of 20,000 independent draws, and a draw that read another row's uniform would repeat.
    scores = filter_logits(logits, temperature, top_k, top_p).expand(DRAWS, VOCAB).contiguous()
    uniforms = torch.rand(DRAWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    picked = draw(scores, uniforms).numpy()

    # Exactly the inverse CDF at each row's own uniform.
    reference = hand_inverse_cdf(scores[0].double().softmax(-1).numpy(), uniforms.numpy())
    assert np.array_equal(picked, reference)

    # Never a token outside the filtered support.
    support = expected > 0
    assert support[picked].all()
    assert len(set(picked.tolist())) > 1

    counts = np.bincount(picked, minlength=VOCAB).astype(np.float64)
    # Every token within 5 binomial standard errors of its expected count (a bound, per token,
    # that a correct sampler breaks with probability below 1e-6).
    mean = DRAWS * expected
    standard_error = np.sqrt(DRAWS * expected * (1 - expected))
    assert (np.abs(counts - mean) <= 5 * standard_error + 1e-9).all(), np.abs(counts - mean) / (standard_error + 1e-12)
    # Pearson's chi-square over the support, below its 1e-6 critical value.
    chi_square = float(((counts[support] - mean[support]) ** 2 / mean[support]).sum())
    dof = int(support.sum()) - 1
    assert chi_square < chi_square_critical(dof), (chi_square, dof)
    # And the total variation distance, whose expectation is at most 0.5 * sum sqrt(p(1-p)/N);
    # McDiarmid's inequality puts a deviation of 0.02 beyond that at probability exp(-2 N 0.02^2) < 1e-6.
    total_variation = 0.5 * float(np.abs(counts / DRAWS - expected).sum())
    assert total_variation <= 0.5 * float(np.sqrt(expected * (1 - expected) / DRAWS).sum()) + 0.02


def test_a_rows_draw_depends_only_on_its_own_logits_and_uniform():
    logits = random_logits(rows=6, seed=31)
    scores = filter_logits(logits, 0.9, 50, 0.95)
    uniforms = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together = draw(scores, uniforms)
    alone = torch.cat([draw(scores[i : i + 1], uniforms[i : i + 1]) for i in range(6)])
    assert together.tolist() == alone.tolist()
    # The same rows in another order, with other company: each row still draws the same token.
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = draw(scores[order], uniforms[order])
    assert shuffled.tolist() == together[order].tolist()
    company = filter_logits(random_logits(rows=6, seed=99), 0.9, 50, 0.95)
    mixed = draw(torch.cat([company[:3], scores[:2], company[3:]]), torch.cat([uniforms.flip(0)[:3], uniforms[:2], uniforms[:3]]))
    assert mixed[3:5].tolist() == together[:2].tolist()
    # Not vacuous: identical logits with different uniforms draw different tokens.
    same = draw(scores[:1].expand(6, VOCAB).contiguous(), uniforms)
    assert len(set(same.tolist())) > 1
    for i in range(6):
        assert same[i] == draw(scores[:1], uniforms[i : i + 1])[0]


def test_loop_samples_with_the_first_setting():
    """The first setting above is the one the self-training loop samples with (R3V: T 0.9,
    top-p 0.95, top-k 50): the defaults of ``Sampling``."""
    default = Sampling()
    assert (default.temperature, default.top_k, default.top_p) == SETTINGS[0]
