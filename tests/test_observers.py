import pytest
import torch
from torch import nn

from normquant.quant.observers import OBSERVERS, make_observer, observe_modules
from normquant.quant.primitives import QuantError


def _batches(seed=0, n=3, shape=(4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 3 for _ in range(n)]


def test_minmax_absmax_moments_match_full_data():
    xs = _batches()
    rows = torch.cat([x.reshape(-1, 6) for x in xs])  # [60, 6]
    obs = {name: make_observer(name) for name in ("minmax", "absmax", "moments")}
    for x in xs:
        for o in obs.values():
            o.update(x)
    mm, am, mo = (obs[n].compute() for n in ("minmax", "absmax", "moments"))
    assert torch.equal(mm["min"], rows.amin(0)) and torch.equal(mm["max"], rows.amax(0))
    assert torch.equal(mm["absmax"], rows.abs().amax(0)) and torch.equal(am["absmax"], rows.abs().amax(0))
    assert mo["count"].item() == 60 and mo["mean"].dtype == torch.float64
    torch.testing.assert_close(mo["mean"], rows.double().mean(0), rtol=0, atol=1e-12)  # measured 4e-16
    torch.testing.assert_close(mo["var"], rows.double().var(0, unbiased=False), rtol=0, atol=1e-12)  # measured 4e-15


def test_reservoir_is_bounded_seeded_and_exact_when_everything_fits():
    xs = _batches(n=10)  # 200 rows
    big, small, again = make_observer("percentile", size=1000), make_observer("percentile", size=32, seed=1), \
        make_observer("percentile", size=32, seed=1)
    for x in xs:
        big.update(x), small.update(x), again.update(x)
    rows = torch.cat([x.reshape(-1, 6) for x in xs])
    full = big.compute()
    assert torch.equal(full["sample"].sort(0).values, rows.sort(0).values)  # every row kept once
    q = torch.tensor([0.001, 0.999], dtype=torch.float64)
    assert torch.equal(full["quantiles"], torch.quantile(rows.double(), q, dim=0).float())
    sample = small.compute()["sample"]
    assert sample.shape == (32, 6)
    assert torch.equal(sample, again.compute()["sample"])  # same seed, same sample
    assert all((rows == r).all(1).any() for r in sample)  # sampled rows are whole input rows
    small.reset()
    small.update(xs[0])
    assert small.compute()["sample"].shape == (20, 6)


def test_reservoir_sample_is_roughly_uniform():
    obs = make_observer("percentile", size=500, seed=3)
    for i in range(20):  # rows carry their global index
        obs.update(torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None])
    idx = obs.compute()["sample"][:, 0]
    assert 0.4 < (idx < 1000).float().mean().item() < 0.6  # measured 0.49


def test_outlier_counts():
    x = torch.zeros(10, 3)
    x[:4, 1] = 7.0
    x[0, 2] = -6.5
    x[1, 0] = 6.0  # not > 6
    obs = make_observer("outliers")
    obs.update(x)
    assert obs.compute()["counts"].tolist() == [0, 4, 1] and obs.compute()["count"].item() == 10


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_non_finite_input_and_no_data_errors(name):
    obs = make_observer(name)
    with pytest.raises(ValueError, match="saw no data"):
        obs.compute()
    with pytest.raises(QuantError, match="non-finite"):
        obs.update(torch.tensor([[1.0, float("nan")]]))


def test_unknown_observer_lists_registered():
    with pytest.raises(ValueError, match="registered: absmax, minmax, moments, outliers, percentile"):
        make_observer("mse")


def test_observe_modules_inputs_outputs_and_hook_removal():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(5, 4)
    with observe_modules(model, {"0": make_observer("minmax")}, where="input") as ins, \
            observe_modules(model, {"1": [make_observer("minmax"), make_observer("absmax")]}, where="output") as outs:
        y = model(x)
    assert torch.equal(ins["0"][0].compute()["max"], x.amax(0))
    assert torch.equal(outs["1"][0].compute()["max"], y.amax(0)) and len(outs["1"]) == 2
    assert not model[0]._forward_pre_hooks and not model[1]._forward_hooks


def test_observe_modules_removes_hooks_on_exception():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(QuantError):
        with observe_modules(model, {"0": make_observer("minmax")}, where="output"):
            model(torch.full((2, 4), float("inf")))
    assert not model[0]._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with observe_modules(model, {"0": make_observer("minmax"), "1": make_observer("absmax")}):
            raise RuntimeError("boom")
    assert not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks


def test_observe_modules_bad_where_and_bad_name():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="where must be"):
        with observe_modules(model, {"0": make_observer("minmax")}, where="grad"):
            pass
    with pytest.raises(AttributeError):
        with observe_modules(model, {"0": make_observer("minmax"), "nope": make_observer("minmax")}):
            pass
    assert not model[0]._forward_pre_hooks  # the hook registered before the failure is gone
