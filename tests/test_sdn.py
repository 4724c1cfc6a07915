"""SDN (Kaya et al., ICML 2019) and PABEE's loss preset: the tau warm-up and the depth weights against
hand values, SDN's head against a re-statement of its equations, placement by cost fraction on a real
timm ResNet against costs counted here, and the config errors."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import add_exits
from timm_exits.config import ConfigError, resolve_config
from timm_exits.models.exits import SDN_COST_FRACTIONS, exits_by_cost
from timm_exits.models.heads import SDNHead
from timm_exits.train import HDKD, CrossEntropy, PlainTrainer
from timm_exits.train.schedules import ExitWeights, pabee_weights, sdn_weights

C = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


def test_sdn_tau_hand_values():
    first = sdn_weights(7, epoch=0, epochs=100)  # e = 1 of E = 100
    assert first == pytest.approx([0.0115, 0.013, 0.0145, 0.016, 0.0175, 0.019, 1.0])
    assert sdn_weights(7, 92, 100)[0] == pytest.approx(0.1495)  # e = 93: 0.01 + 93 * 0.0015
    assert sdn_weights(7, 93, 100)[0] == pytest.approx(0.15)  # e = 94: 0.151, capped at C_1
    assert sdn_weights(7, 99, 100) == pytest.approx([*C, 1.0])  # every cap reached by the last epoch
    for epoch in range(100):  # the rule, re-stated
        e = epoch + 1
        assert sdn_weights(7, epoch, 100) == pytest.approx([min(c, 0.01 + e * c / 100) for c in C] + [1.0])
    # caps: SDN's six by default, spread up to 0.9 for other counts, or given
    assert sdn_weights(4, 99, 100) == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert sdn_weights(3, 0, 10, caps=[0.2, 0.5]) == pytest.approx([0.03, 0.06, 1.0])
    with pytest.raises(ValueError, match="2 caps for 3 internal classifiers"):
        sdn_weights(4, 0, 10, caps=[0.2, 0.5])
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 10\)"):
        sdn_weights(4, 10, 10)


def test_pabee_weights_by_hand():
    assert pabee_weights(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])  # (i + 1) / (1 + 2 + 3 + 4)
    assert ExitWeights("pabee")(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_the_technique_weights_the_exits_by_the_schedule_at_the_trainers_epoch():
    torch.manual_seed(0)
    logits, y = [torch.randn(5, 4) for _ in range(3)], torch.randint(0, 4, (5,))
    ce = [F.cross_entropy(z, y) for z in logits]
    pabee = CrossEntropy(exit_weights="pabee").losses(logits, y)
    assert [float(t) for t in pabee.values()] == pytest.approx([w * float(c) for w, c in zip([1 / 6, 2 / 6, 3 / 6], ce)])
    sdn = CrossEntropy(exit_weights=dict(schedule="sdn", caps=[0.3, 0.6]))
    with pytest.raises(ValueError, match="change with the epoch: give the trainer"):
        sdn.losses(logits, y)
    model = torch.nn.Linear(4, 4)  # the loop's model: the losses read only its epoch
    loop = PlainTrainer(model, sdn, torch.optim.SGD(model.parameters(), lr=0.1), epochs=4)
    for epoch, expected in ((0, [0.01 + 0.3 / 4, 0.01 + 0.6 / 4, 1.0]), (3, [0.3, 0.6, 1.0])):
        loop.current_epoch = epoch
        terms = sdn.losses(logits, y, loop)
        assert [float(t) for t in terms.values()] == pytest.approx([w * float(c) for w, c in zip(expected, ce)])


@pytest.mark.parametrize("spec, message", [
    ("sdm", r"one of \('sdn', 'pabee'\), got 'sdm'"),
    (dict(schedule="pabee"), r"dict\(schedule='sdn', caps=\[...\]\)"),
    (dict(schedule="sdn", caps=[0.5, 1.5]), r"cost fractions in \(0, 1\]"),
    ([1, "two"], "a list of numbers"),
])
def test_bad_schedules_are_config_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        ExitWeights(spec)
    with pytest.raises(ConfigError, match="technique: .*" + message):
        resolve_config(dict(model=dict(name="x"), technique=dict(exit_weights=spec)))
    with pytest.raises(ConfigError, match="technique: CrossEntropy option regime must be 'joint', 'heads_only' or "
                                          "'backbone', got 'frozen'"):
        resolve_config(dict(model=dict(name="x"), technique=dict(regime="frozen")))
    with pytest.raises(ValueError, match="HDKD has no option 'exit_weights'"):
        HDKD(exit_weights="sdn")


def _mixed_pool_by_hand(x: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """alpha * max + (1 - alpha) * mean over k x k windows, stride k (loops over the windows)."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, h // k, w // k, dtype=x.dtype)
    for i in range(h // k):
        for j in range(w // k):
            window = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(b, c, -1)
            out[:, :, i, j] = alpha * window.amax(-1) + (1 - alpha) * window.mean(-1)
    return out


@pytest.mark.parametrize("side, kernel, out", [(8, 2, 4), (16, 4, 4), (10, 2, 5), (4, 1, 4), (2, None, 2)])
def test_sdn_head_against_its_equations(side, kernel, out):
    torch.manual_seed(0)
    head = SDNHead(3, 5, (side, side)).double()
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    if kernel is None:  # a map smaller than 4: no pooling, no alpha
        assert not any(n.endswith("alpha") for n, _ in head.named_parameters())
        pooled = x
    else:
        alpha = head.pooling.alpha.item()
        assert 0 < alpha < 1  # U(0, 1)
        pooled = _mixed_pool_by_hand(x, kernel, alpha)
    assert head.num_features == 3 * out * out and head.fc.in_features == 3 * out * out
    expected = pooled.reshape(2, -1) @ head.fc.weight.T + head.fc.bias  # flatten channel-major, then linear
    assert torch.allclose(head(x), expected, atol=1e-12)
    if kernel is not None:  # no sigmoid or clamp: alpha outside [0, 1] is used as it is
        with torch.no_grad():
            head.pooling.alpha.fill_(1.7)
        expected = _mixed_pool_by_hand(x, kernel, 1.7).reshape(2, -1) @ head.fc.weight.T + head.fc.bias
        assert torch.allclose(head(x), expected, atol=1e-12)
    with pytest.raises(ValueError, match=f"built for {side}x{side} maps, got {side + 4}x{side + 4}"):
        head(torch.randn(2, 3, side + 4, side + 4, dtype=torch.float64))


def test_sdn_heads_on_a_real_resnet_and_what_is_refused():
    model = add_exits("resnet18", exits=[0, 1, 2], head="sdn", input_size=(3, 32, 32), num_classes=10).eval()
    # timm's ResNet-18 at 32 px: layer1..3 give 8x8x64, 4x4x128, 2x2x256 maps
    assert [type(h.pooling).__name__ for h in model.exits] == ["MixedPool", "MixedPool", "Identity"]
    assert [h.num_features for h in model.exits] == [64 * 16, 128 * 16, 256 * 4]
    assert [o.shape for o in model.forward_exits(torch.randn(2, 3, 32, 32))] == [torch.Size([2, 10])] * 4
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="'sdn' head pools a spatial map.*nlc tokens: use head='linear'"):
        add_exits(vit, head="sdn")


def _unit_costs_by_hand(backbone, size=32):
    """Cumulative MACs after the stem + layer1, + layer2, ... of a timm ResNet (FLOPs / 2), counted here."""
    x, costs, total = torch.randn(1, 3, size, size), [], 0
    backbone.eval()
    steps = [lambda t: backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(t))))]
    steps += [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    with torch.no_grad():
        for i, step in enumerate(steps):
            with FlopCounterMode(display=False) as counter:
                x = step(x)
            total += counter.get_total_flops() // 2
            if i:
                costs.append(total)
    return costs


def test_placement_by_cost_fraction_on_a_real_resnet():
    backbone = timm.create_model("resnet18", num_classes=10)
    costs = _unit_costs_by_hand(backbone)
    expected = sorted({min(range(3), key=lambda u: abs(costs[u] - p * costs[-1])) for p in SDN_COST_FRACTIONS})
    assert exits_by_cost(backbone, SDN_COST_FRACTIONS, (3, 32, 32)) == expected == [0, 1, 2]  # duplicates merged
    assert exits_by_cost(backbone, [0.01, 0.02], (3, 32, 32)) == [0]
    # layer2 ends nearest 1/2 of the cost, layer3 nearest 3/4 (ResNet stages cost about the same)
    half = min(range(3), key=lambda u: abs(costs[u] - 0.5 * costs[-1]))
    assert exits_by_cost(backbone, [0.5], (3, 32, 32)) == [half] == [1]
    model = add_exits(backbone, exits="sdn", head="sdn", input_size=(3, 32, 32))
    assert model.exit_after == expected and model.num_exits == 4
    same = add_exits(timm.create_model("resnet18", num_classes=10), exits_at_cost=[0.15, 0.5], input_size=(3, 32, 32))
    assert same.exit_after == [0, 1]
    registered = timm.create_model("resnet18_exits", exits="sdn", head="sdn", input_size=(3, 32, 32), num_classes=10)
    assert registered.exit_after == expected and registered.pretrained_cfg["input_size"] == (3, 32, 32)


def test_placement_errors():
    backbone = timm.create_model("resnet18", num_classes=10)
    for bad in ([0.0, 0.5], [1.0], [], [0.5, 2]):
        with pytest.raises(ValueError, match=r"exit cost fractions must be numbers in \(0, 1\)"):
            add_exits(backbone, exits_at_cost=bad, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="exits must be unit indices or 'sdn'"):
        add_exits(backbone, exits="msdnet")
    with pytest.raises(ValueError, match="not both"):
        add_exits(backbone, exits=[0], exits_at_cost=[0.5])
