"""export.quality: KL and top-1 agreement against a float64 computation written out by hand."""

import math

import pytest
import torch

from kindred.errors import KindredError
from kindred.export.quality import agreement


def _kl_by_hand(p_logits, q_logits):
    total = 0.0
    for lp, lq in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
        zp = math.log(sum(math.exp(v) for v in lp))
        zq = math.log(sum(math.exp(v) for v in lq))
        total += sum(math.exp(a - zp) * ((a - zp) - (b - zq)) for a, b in zip(lp, lq, strict=True))
    return total / len(p_logits)


def test_agreement_matches_the_definition_on_random_logits():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 7, 11, generator=g)
    cand = ref + 0.3 * torch.randn(3, 7, 11, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    got = agreement(ref, cand, mask)
    r, c = ref[mask], cand[mask]
    assert got.tokens == int(mask.sum())
    assert got.kl == pytest.approx(_kl_by_hand(r, c), rel=1e-9)
    assert got.top1 == pytest.approx((r.argmax(-1) == c.argmax(-1)).double().mean().item())
    assert got.kl > 0 and 0 < got.top1 < 1


def test_identical_logits_agree_fully():
    ref = torch.randn(5, 9)
    got = agreement(ref, ref.clone())
    assert got.kl == pytest.approx(0, abs=1e-12) and got.top1 == 1.0


@pytest.mark.parametrize(
    ("cand", "mask", "needle"),
    [
        (torch.zeros(4, 6), None, "candidate"),
        (torch.zeros(4, 5), torch.zeros(3, dtype=torch.bool), "mask"),
        (torch.zeros(4, 5), torch.zeros(4, dtype=torch.bool), "no position"),
        (torch.full((4, 5), float("nan")), None, "NaN"),
    ],
)
def test_bad_input_names_the_argument(cand, mask, needle):
    with pytest.raises(KindredError, match=needle):
        agreement(torch.zeros(4, 5), cand, mask)
