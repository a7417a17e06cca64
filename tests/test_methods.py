"""The method registry, the exact selection rule, the counter-based RNG and `merge_tensors`."""
from __future__ import annotations

import pytest
import torch

import seme
from mergekit_reference import mergekit_merge
from seme.errors import SemeError
from seme.methods import registry, rng
from seme.methods.inputs import Inputs
from seme.methods.selection import rank_interval_mask, rank_positions, top_k_mask

ALL_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce", "slerp", "nuslerp",
               "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
               "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
# Methods of later mergekit releases than the one installed here, with their parameters' defaults.
NEWER_THAN_MERGEKIT_0_1_5 = {"lrp": {"density": 0.7, "weight": 1.0}}


def test_registry_has_every_method_and_mergekit_parameter_names():
    from mergekit.merge_methods import registry as mk

    assert set(registry.names()) == ALL_METHODS | set(NEWER_THAN_MERGEKIT_0_1_5) | {"seme"}
    for name in ALL_METHODS:
        ours = {p.name: (p.default if not p.required else "required") for p in registry.get(name).params}
        theirs = {p.name: (p.default if not p.required else "required") for p in mk.get(name).spec.parameters}
        assert ours == theirs, name
    for name, theirs in NEWER_THAN_MERGEKIT_0_1_5.items():
        assert {p.name: p.default for p in registry.get(name).params} == theirs, name


def test_philox_known_answer():
    # Random123's Philox4x32-10 known-answer vector for counter 0, key 0.
    assert rng.philox4x32(0, torch.tensor([0]))[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_uniform_is_positional_and_uniform():
    key = rng.stream_key(1, "w", 2)
    u = rng.uniform(key, 1 << 16)
    assert torch.equal(rng.uniform(key, 10), u[:10])  # a draw depends on its index only
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert key != rng.stream_key(1, "w", 3) != rng.stream_key(2, "w", 2)


def test_selection_tie_rule_is_by_position():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert top_k_mask(x, 2).tolist() == [False, False, True, False, True]  # later equal elements rank higher
    assert rank_interval_mask(x, 1, 3).tolist() == [True, False, False, True, False]
    assert rank_positions(x).tolist() == [2, 0, 3, 1, 4]


@pytest.mark.parametrize("k", [1, 5, 99, 100])
def test_top_k_matches_sorting(k):
    torch.manual_seed(k)
    x = torch.randint(0, 7, (100,)).float()  # many ties
    order = sorted(range(100), key=lambda i: (float(x[i]), i))
    expected = torch.zeros(100, dtype=torch.bool)
    expected[order[100 - k:]] = True
    assert torch.equal(top_k_mask(x, k), expected)


def test_merge_tensors_matches_mergekit_in_memory():
    torch.manual_seed(0)
    base = torch.randn(40, 30)
    xs = [base + 0.1 * torch.randn(40, 30) for _ in range(3)]
    ours = seme.merge_tensors("ties", xs, base=base, weight=[1.0, 0.5, 0.7], density=0.4)
    torch.testing.assert_close(ours, mergekit_merge("ties", xs, base=base, weight=[1.0, 0.5, 0.7], density=0.4))
    half = seme.merge_tensors("ties", [x.bfloat16() for x in xs], base=base.bfloat16(), weight=1.0, density=0.4)
    assert half.dtype == torch.bfloat16


def test_merge_tensors_errors():
    a = torch.zeros(3)
    with pytest.raises(SemeError, match="unknown merge method 'tie' \\(did you mean 'ties'\\?\\)"):
        seme.merge_tensors("tie", [a], base=a)
    with pytest.raises(SemeError, match="needs a base_model"):
        seme.merge_tensors("ties", [a, a], weight=1.0)
    with pytest.raises(SemeError, match="needs parameter 'weight'"):
        seme.merge_tensors("ties", [a], base=a)
    with pytest.raises(SemeError, match="different shapes"):
        seme.merge_tensors("linear", [a, torch.zeros(4)], weight=1.0)
    with pytest.raises(SemeError, match="needs 2 values"):
        seme.merge_tensors("task_arithmetic", [a, a], base=a, weight=[1.0, 2.0, 3.0])
    with pytest.raises(SemeError, match="method 'seme' aligns whole models .* method 'sce'"):
        seme.merge_tensors("seme", [a, a], base=a)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, (1 << 20) + 7])  # past 10^6 elements mergekit samples; seme does not
def test_arcee_fusion_threshold_is_the_exact_quartile_rule(n):
    from seme.methods.arcee_fusion import quartile_threshold

    torch.manual_seed(n)
    scores = torch.randint(0, 50, (n,)).float() / 7  # many ties
    ordered = scores.sort().values
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    assert float(quartile_threshold(scores)) == float(median + 1.5 * (q3 - q1))


def test_multislerp_of_balancing_opposites_is_one_line_error():
    a = torch.randn(4, 5)
    with pytest.raises(SemeError, match="weighted sum of the directions of 'w' is zero"):
        registry.get("multislerp").fn(Inputs((a, -a, a * 0 + 1e-12), None, "w"),
                                      {"weight": [0.5, 0.5, 0.0], "normalize_weights": True, "eps": 1e-8})
    # two opposite tensors fall back to the linear mix, as in mergekit
    out = registry.get("multislerp").fn(Inputs((a, -a), None, "w"),
                                        {"weight": [0.5, 0.5], "normalize_weights": True, "eps": 1e-8})
    assert torch.allclose(out, torch.zeros_like(a))


def test_new_methods_match_mergekit_in_memory():
    torch.manual_seed(1)
    base = torch.randn(30, 20)
    xs = [base + 0.1 * torch.randn(30, 20) for _ in range(3)]
    for method, params, inputs, with_base in [
        ("multislerp", dict(weight=[0.2, 0.5, 0.3]), xs, True),
        ("multislerp", dict(weight=[1.0, 2.0, 1.0], normalize_weights=False), xs, False),
        ("karcher", dict(max_iter=5), xs, False),
        ("nearswap", dict(t=0.05), xs[:1], True),
        ("arcee_fusion", {}, xs[:1], True),
        # sparse changes, so that elements changed by one, several and no model all occur
        *[(m, params, [base + (x - base) * (torch.rand(30, 20) < 0.4) for x in xs], True)
          for m, params in [("ram", {}), ("ram", dict(epsilon=0.05)), ("ramplus_tl", {}),
                            ("ramplus_tl", dict(r=0.5, alpha=1.0, epsilon=0.02))]],
    ]:
        kwargs = dict(base=base) if with_base else {}
        ours = seme.merge_tensors(method, inputs, **kwargs, **params)
        torch.testing.assert_close(ours, mergekit_merge(method, inputs, **kwargs, **params), msg=method)


def test_ramplus_of_scalar_tensors():
    # a 0-d parameter (a model's scalar scale) raised IndexError in the reference's per-model counts
    one, two, three = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    p = registry.bind(registry.get("ramplus_tl"), {"r": 0.5}, 3, 0, "test")
    assert registry.get("ramplus_tl").fn(Inputs((one, two, three), 0, "w"), p) == 2.5  # 1 + (1 + 2) / 2: shared
    p = registry.bind(registry.get("ramplus_tl"), {"r": 0.5}, 2, 0, "test")
    assert registry.get("ramplus_tl").fn(Inputs((one, three), 0, "w"), p) == 3.0  # unique, no shared: scale 1


def mergekit_lrp(tensors, base, weight, density):
    """mergekit's `lrp` (mergekit/merge_methods/lrp.py, later than the installed 0.1.5), transcribed
    with its magnitude importance: per model the argsort's k = max(1, int(density · n)) largest |δ|,
    each masked δ added with weight / Σ weight; zeros for a missing base."""
    base = torch.zeros_like(tensors[0]) if base is None else base
    merged = torch.zeros_like(base)
    for x, w in zip(tensors, weight):
        delta = x - base
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        if density >= 1:
            mask[:] = True
        elif density > 0:
            mask[torch.argsort(delta.abs().flatten(), descending=True)[:max(1, int(density * delta.numel()))]] = True
        merged += w / sum(weight) * delta * mask.reshape(delta.shape)
    return base + merged


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("with_base", [True, False])
def test_lrp_matches_mergekits(density, with_base):
    torch.manual_seed(int(density * 100))
    base = torch.randn(30, 20, dtype=torch.float64)
    xs = [base + 0.1 * torch.randn(30, 20, dtype=torch.float64) for _ in range(3)]
    weight = [0.5, 1.0, -0.3]
    kwargs = dict(base=base) if with_base else {}
    ours = seme.merge_tensors("lrp", xs, **kwargs, weight=weight, density=density)
    torch.testing.assert_close(ours, mergekit_lrp(xs, base if with_base else None, weight, density))
    default = seme.merge_tensors("lrp", xs, **kwargs)  # density 0.7, weight 1 each
    torch.testing.assert_close(default, mergekit_lrp(xs, base if with_base else None, [1.0] * 3, 0.7))


def test_lrp_errors():
    a = torch.zeros(3)
    with pytest.raises(SemeError, match="needs at least 1 models besides the base"):
        seme.merge_tensors("lrp", [], base=a)
    with pytest.raises(SemeError, match="must be a number"):  # density is one for all models, as in mergekit
        seme.merge_tensors("lrp", [a, a], base=a, density=[0.5, 0.5])


def test_della_takes_densities_0_and_1_whatever_epsilon_as_mergekit_does():
    """A model at density 0 is dropped and one at 1 kept whole: no draws, so epsilon is not checked."""
    torch.manual_seed(2)
    base = torch.randn(30, 20)
    xs = [base + 0.1 * torch.randn(30, 20) for _ in range(2)]
    params = dict(weight=[0.5, 1.0], density=[0.0, 1.0], epsilon=0.3)
    ours = seme.merge_tensors("della", xs, base=base, **params)
    torch.testing.assert_close(ours, mergekit_merge("della", xs, base=base, **params))
    torch.testing.assert_close(ours, xs[1])
