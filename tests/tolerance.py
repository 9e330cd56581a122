"""One elementwise closeness check for every reference comparison.

|got - ref| <= rtol * |ref| + atol * std(ref), element by element. A bound relative to the largest
|value| (the earlier form) is loose wherever most values are small: it let a 1 % error through on
every element below the largest. The spread check comes first: a reference that has collapsed to a
constant would make any comparison pass.
"""

import torch


def assert_close(got, ref, rtol, atol, what="output", min_std=0.1):
    """Elementwise `|got - ref| <= rtol * |ref| + atol * ref.std()`; `ref.std() > min_std` first."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    spread = ref.std().item()
    assert spread > min_std, f"{what}: the reference's spread {spread:.3g} is too small to prove anything"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    excess = (got - ref).abs() - (rtol * ref.abs() + atol * spread)
    worst = int(excess.flatten().argmax())
    if excess.flatten()[worst] > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
        bad = int((excess > 0).sum())
        raise AssertionError(f"{what}: {bad} of {ref.numel()} elements out of tolerance; worst at {index}: "
                             f"{got[index].item():.7g} vs reference {ref[index].item():.7g} "
                             f"(rtol {rtol:g}, atol {atol:g} x std {spread:.3g})")
