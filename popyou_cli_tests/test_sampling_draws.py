"""The sampler's per-image draws (models/generate.py): on parallel threads they are still torch.multinomial's,
token for token and generator state for generator state. Expected values come from torch.multinomial itself."""
import pytest
import torch

from popyou_cli.models import generate as generate_module
from popyou_cli.models.generate import sample_top_k_top_p_


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with one thread, where the draws stay serial
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (50, 0.0), (50, 0.9), (0, 0.8)])
def test_per_image_draws_on_threads_are_multinomials(two_threads, top_k, top_p):
    torch.manual_seed(0)
    B, l, V = 3, 7, 300
    logits = torch.randn(B, l, V) * 3
    ours = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    theirs = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    masked = logits.clone()
    tokens = sample_top_k_top_p_(masked, top_k, top_p, ours)
    probs = masked.softmax(dim=-1)  # masked in place by the call, as the reference masks
    expected = torch.stack([torch.multinomial(probs[i], 1, replacement=True, generator=theirs[i]).view(l)
                            for i in range(B)])
    assert torch.equal(tokens, expected)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs))
    if top_k:
        assert (masked.isfinite().sum(-1) <= top_k).all()  # the masking did take place


def test_per_image_draws_refuse_what_multinomial_refuses(two_threads):
    logits = torch.randn(2, 3, 10)
    logits[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample_top_k_top_p_(logits, 0, 0.0, [torch.Generator(), torch.Generator()])


def _reference_masking(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The reference sampler's top-k then top-p masking (sorting the whole vocabulary), written out here."""
    logits = logits.clone()
    kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
    logits.masked_fill_(logits < kth, -torch.inf)
    srt, order = logits.sort(dim=-1, descending=False)
    remove = srt.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill_(remove.scatter(order.ndim - 1, order, remove), -torch.inf)


def _masked(logits, top_k, top_p, monkeypatch):
    """sample_top_k_top_p_'s masked logits and whether its candidates-only masking did it (False: whole-row sort)."""
    cuts = []
    real = generate_module._mask_from_candidates_
    monkeypatch.setattr(generate_module, "_mask_from_candidates_", lambda *a: cuts.append(real(*a)) or cuts[-1])
    masked = logits.clone()
    sample_top_k_top_p_(masked, top_k, top_p, torch.Generator().manual_seed(0))
    return masked, cuts


@pytest.mark.parametrize("values", ["fp32", "bf16"])  # bf16-valued logits hold many equal values
@pytest.mark.parametrize("top_k,top_p", [(900, 0.96), (40, 0.5), (2, 0.99), (40, 1e-9)])
def test_top_p_over_the_candidates_masks_as_the_reference(values, top_k, top_p, monkeypatch):
    logits = torch.randn(2, 9, 4096, generator=torch.Generator().manual_seed(top_k)) * 4
    if values == "bf16":
        logits = logits.bfloat16().float()
    masked, cuts = _masked(logits, top_k, top_p, monkeypatch)
    assert torch.equal(masked, _reference_masking(logits, top_k, top_p))
    kept = masked.isfinite().sum(-1)
    assert (kept >= 1).all() and (kept < 4096).all()
    if values == "fp32":  # no equal values: the candidates path ran, and at most k tokens stay
        assert cuts == [True] and (kept <= top_k).all()


def test_a_cut_inside_equal_values_or_ties_at_the_kth_sort_the_whole_row(monkeypatch):
    """A top-p cut between two equal logits (which one goes is the sort's choice), or ties at the k-th value (more
    than k candidates): the whole row is sorted as the reference sorts it."""
    row = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0, 0.0, -5.0, -6.0, -7.0, -8.0])
    # ascending candidates 0, 1, 3, 3, 4, 5: the cumulative mass is 0.004, 0.015, 0.096, 0.178, ...
    masked, cuts = _masked(row.view(1, 1, -1), 6, 0.87, monkeypatch)
    assert cuts == [False]
    assert torch.equal(masked, _reference_masking(row.view(1, 1, -1), 6, 0.87))
    assert masked.isfinite().sum().item() == 3  # one of the two 3s went
    tied_kth = torch.tensor([[[5.0, 4.0, 3.0, 3.0, 1.0, 0.0]]])
    masked, cuts = _masked(tied_kth, 3, 0.9, monkeypatch)
    assert cuts == [False]  # four candidates for k = 3
    assert torch.equal(masked, _reference_masking(tied_kth, 3, 0.9))
