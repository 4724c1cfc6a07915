"""Zero Time Waste (Wolczyk et al., NeurIPS 2021): the geometric ensemble and the cascade re-stated from
the equations, the detach that stops head i's gradient at head i-1's logits, the backbone's head passing
through, and ZTW's two phases in the accelerate engine (each changes only what it trains, the rest
bit-identical) and in a real mmengine Runner."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import timm
import timm_exits  # noqa: F401  (registers the models)
from timm_exits.config import load_config
from timm_exits.engine import run
from timm_exits.models.ztw import GeometricEnsemble, ZTWModel
from timm_exits.train import ZTW, fit_ensembles_offline

from helpers import mm_runner, randomise_norms, tiny_data, write_config

SDN_RESNET = dict(exits="sdn", head="sdn", input_size=(3, 32, 32))


def _resnet(dtype=torch.float64):
    torch.manual_seed(0)
    return timm.create_model("resnet18_exits", num_classes=3, **SDN_RESNET).to(dtype)


def _ztw(**kwargs):
    model = ZTWModel(_resnet(), **kwargs)
    randomise_norms(model, seed=1)  # LayerNorms away from the identity
    with torch.no_grad():
        for e in model.ensembles:
            e.weight.normal_(0, 0.5)
            e.bias.normal_(0, 0.5)
    return model.eval()


def _adaptive_mixed_pool_by_hand(x, alpha, out=4):
    """ZTW's pooling restated: output cell (i, j) mixes the max and the mean of rows floor(i s / 4) ..
    ceil((i + 1) s / 4) - 1 and the same columns of a map of side s (overlapping windows, or repeats)."""
    side = x.shape[-1]
    cells = [(i * side // out, -(-(i + 1) * side // out)) for i in range(out)]
    pooled = torch.empty(*x.shape[:2], out, out, dtype=x.dtype)
    for i, (r0, r1) in enumerate(cells):
        for j, (c0, c1) in enumerate(cells):
            window = x[:, :, r0:r1, c0:c1].flatten(2)
            pooled[:, :, i, j] = alpha * window.amax(-1) + (1 - alpha) * window.mean(-1)
    return pooled


@pytest.mark.parametrize("side", [1, 2, 6, 8])
def test_ztw_head_pools_every_map_to_4x4(side):
    from timm_exits.models.heads import ZTWHead

    torch.manual_seed(0)
    head = ZTWHead(3, 5).double()
    assert head.num_features == head.fc.in_features == 3 * 16  # whatever the map size
    with torch.no_grad():
        head.pooling.alpha.fill_(1.3)  # no sigmoid or clamp, as ZTW's code
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    expected = _adaptive_mixed_pool_by_hand(x, 1.3).flatten(1) @ head.fc.weight.T + head.fc.bias
    assert torch.allclose(head(x), expected, atol=1e-12)


def test_ztw_heads_on_resnet18_and_in_the_recipe():
    # timm's ResNet-18 at 32 px: layer1..3 give 8x8x64, 4x4x128, 2x2x256 maps; ZTW's heads read 4x4 of each
    model = timm.create_model("resnet18_exits", num_classes=10, exits="sdn", head="ztw").eval()
    assert [h.num_features for h in model.exits] == [64 * 16, 128 * 16, 256 * 16]
    sdn = timm.create_model("resnet18_exits", num_classes=10, **SDN_RESNET)
    assert [h.num_features for h in sdn.exits] == [64 * 16, 128 * 16, 256 * 4]  # SDN's: the 2x2 map as it is
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-6)
    assert model.forward_exits(torch.randn(1, 3, 48, 48))[2].shape == (1, 10)  # adaptive: any input size
    config = load_config(str(Path(__file__).resolve().parents[1] / "recipes" / "ztw_cifar.py"))
    assert config["model"]["kwargs"] == dict(exits="sdn", head="ztw", input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="the 'ztw' head pools a spatial map.*use head='linear'"):
        timm_exits.add_exits(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), head="ztw")


def test_geometric_ensemble_on_random_log_probs():
    torch.manual_seed(0)
    ensemble = GeometricEnsemble(3, 5).double()
    assert torch.equal(ensemble.bias, torch.zeros(5)) and ensemble.weight.abs().max() < 0.05  # N(0, 0.01^2)
    with torch.no_grad():
        ensemble.weight.normal_()
        ensemble.bias.normal_()
    log_probs = torch.randn(4, 3, 5, dtype=torch.float64).log_softmax(-1)
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for j in range(3):  # o = mean_j(exp(w_j) log p_j) + b
        expected += torch.exp(ensemble.weight[j]) * log_probs[:, j] / 3
    assert torch.allclose(ensemble(log_probs), expected + ensemble.bias, atol=1e-12)


@pytest.mark.parametrize("ensembles", [False, True])
def test_cascade_and_ensembles_restated(ensembles):
    model = _ztw(ensembles=ensembles)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        raw = model.model.forward_exits(x)
        outputs = model.forward_exits(x)
        z, log_probs = [], []
        for i in range(3):  # the attached heads: z_i = fc_i(h_i) + W_z,i LayerNorm(z_{i-1})
            zi = raw[i]
            if i > 0:
                norm, linear = model.cascade[i - 1]
                zi = zi + F.layer_norm(z[-1], (3,), norm.weight, norm.bias, norm.eps) @ linear.weight.T
            z.append(zi)
            log_probs.append(zi.log_softmax(-1))
            ens = model.ensembles[i]
            expected = sum(ens.weight[j].exp() * log_probs[j] for j in range(i + 1)) / (i + 1) + ens.bias
            assert torch.allclose(outputs[i], expected if ensembles else zi, atol=1e-10)
        assert torch.equal(outputs[3], raw[3])  # the backbone's own head passes through


def test_without_layer_norm_the_logits_enter_as_they_are():
    model = _ztw(ensembles=False, layer_norm=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        raw, outputs = model.model.forward_exits(x), model.forward_exits(x)
    assert isinstance(model.cascade[0][0], torch.nn.Identity)
    assert torch.allclose(outputs[1], raw[1] + raw[0] @ model.cascade[0][1].weight.T, atol=1e-10)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_stops_head_gradients_at_the_previous_logits(detach):
    model = _ztw(ensembles=False, detach=detach)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.forward_exits(x)[2].sum().backward()  # head 2's output alone
    earlier = [p.grad for p in list(model.model.exits[0].parameters()) + list(model.model.exits[1].parameters())]
    if detach:
        assert all(g is None for g in earlier)
    else:
        assert all(g is not None for g in earlier) and any(g.abs().sum() > 0 for g in earlier)
    assert model.model.exits[2].fc.weight.grad.abs().sum() > 0 and model.cascade[1][1].weight.grad.abs().sum() > 0


def test_errors():
    msdnet = timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=3)
    with pytest.raises(ValueError, match="ztw train='heads' freezes the backbone.*MSDNet has no separate backbone"):
        ZTW().prepare(msdnet)
    ZTW(train="joint").prepare(msdnet)  # heads and network train together
    with pytest.raises(ValueError, match=r"ZTW option train must be 'heads', 'joint' or 'ensembles', got 'all'"):
        ZTW(train="all")
    with pytest.raises(ValueError, match="use them with train='joint', not 'heads'"):
        ZTW(gradient_equilibrium=True)
    with pytest.raises(ValueError, match="ZTW option .*exit_weights and regime keep their defaults"):
        ZTW(exit_weights="sdn")
    with pytest.raises(ValueError, match=r"ZTW has no option 'alpha'"):
        ZTW(alpha=1.0)


def test_the_loss_is_the_mean_over_the_exits():
    technique = ZTW()
    model = technique.prepare(_resnet(torch.float32)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        outputs = model.forward_exits(x)
        terms = technique.losses(outputs, y)
    expected = sum(F.cross_entropy(o, y) for o in outputs) / 4
    assert list(terms) == ["exit1", "exit2", "exit3", "exit4"]
    assert float(sum(terms.values())) == pytest.approx(float(expected), rel=1e-6)


def test_offline_fitting_is_adam_on_the_live_ensemble_outputs():
    """One epoch over one batch of everything = one Adam step on the sum of the ensembles' cross-
    entropies of the live model in eval mode (autograd on the model's own forward); nothing else moves."""
    model = _ztw()
    reference = copy.deepcopy(model).train_part("ensembles").eval()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(reference.ensembles.parameters(), lr=0.05)
    terms = [F.cross_entropy(o, y) for o in reference.forward_exits(x)[:-1]]  # the backbone's head: no ensemble
    sum(terms).backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit_ensembles_offline(model, [(x[:4], y[:4]), (x[4:], y[4:])], epochs=1, lr=0.05, batch_size=6)
    assert losses[0] == pytest.approx(sum(t.item() for t in terms) / len(terms))
    for (name, ours), theirs in zip(model.ensembles.named_parameters(), reference.ensembles.parameters()):
        assert not torch.equal(ours, before[f"ensembles.{name}"])  # it moved
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not k.startswith("ensembles."))
    assert not model.training and model.use_ensembles


def test_offline_fitting_lowers_the_loss_and_refuses_bad_input():
    model, x = _ztw(), torch.randn(16, 3, 32, 32, dtype=torch.float64)
    losses = fit_ensembles_offline(model, [(x, torch.arange(16) % 3)], epochs=30, lr=0.05, batch_size=5)
    assert len(losses) == 30 and losses[-1] < 0.9 * losses[0]
    for kwargs, message in [(dict(epochs=0), "epochs must be a positive integer, got 0"),
                            (dict(batch_size=2.5), "batch_size must be a positive integer, got 2.5"),
                            (dict(lr=0.0), "lr must be positive, got 0.0")]:
        with pytest.raises(ValueError, match=message):
            fit_ensembles_offline(model, [(x, torch.arange(16) % 3)], **kwargs)
    with pytest.raises(ValueError, match="fits the ensembles of a ZTWModel, got ResNetWithExits"):
        fit_ensembles_offline(_resnet(), [(x, torch.arange(16) % 3)])
    with pytest.raises(ValueError, match="a loader with at least one batch"):
        fit_ensembles_offline(model, [])


def _phases():
    return ("phases = [dict(name='heads', technique=dict(type='ZTW', train='heads')),\n"
            "          dict(name='ensembles', technique=dict(type='ZTW', train='ensembles'),\n"
            "               optimizer=dict(opt='adam', lr=1e-2, weight_decay=0.0))]\n")


def test_engine_phase_a_then_b_change_only_what_they_train(tmp_path):
    from accelerate.utils import set_seed

    data = tiny_data(tmp_path / "data")
    model = f"dict(name='resnet18_exits', kwargs={SDN_RESNET!r})"
    config = load_config(str(write_config(tmp_path / "c.py", data, model,
                                          "tracker = None\ntrain = dict(epochs=1)\n" + _phases())),
                         output_dir=str(tmp_path / "out"))
    run(config)
    set_seed(0)  # the engine's initial weights: the network, then the cascade and ensembles
    start = ZTWModel(timm.create_model("resnet18_exits", num_classes=3, **SDN_RESNET)).state_dict()
    heads, ensembles = (load_file(tmp_path / "out" / name / "model.safetensors") for name in ("heads", "ensembles"))
    assert set(heads) == set(start) == set(ensembles)
    backbone = [k for k in start if k.startswith("model.backbone.")]
    trained_a = [k for k in start if k.startswith(("model.exits.", "cascade.")) and k.endswith("weight")]
    assert backbone and trained_a
    # phase A: the backbone (batch-norm statistics too: eval mode) and the ensembles as they were
    assert all(torch.equal(start[k], heads[k]) for k in backbone if not k.endswith("num_batches_tracked"))
    assert all(torch.equal(start[k], heads[k]) for k in start if k.startswith("ensembles."))
    assert all(not torch.equal(start[k], heads[k]) for k in trained_a)
    # phase B: everything but the ensembles as phase A left it, the ensembles changed
    assert all(torch.equal(heads[k], ensembles[k]) for k in start if not k.startswith("ensembles."))
    assert all(not torch.equal(heads[k], ensembles[k]) for k in start if k.startswith("ensembles."))


@pytest.mark.slow
def test_mmengine_runner_trains_the_heads_on_the_frozen_backbone(tmp_path):
    runner = mm_runner(tmp_path, dict(model="resnet18_exits", model_kwargs=dict(num_classes=3, **SDN_RESNET),
                                      technique=dict(type="ZTW", train="heads")), iters=2)
    model = runner.model.model
    assert isinstance(model, ZTWModel) and not model.use_ensembles
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner.train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("model.backbone.", "ensembles.")))
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("cascade.") and k.endswith("weight"))
