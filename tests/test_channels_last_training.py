"""MSDNet's channels-last training path computes the same function as the straightforward
channels-first one: outputs, gradients (against autograd through timm's own modules), running
statistics and the weights after optimizer steps, in float64 so that only real differences show."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct

from timm_exits import MSDNet
from timm_exits.models.channels_last_norm import BatchNormReLU2d, shared_input_conv_bn_relu

CL = torch.channels_last


def _assert_grads_close(got: dict, expected: dict) -> None:
    # a unit no output depends on (finer scales of the last layer) has no gradient in the plain step;
    # merged with a live unit's bottleneck it gets zeros
    assert expected.keys() <= got.keys() and all(not got[n].any() for n in got.keys() - expected.keys())
    scale = max(g.abs().max() for g in expected.values())  # some grads are 0 analytically (bias before BN)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-10 * scale, msg=name)


def _train_step(model, x, y, optimizer):
    optimizer.zero_grad()
    outputs = model.forward_exits(x)
    sum(F.cross_entropy(z, y) for z in outputs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return outputs, grads


SMALL = dict(num_blocks=3, base=2, step=1, num_channels=4, growth_rate=4, head_channels=8, num_classes=10)
CASES = [
    dict(stem_type="cifar", gr_factor="1-2-4", bn_factor="1-2-4", img_size=32),   # 3 scales, merged 1x1s
    dict(stem_type="cifar", gr_factor="1-2-4", bn_factor="1-2-4", img_size=32, bottleneck=False),
    dict(stem_type="cifar", gr_factor="1-2-4", bn_factor="1-2-4", img_size=32, prune="min"),
    dict(stem_type="imagenet", img_size=160, num_blocks=2),  # 4 scales, biased stem conv, max-pool
]


@pytest.mark.parametrize("kwargs", CASES)
def test_channels_last_training_equals_the_straightforward_step(kwargs):
    torch.manual_seed(0)
    plain = MSDNet(**{**SMALL, **kwargs}, channels_last_training=False).double().train()
    size = kwargs["img_size"]
    fast = copy.deepcopy(plain)
    fast.channels_last_training = True
    x, y = torch.randn(4, 3, size, size, dtype=torch.float64), torch.randint(0, 10, (4,))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, fast)]
    for step in range(2):
        expected, expected_grads = _train_step(plain, x, y, opts[0])
        got, got_grads = _train_step(fast, x, y, opts[1])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        _assert_grads_close(got_grads, expected_grads)
    for (name_, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name_)  # weights, running stats, counts
    # the fast path really ran: channels-last features, and the channels-first batch norm in the graph
    state = fast.forward_stem(x)
    assert state[0].is_contiguous(memory_format=CL) and not state[0].is_contiguous()
    assert "ChannelsFirstBatchNormReLU" in type(state[1].grad_fn).__name__
    with torch.no_grad():  # eval and the plain model stay channels-first
        assert plain.forward_stem(x)[0].is_contiguous()
        assert fast.eval().forward_stem(x)[0].is_contiguous()


def test_bf16_autocast_keeps_the_channels_first_layout():
    model = MSDNet(**{**SMALL, **CASES[0]}).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.forward_stem(torch.randn(2, 3, 32, 32))
    assert state[0].is_contiguous()


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_batch_norm_relu_matches_timms_batch_norm_act(momentum):
    torch.manual_seed(0)
    reference = BatchNormAct2d(6, momentum=momentum).double()
    fast = BatchNormReLU2d(6, momentum=momentum).double()
    with torch.no_grad():
        for p in (reference.weight, reference.bias, reference.running_mean):
            p.normal_()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 6, 7, 3, dtype=torch.float64) * 3 + 1
    g = torch.randn(5, 6, 7, 3, dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(), x.contiguous(memory_format=CL).requires_grad_()
    yr, yf = reference(xr), fast(xf)
    assert yf.is_contiguous(memory_format=CL) and (yf == 0).any()  # channels-last out, ReLU active
    torch.testing.assert_close(yf, yr, rtol=1e-12, atol=1e-12)
    yr.backward(g)
    yf.backward(g.contiguous(memory_format=CL))
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.bias.grad, reference.bias.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # running mean, var (unbiased), count
    fast.eval()
    reference.eval()
    torch.testing.assert_close(fast(xf), reference(xr))  # eval: timm's own path


def test_shared_input_units_equal_separate_units():
    torch.manual_seed(0)
    units = [ConvNormAct(10, c, 1, norm_layer=BatchNormAct2d).double().train() for c in (3, 5)]
    twins = copy.deepcopy(units)
    x = torch.randn(4, 10, 6, 6, dtype=torch.float64)
    xs, xm = x.clone().requires_grad_(), x.contiguous(memory_format=CL).requires_grad_()
    separate = [u(xs) for u in units]
    merged = shared_input_conv_bn_relu(xm, twins)
    weights = [torch.randn_like(t) for t in separate]
    sum((t * w).sum() for t, w in zip(separate, weights)).backward()
    sum((t * w).sum() for t, w in zip(merged, weights)).backward()
    for a, b in zip(merged, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xm.grad, xs.grad, rtol=1e-10, atol=1e-12)
    for u, t in zip(units, twins):
        for (name, p), q in zip(t.named_parameters(), u.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
        for a, b in zip(t.state_dict().values(), u.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_compile_of_the_fast_step_computes_the_same_function():
    """The fast path under torch.compile (inductor): its custom autograd function is traced, not
    broken around, and the outputs and gradients stay those of the straightforward eager step."""
    torch.manual_seed(0)
    plain = MSDNet(**{**SMALL, **CASES[0], "num_blocks": 2}, channels_last_training=False).double().train()
    fast = copy.deepcopy(plain)
    fast.channels_last_training = True
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda images: fast.forward_exits(images), fullgraph=True)
    outputs = {}
    for name, forward in (("plain", plain.forward_exits), ("fast", compiled)):
        outputs[name] = forward(x)
        sum(F.cross_entropy(z, y) for z in outputs[name]).backward()
    for a, b in zip(outputs["fast"], outputs["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    _assert_grads_close({n: p.grad for n, p in fast.named_parameters() if p.grad is not None},
                        {n: p.grad for n, p in plain.named_parameters() if p.grad is not None})
    for a, b in zip(fast.buffers(), plain.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
