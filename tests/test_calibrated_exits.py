"""Calibrated exits: MIE (the cost-weighted running ensemble) and last-layer Laplace per exit, each a
registered predictor that the executor, the cached evaluation, export and model folders understand.
The rules are re-stated here from their definitions, in float64."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import EarlyExitExecutor, ExportedModel, Thresholds, assign_exits, collect_outputs, \
    export_model
from timm_exits.inference.calibrated import fit_laplace, kfac_factors, laplace_posterior, mie_model
from timm_exits.model_folder import save_model_folder
from timm_exits.models import LaplaceExits, MIEModel, ZTWModel
from timm_exits.models.laplace import laplace_log_probs
from timm_exits.profile import profile_exits

COSTS = [1.0, 2.5, 3.0, 6.0, 8.0]


def _msdnet(num_blocks=5, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=4,
                              num_blocks=num_blocks).double().eval()
    with torch.no_grad():  # confident, varied exits: samples leave at several of them
        for name, p in model.named_parameters():
            if name.endswith("fc.weight"):
                p.normal_(0, 3)
    return model


def _batches(n=2, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


# --- MIE ---------------------------------------------------------------------------------------

def test_mie_on_a_hand_computed_case():
    """Two exits of cost 1 and 3: c = (1/3, 1); p_0 = (1, 0), p_1 = (0, 1) -> (1/4, 3/4) at exit 1."""
    model = MIEModel(_msdnet(), COSTS)
    p0, p1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    model.weights, model.totals = [1 / 3, 1.0], [1 / 3, 4 / 3]
    out0, history = model.combine(p0.log(), [], 0)
    out1, _ = model.combine(p1.log(), history, 1)
    assert torch.allclose(out0.exp(), p0) and torch.allclose(out1.exp(), torch.tensor([[0.25, 0.75]]))


def test_mie_equals_the_cost_weighted_running_mean_of_the_exits_probabilities():
    inner = _msdnet()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        probs = [z.softmax(-1) for z in inner.forward_exits(x)]
        online = MIEModel(inner, COSTS).forward_exits(x)
    c = [v / COSTS[-1] for v in COSTS]
    for k, out in enumerate(online):  # sum_{j<=k} c_j p_j / sum_{j<=k} c_j, written out
        expected = sum(c[j] * probs[j] for j in range(k + 1)) / sum(c[: k + 1])
        assert torch.allclose(out.exp(), expected, atol=1e-12)
    assert torch.allclose(online[0].exp(), probs[0], atol=1e-12)  # exit 0 is its own answer


def test_mie_model_takes_the_profiled_costs():
    inner = _msdnet()
    model = mie_model(inner, (3, 32, 32))
    macs = [c.macs for c in profile_exits(inner, (3, 32, 32))]
    assert model.weights == pytest.approx([m / macs[-1] for m in macs]) and model.weights[-1] == 1.0


@pytest.mark.parametrize("wrap", [lambda net: MIEModel(net, COSTS), "laplace+mie"], ids=["mie", "mie+laplace"])
def test_the_executor_on_mie_takes_the_exits_of_the_cached_evaluation(wrap):
    net = _msdnet()
    model = MIEModel(_fitted_laplace(net), COSTS) if wrap == "laplace+mie" else wrap(net)
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    cached = collect_outputs(model, [(x, torch.zeros(32, dtype=torch.long))], progress=False)
    assert not cached.raw_logits  # log-probabilities, not logits
    scores = cached.probs.max(-1).values
    ordered = scores.sort(1).values
    thresholds = ((ordered[:, 10] + ordered[:, 11]) / 2).tolist()
    exits = assign_exits(scores, torch.tensor(thresholds))
    assert len(set(exits.tolist())) >= 3  # samples leave at several exits: the state is compacted
    predictor = "mie" if wrap != "laplace+mie" else "mie+laplace"
    result = EarlyExitExecutor(model, Thresholds("tiny", 5, "maxprob", thresholds, predictor=predictor))(x)
    assert torch.equal(result.exits, exits)
    assert torch.equal(result.preds, cached.preds.gather(0, exits.view(1, -1)).squeeze(0))


def test_mie_thresholds_are_refused_on_a_plain_model_and_the_other_way_round():
    plain = _msdnet()
    with pytest.raises(ValueError, match=r"fitted on the answers of 'mie', the model gives 'exits': run "
                                         r"timm_exits\.models\.mie\.MIEModel around the network"):
        EarlyExitExecutor(plain, Thresholds("tiny", 5, "maxprob", [0.5] * 5, predictor="mie"))
    with pytest.raises(ValueError, match="fitted on the answers of 'exits', the model gives 'mie'"):
        EarlyExitExecutor(MIEModel(plain, COSTS), Thresholds("tiny", 5, "maxprob", [0.5] * 5))
    with pytest.raises(ValueError, match="fitted on the answers of 'mie', the model gives 'mie\\+laplace'"):
        EarlyExitExecutor(MIEModel(LaplaceExits(plain), COSTS), Thresholds("t", 5, "maxprob", [0.5] * 5,
                                                                           predictor="mie"))


@pytest.mark.parametrize("costs, match", [([1, 2], "expected 5 positive"), ([1, 2, 3, 2, 5], "non-decreasing"),
                                          ([0, 1, 2, 3, 4], "positive"), ("12345", "expected 5")])
def test_mie_refuses_bad_costs(costs, match):
    with pytest.raises(ValueError, match=match):
        MIEModel(_msdnet(), costs)


# --- last-layer Laplace --------------------------------------------------------------------------

def _fitted_laplace(net, **kwargs):
    return fit_laplace(net, _batches(), _batches(seed=2), prior_vars=[0.5, 2.0], temperatures=[0.5, 1.0, 2.0],
                       progress=False, num_samples=20, **kwargs)


def _restated_factors(net, batches):
    """KFAC of each exit's linear layer, from the definitions: the Hessian of the cross-entropy in the
    logits (autograd, per sample) and the outer product of [phi, 1], batch means in a running average
    with rho = min(1 - 1/(t+1), 0.95), scaled by sqrt(N)."""
    factors, n = None, 0
    for t, (x, _) in enumerate(batches):
        state, per_exit = net.forward_stem(x), []
        for i in range(net.num_exits):
            state = net.forward_stage(state, i)
            z, phi = net.forward_exit(state, i).detach(), net.forward_exit(state, i, pre_logits=True).detach()
            u = sum(torch.autograd.functional.hessian(lambda v: -v.log_softmax(-1)[0], z[s]) for s in range(len(z)))
            v = sum(torch.outer(torch.cat([phi[s], phi.new_ones(1)]), torch.cat([phi[s], phi.new_ones(1)]))
                    for s in range(len(z)))
            per_exit.append((u / len(z), v / len(z)))
        rho = min(1 - 1 / (t + 1), 0.95)
        factors = per_exit if factors is None else [(rho * a + (1 - rho) * c, rho * b + (1 - rho) * d)
                                                    for (a, b), (c, d) in zip(factors, per_exit)]
        n += len(x)
    return [(math.sqrt(n) * u, math.sqrt(n) * v) for u, v in factors]


def test_kfac_factors_equal_the_restated_definition():
    net, batches = _msdnet(), _batches(n=3, size=3)
    ours, theirs = kfac_factors(net, batches, progress=False), _restated_factors(net, batches)
    assert len(ours) == 5
    for (u, v), (u_ref, v_ref) in zip(ours, theirs):
        assert u.dtype == torch.float64 and u.shape == (4, 4)
        torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)


def test_the_posterior_adds_the_prior_and_inverts():
    u, v = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 3
    scale, cov = laplace_posterior(u, v, prior_var=0.25)  # sqrt(1 / 0.25) = 2 on the diagonal
    torch.testing.assert_close(scale @ scale.T, torch.linalg.inv(u + 2 * torch.eye(2, dtype=torch.float64)))
    torch.testing.assert_close(cov, torch.eye(3, dtype=torch.float64) / 5)


def test_the_predictive_is_the_map_softmax_as_the_variance_vanishes():
    net = _msdnet()
    laplace = fit_laplace(net, _batches(), prior_vars=[1e-14], temperatures=[0.5], progress=False)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for out, z in zip(laplace.forward_exits(x), net.forward_exits(x)):
            torch.testing.assert_close(out, (z / 0.5).log_softmax(-1), rtol=0, atol=1e-5)
    assert laplace.settings[0] == dict(prior_var=1e-14, temperature=0.5)


def test_the_predictive_equals_sampling_the_weight_posterior():
    """The logit-space form (one draw in R^C scaled by sqrt(a^T V^-1 a)) against the matrix-normal
    posterior sampled in weight space, W = W_MAP + L Z R^T (Z standard normal, R R^T = V^-1): the
    same expectation, up to Monte Carlo error."""
    net = _msdnet()
    net.set_exit(2)
    fc = net.get_classifier()
    with torch.no_grad():  # a confident MAP, which the posterior's spread softens
        fc.bias.copy_(torch.tensor([3.0, 0.0, -1.0, -2.0]))
    laplace = fit_laplace(net, _batches(n=1, size=4), prior_vars=[4.0], num_samples=20000, progress=False)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = laplace.forward_exits(x)[2].exp()
        phi = net.forward_exit(net.forward_until(x, 2), 2, pre_logits=True)
    w_map = torch.cat([fc.weight, fc.bias[:, None]], 1).detach()
    post = laplace.posteriors[2]
    scale, r = post.class_scale.double(), torch.linalg.cholesky(post.feature_cov.double())
    g = torch.Generator().manual_seed(5)
    z = torch.randn(20000, *w_map.shape, generator=g, dtype=torch.float64)
    weights = w_map + scale @ z @ r.T
    a = torch.cat([phi, phi.new_ones(len(phi), 1)], 1)
    theirs = torch.einsum("scd,bd->bsc", weights, a).softmax(-1).mean(1)
    assert (ours - theirs).abs().max() < 0.01
    assert (ours - fc(phi).softmax(-1)).abs().max() > 0.03  # the posterior's spread matters here


def test_laplace_with_mie_chooses_each_exit_on_mie_nll():
    """Exit 1's setting minimises the NLL of MIE at exit 1, exit 0's being the one chosen before it."""
    net, prior_vars, temperatures = _msdnet(), [0.5, 2.0], [0.5, 1.0, 2.0]
    fitted = _fitted_laplace(net, mie_costs=COSTS)
    factors = kfac_factors(net, _batches(), progress=False)
    x, y = map(torch.cat, zip(*_batches(seed=2)))
    with torch.no_grad():
        state = net.forward_stage(net.forward_stem(x), 0)
        z0, phi0 = net.forward_exit(state, 0), net.forward_exit(state, 0, pre_logits=True)
        state = net.forward_stage(state, 1)
        z1, phi1 = net.forward_exit(state, 1), net.forward_exit(state, 1, pre_logits=True)
    draws = fitted.draws

    def probs(z, phi, factor, prior_var, temperature):
        return laplace_log_probs(z, phi, *laplace_posterior(*factor, prior_var), draws, 1 / temperature).exp()

    chosen0 = fitted.settings[0]
    p0 = probs(z0, phi0, factors[0], chosen0["prior_var"], chosen0["temperature"])
    c0, c1 = COSTS[0] / COSTS[-1], COSTS[1] / COSTS[-1]
    nll = {(t, v): -((c0 * p0 + c1 * probs(z1, phi1, factors[1], v, t)) / (c0 + c1))[range(len(y)), y].log().mean()
           for t in temperatures for v in prior_vars}
    best_t, best_v = min(nll, key=nll.get)
    assert fitted.settings[1] == pytest.approx(dict(prior_var=best_v, temperature=best_t))


def test_laplace_refuses_what_it_cannot_fit():
    net = _msdnet()
    with pytest.raises(ValueError, match="has none: wrap the network itself"):
        LaplaceExits(ZTWModel(net))
    with pytest.raises(ValueError, match="its classifier is Identity"):
        LaplaceExits(timm.create_model("resnet18_exits", num_classes=0))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        LaplaceExits(net, num_samples=0)
    with pytest.raises(ValueError, match="need a validation loader"):
        fit_laplace(net, _batches(), prior_vars=[1.0, 2.0], progress=False)
    with pytest.raises(ValueError, match="must be positive numbers"):
        fit_laplace(net, _batches(), _batches(), temperatures=[0.0], progress=False)
    with pytest.raises(ValueError, match="training loader gave no batches"):
        fit_laplace(net, [], progress=False)
    with pytest.raises(ValueError, match="var0 must be a positive number"):
        laplace_posterior(torch.eye(2), torch.eye(2), -1.0)


def test_a_head_that_is_not_its_classifier_on_pre_logits_is_refused():
    net = _msdnet()
    original = net.forward_exit
    net.forward_exit = lambda state, i, pre_logits=False: original(state, i, pre_logits) * (1 if pre_logits else 2)
    with pytest.raises(ValueError, match="exit 0's logits to be its linear classifier applied to"):
        kfac_factors(net, _batches(), progress=False)


# --- saved and exported ----------------------------------------------------------------------------

def test_a_model_folder_rebuilds_laplace_with_mie(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=4).eval()
    model = MIEModel(fit_laplace(net, [(x.float(), y) for x, y in _batches()], num_samples=7, progress=False),
                     COSTS).eval()
    save_model_folder(model, str(tmp_path / "m"), dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.2,) * 3,
                                                       crop_pct=1.0, interpolation="bilinear"))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    assert type(rebuilt) is MIEModel and type(rebuilt.model) is LaplaceExits and rebuilt.weights == model.weights
    assert rebuilt.model.settings == model.model.settings
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x), rebuilt.forward_exits(x)))


@pytest.mark.slow  # torch.export of every piece: about half a minute on 2 shared cores
def test_an_export_of_laplace_with_mie_keeps_its_predictor_and_answers(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("msdnet_cifar_5exit", num_classes=4, num_channels=4, growth_rate=2, num_blocks=3).eval()
    model = MIEModel(fit_laplace(net, [(x.float(), y) for x, y in _batches()], num_samples=7, progress=False),
                     [1, 2, 3]).eval()
    export_model(model, torch.randn(1, 3, 32, 32), str(tmp_path / "e"), name="tiny")
    exported = ExportedModel(str(tmp_path / "e"))
    assert exported.predictor == "mie+laplace"
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(exported.forward_exits(x), model.forward_exits(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    thresholds = Thresholds("tiny", 3, "maxprob", [0.3, 0.3, 0.3], predictor="mie+laplace")
    ours, theirs = EarlyExitExecutor(exported, thresholds)(x), EarlyExitExecutor(model, thresholds)(x)
    assert torch.equal(ours.exits, theirs.exits) and torch.equal(ours.preds, theirs.preds)
    with pytest.raises(ValueError, match="fitted on the answers of 'mie'"):
        EarlyExitExecutor(exported, Thresholds("tiny", 3, "maxprob", [0.3] * 3, predictor="mie"))
