"""Fourier features: shapes/dtypes, reference formulas, E[y²]=1 (mp), buffers, separation."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tricks.fourier import (
    CARD,
    KINDS,
    FourierFeatures,
    fourier_encode,
    gaussian_frequencies,
    log_spaced_frequencies,
    random_phases,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64], ids=str)
def test_shape_and_dtype(kind: str, dtype: torch.dtype) -> None:
    scalar = FourierFeatures(1, 8, kind=kind, generator=_gen())
    assert scalar.out_features == 8
    x = torch.arange(5).to(dtype)
    want = dtype if dtype.is_floating_point else torch.float32
    for inp in (x, x.unsqueeze(1)):
        y = scalar(inp)
        assert y.shape == (5, 8) and y.dtype == want
        assert bool(torch.isfinite(y.float()).all())
    multi = FourierFeatures(3, 12, kind=kind, generator=_gen())
    y = multi(torch.ones(4, 3, dtype=dtype))
    assert y.shape == (4, 12) and y.dtype == want


def test_log_matches_nerf_positional_encoding() -> None:
    L = 6
    f = log_spaced_frequencies(L, 2 ** (L - 1) * math.pi)
    torch.testing.assert_close(f, (2.0 ** torch.arange(L)) * math.pi)
    x = torch.linspace(-1, 1, 7, dtype=torch.float64).view(-1, 1).expand(-1, 2) * torch.tensor([1.0, 0.3])
    y = fourier_encode(x, f, "log")
    angle = torch.stack([x[:, d : d + 1] * f.double() for d in range(2)], 1).flatten(1)  # (N, D·L)
    torch.testing.assert_close(y, torch.cat([angle.sin(), angle.cos()], 1))
    assert y.shape == (7, 2 * 2 * L)
    assert log_spaced_frequencies(1, 3.0).tolist() == [3.0]


def test_gaussian_matches_k_diffusion() -> None:
    w = gaussian_frequencies(2, 5, 3.0, _gen(1))
    assert w.shape == (5, 2)
    x = torch.randn(9, 2, generator=_gen(2), dtype=torch.float64)
    # k-diffusion FourierFeatures.forward: f = 2π x @ W.T; cat([f.cos(), f.sin()])
    f = 2 * math.pi * x @ w.double().T
    torch.testing.assert_close(fourier_encode(x, w, "gaussian"), torch.cat([f.cos(), f.sin()], -1))
    big = gaussian_frequencies(1, 20000, 3.0, _gen(3))
    assert float(big.std()) == pytest.approx(3.0, rel=0.03)


def test_mp_matches_edm2() -> None:
    freqs, phases = gaussian_frequencies(1, 16, 2.0, _gen(4)).squeeze(1), random_phases(16, _gen(5))
    x = torch.randn(11, generator=_gen(6), dtype=torch.float64)
    # EDM2 MPFourier stores 2π·f and 2π·φ: y = x.ger(freqs) + phases; cos(y) · √2
    ref = (x.ger(2 * math.pi * freqs.double()) + 2 * math.pi * phases.double()).cos() * math.sqrt(2)
    torch.testing.assert_close(fourier_encode(x, freqs, "mp", phases), ref)


@pytest.mark.parametrize("in_features", [1, 3])
def test_mp_is_magnitude_preserving(in_features: int) -> None:
    layer = FourierFeatures(in_features, 4096, kind="mp", scale=1.0, generator=_gen(7))
    x = torch.randn(512, in_features, generator=_gen(8)) * 3
    y = layer(x.squeeze(1) if in_features == 1 else x)
    assert float(y.double().square().mean()) == pytest.approx(1.0, abs=0.03)
    # per input, over features, too (includes x = 0, where only the phases vary)
    per_input = layer(torch.zeros(1, in_features)).double().square().mean()
    assert float(per_input) == pytest.approx(1.0, abs=0.06)
    # the unscaled cos would have E[y²] = 1/2
    assert float((y / math.sqrt(2)).double().square().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_frequencies_are_buffers_unless_learnable(kind: str) -> None:
    fixed = FourierFeatures(2, 8, kind=kind, generator=_gen())
    names = {"frequencies"} | ({"phases"} if kind == "mp" else set())
    assert names <= set(fixed.state_dict())
    assert list(fixed.parameters()) == []
    before = {k: v.clone() for k, v in fixed.state_dict().items()}
    head = torch.nn.Linear(8, 1)
    model = torch.nn.Sequential(fixed, head)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    for k, v in fixed.state_dict().items():
        assert torch.equal(v, before[k]), k

    learn = FourierFeatures(2, 8, kind=kind, learnable=True, generator=_gen())
    assert {n for n, _ in learn.named_parameters()} == names
    x = torch.randn(4, 2, generator=_gen(1))
    # (not y.square().sum(): sin² + cos² = 1 has zero gradient)
    (learn(x) * torch.arange(8.0)).sum().backward()
    for n, p in learn.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
    # same draw whether learnable or not
    for n in names:
        torch.testing.assert_close(getattr(learn, n).detach(), getattr(fixed, n))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_function_agreement(kind: str) -> None:
    a = FourierFeatures(1, 16, kind=kind, scale=5.0, generator=_gen(1))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = FourierFeatures(1, 16, kind=kind, scale=5.0, generator=_gen(2))
    x = torch.linspace(0, 1, 10)
    if kind != "log":
        assert not torch.equal(a(x), b(x))
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert torch.equal(a(x), b(x))
    assert torch.equal(a(x), fourier_encode(x, a.frequencies, kind, a.phases))


def test_determinism_given_generator() -> None:
    for kind in ("gaussian", "mp"):
        a = FourierFeatures(2, 8, kind=kind, generator=_gen(3))
        b = FourierFeatures(2, 8, kind=kind, generator=_gen(3))
        c = FourierFeatures(2, 8, kind=kind, generator=_gen(4))
        assert torch.equal(a.frequencies, b.frequencies) and not torch.equal(a.frequencies, c.frequencies)
    assert torch.equal(
        FourierFeatures(1, 8, kind="log", scale=10.0).frequencies,
        FourierFeatures(1, 8, kind="log", scale=10.0).frequencies,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_separates_inputs_closer_than_the_raw_resolution(kind: str) -> None:
    # timesteps t ∈ [0, 1000) rescaled to [0, 1): in bf16 (spacing 2^-8 near 0.5) t = 500 and
    # t = 501 become the same raw input, but their Fourier features (computed in float32 from
    # the rescaled value, then stored in bf16) differ by O(1)
    t = torch.tensor([500.0, 501.0])
    raw = (t / 1000).to(torch.bfloat16)
    assert raw[0] == raw[1]
    scale = {"log": 2**11 * math.pi, "gaussian": 200.0, "mp": 200.0}[kind]
    layer = FourierFeatures(1, 64, kind=kind, scale=scale, generator=_gen(5))
    y = layer(t / 1000).to(torch.bfloat16)
    assert float((y[0] - y[1]).abs().max()) > 0.5
    # the raw difference is 1e-3; high frequencies amplify it by orders of magnitude
    gap = (layer(torch.tensor([0.5])) - layer(torch.tensor([0.501]))).abs().max()
    assert float(gap) > 100 * 1e-3
    # while a low-frequency encoding does not
    low = FourierFeatures(1, 64, kind=kind, scale=0.01, generator=_gen(5))
    assert float((low(torch.tensor([0.5])) - low(torch.tensor([0.501]))).abs().max()) < 1e-3


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="num_features: 7"):
        FourierFeatures(1, 7)
    with pytest.raises(ValueError, match="num_features: 0"):
        FourierFeatures(1, 0)
    with pytest.raises(ValueError, match="multiple of 6"):
        FourierFeatures(3, 8, kind="log")
    with pytest.raises(ValueError, match="kind: 'fourier'"):
        FourierFeatures(1, 8, kind="fourier")
    with pytest.raises(ValueError, match="scale: 0"):
        FourierFeatures(1, 8, scale=0.0)
    with pytest.raises(ValueError, match="scale: inf"):
        FourierFeatures(1, 8, scale=float("inf"))
    with pytest.raises(ValueError, match="in_features: 0"):
        FourierFeatures(0, 8)
    with pytest.raises(ValueError, match="learnable"):
        FourierFeatures(1, 8, learnable=1)  # type: ignore[arg-type]
    layer = FourierFeatures(2, 8)
    with pytest.raises(ValueError, match=r"x: shape \(4,\)"):
        layer(torch.zeros(4))
    with pytest.raises(ValueError, match=r"x: shape \(4, 3\)"):
        layer(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x: shape"):
        fourier_encode(torch.zeros(2, 2, 2), torch.ones(3), "log")
    with pytest.raises(ValueError, match="phases"):
        fourier_encode(torch.zeros(2), torch.ones(4), "mp")
    with pytest.raises(ValueError, match="frequencies"):
        fourier_encode(torch.zeros(2, 2), torch.ones(4, 3), "gaussian")
    with pytest.raises(ValueError, match="num_frequencies"):
        log_spaced_frequencies(0, 1.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_frequencies(1, 4, -1.0)


def test_card() -> None:
    assert CARD.name == "fourier_features" and CARD.role == "task"
    p = CARD.resolve(CARD.tiny_setting)
    FourierFeatures(1, p["num_features"], kind=p["kind"], scale=p["scale"])
    assert CARD.resolve({})["kind"] == "mp"
    with pytest.raises(ValueError, match="did you mean"):
        CARD.resolve({"kind": "gausian"})
    with pytest.raises(ValueError, match="scale"):
        CARD.resolve({"scale": 0.0})
