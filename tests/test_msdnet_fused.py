"""MSDNet's fused inference path computes the same function as the plain model: every exit, random
weights and trained-looking batch-norm statistics, for the variants' different layouts."""
import warnings

import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import MSDNet
from timm_exits.inference import EarlyExitExecutor, assign_exits, exit_scores
from timm_exits.models.msdnet_fused import FoldedConvAct, FoldedPointwise, FusedMsdLayer, full_pass
from timm_exits.models.multi_exit import slice_state

from helpers import randomise_norms


def _randomise(model: nn.Module) -> nn.Module:
    return randomise_norms(model).eval()


CASES = [
    ("msdnet_cifar_7exit", {}, 32),                              # lin_grow, 3 scales
    ("msdnet_cifar_anytime_7exit", {}, 32),                      # even steps
    ("msdnet_cifar_5exit", dict(bottleneck=False), 32),          # no 1x1 bottlenecks to merge
    ("msdnet_cifar_5exit", dict(prune="min", reduction=0.5), 32),
    ("msdnet_imagenet_5exit", dict(num_channels=8, growth_rate=4), 224),  # 4 scales, biased stem conv
]


GRAD_MODES = [torch.no_grad, torch.inference_mode]


def _close(expected: torch.Tensor, got: torch.Tensor) -> None:
    expected, got = expected.detach(), got.detach()
    assert expected.shape == got.shape
    assert float((got - expected).norm() / expected.norm()) < 1e-5, (got - expected).abs().max()


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_fused_model_gives_the_plain_models_outputs(name, kwargs, size, grad_mode):
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, num_classes=10, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparameterize_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(3, 3, size, size)
    with grad_mode():
        expected, got = model.forward_exits(x), fused.forward_exits(x)
    assert len(got) == model.num_exits
    for a, b in zip(expected, got):
        _close(a, b)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def _tensors(module: nn.Module) -> set:
    return {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("pruned", [False, True], ids=["whole", "pruned"])
def test_every_fuse_returns_a_new_module_and_leaves_the_original_untouched(pruned):
    model = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2))
    if pruned:  # stage 1 keeps only the paths exit 1 reads: its layers are incomplete
        model.prune_intermediate_layers([1], prune_head=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "fuse", None))]
    assert {type(m).__name__ for _, m in modules} == {"MsdStem", "MsdStage", "MsdLayer", "Transition", "MsdHead"} - \
        ({"Transition"} if pruned else set())
    for name, module in modules:
        fused = module.fuse()
        assert fused is not module and not _tensors(fused) & _tensors(module), name
        assert not set(map(id, fused.modules())) & set(map(id, module.modules())), name
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("cut", range(5))
def test_a_pruned_feature_extractor_fuses_and_scripts(cut):
    """``prune_intermediate_layers`` (timm's features_only) then ``--reparam``: every cut, also those
    that leave a transition with unread paths (copied unfused, its stage concatenating); the fused
    extractor's feature maps are the plain one's, eager and scripted, in both grad modes."""
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        model = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2))
    model.prune_intermediate_layers([cut], prune_head=True)
    fused = reparameterize_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(fused)
    x = torch.randn(2, 3, 32, 32)
    for grad_mode in GRAD_MODES:
        with grad_mode():
            expected = model.forward_until(x, cut)
            for got in (fused.forward_until(x, cut), scripted.forward_until(x, cut)):
                assert len(got) == len(expected)
                for a, b in zip(expected, got):
                    _close(a, b)


def test_fusing_a_fused_model_again_changes_nothing():
    """``reparameterize_model`` on a model that is already fused (a second ``--reparam``, a fused model
    passed on) copies the fused parts as they are."""
    model = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2))
    fused = reparameterize_model(model)
    again = reparameterize_model(fused)
    assert not _tensors(again) & _tensors(fused)
    assert again.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fused.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.forward_exits(x), again.forward_exits(x)):
            _close(a, b)


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_the_fused_model_compiles_with_torchscript(name, kwargs, size, tmp_path):
    """timm's ``validate.py --reparam --torchscript``: the fused model scripted (then saved and loaded, a
    program without Python code) answers at every active exit as the plain model does, in both grad modes."""
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        model = _randomise(timm.create_model(name, num_classes=10, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.save(torch.jit.script(reparameterize_model(model)), str(tmp_path / "fused.pt"))
        scripted = torch.jit.load(str(tmp_path / "fused.pt"))
    x = torch.randn(2, 3, size, size)
    for grad_mode in GRAD_MODES:
        with grad_mode():
            expected = model.forward_exits(x)
            for k in range(model.num_exits):
                scripted.exit_index = k
                _close(expected[k], scripted(x))


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
def test_the_fused_model_runs_in_bfloat16(grad_mode):
    """timm's ``validate.py --reparam --amp`` (bf16 autocast on CPU) and ``--model-dtype bfloat16``: the
    buffers take the dtype of what flows in, and every exit stays as close to the fp32 plain model as
    the plain model under autocast is (bf16 rounding)."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10))
    fused = reparameterize_model(model)
    x = torch.randn(3, 3, 32, 32)
    with grad_mode():
        expected = model.forward_exits(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_amp, fused_amp = model.forward_exits(x), fused.forward_exits(x)
        fused_bf16 = reparameterize_model(model).to(torch.bfloat16).forward_exits(x.to(torch.bfloat16))
    for e, p, a, b in zip(expected, plain_amp, fused_amp, fused_bf16):
        assert a.dtype == b.dtype == torch.bfloat16
        plain_error = float((p.float() - e).norm() / e.norm())
        for got in (a, b):
            assert float((got.float() - e).norm() / e.norm()) < max(3 * plain_error, 0.02)


def test_fusing_is_done_at_fuse_time():
    model = _randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10))
    fused = reparameterize_model(model)
    weights = {name: p.clone() for name, p in fused.named_parameters()}
    with torch.no_grad():
        fused.forward_exits(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(p, weights[name]) for name, p in fused.named_parameters())  # nothing changes at run time


def test_pointwise_units_read_the_filled_channels_in_place():
    """A 1x1 unit reads the features at the start of a wider channels-last buffer: the room after them
    is neither read into the product nor copied (NaN there would spread to every output)."""
    torch.manual_seed(0)
    unit = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3)).stages[1][0].units[0].normal.reduce
    folded = FoldedPointwise([unit])
    x = torch.randn(3, unit.conv.in_channels, 4, 4)
    buffer = torch.full((3, unit.conv.in_channels + 5, 4, 4), float("nan")).contiguous(memory_format=torch.channels_last)
    buffer[:, :unit.conv.in_channels] = x
    with torch.no_grad():
        _close(unit(x), folded(buffer))
        with pytest.raises(ValueError, match=f"reads {unit.conv.in_channels} channels, got {unit.conv.in_channels - 1}"):
            folded(buffer[:, :unit.conv.in_channels - 1])


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,kwargs,size", [CASES[0], CASES[3]])
def test_stage_by_stage_with_compaction(name, kwargs, size, grad_mode):
    """Fused stages pass what the plain model passes (one channels-last tensor per scale, of the same
    widths), never write into their input, and give the plain model's outputs on the samples kept
    after dropping some between stages (what the executor does)."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, num_classes=10, **kwargs))
    fused = reparameterize_model(model)
    x = torch.randn(8, 3, size, size)
    with grad_mode():
        expected = model.forward_exits(x)
        plain_state, state, index = model.forward_stem(x), fused.forward_stem(x), torch.arange(len(x))
        for k in range(model.num_exits):
            before = [t.clone() for t in state]
            plain_state, new = model.forward_stage(plain_state, k), fused.forward_stage(state, k)
            assert all(torch.equal(t, b) for t, b in zip(state, before))  # the input is left as it was
            state = new
            assert [t.shape[1] for t in state] == [t.shape[1] for t in plain_state]
            assert all(t.is_contiguous(memory_format=torch.channels_last) for t in state)
            _close(expected[k][index], fused.forward_exit(state, k))
            if len(index) > 2:
                keep = torch.ones(len(index), dtype=torch.bool)
                keep[k % len(index)] = False
                state, plain_state, index = slice_state(state, keep), slice_state(plain_state, keep), index[keep]


def _buffer_widths(state):
    """Per scale: the channels of the channels-last buffer a state's tensor starts (the stride between
    two pixels of a row)."""
    assert all(t.stride(1) == 1 for t in state)  # channels innermost
    return [t.stride(3) for t in state]


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
def test_a_full_pass_appends_to_the_same_buffers_up_to_the_next_transition(grad_mode):
    """In a full pass (``full_pass``, what the fused model's forward_exits and model(x) run) stages 0-3
    of msdnet_cifar_7exit write into one buffer per scale, as wide as the plain model's features where
    stage 4's transition reads them; each stage's state is a list of the plain model's tensors, and a
    pass that stops earlier gets no room for the stages it does not run."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10))
    fused = reparameterize_model(model)
    assert type(model.stages[4][1]).__name__ == "Transition"  # stage 4: one dense layer, then a transition
    x = torch.randn(4, 3, 32, 32)
    with grad_mode():
        plain = [model.forward_stem(x)]
        for k in range(model.num_exits):
            plain.append(model.forward_stage(plain[-1], k))
        read = model.stages[4][0](plain[4])  # what the transition reads; the layer drops scale 0, which it only read
        at_transition = [t.shape[1] for t in plain[4][:len(plain[4]) - len(read)] + read]
        pointers = None
        for k, state in enumerate(full_pass(list(fused.stages), fused.forward_stem(x))):
            if k == 4:
                break
            assert type(state) is list and _buffer_widths(state) == at_transition
            assert pointers in (None, [t.data_ptr() for t in state])
            pointers = [t.data_ptr() for t in state]
            assert len(state) == len(plain[k + 1])
            for expected, got in zip(plain[k + 1], state):
                _close(expected, got)
            _close(model.forward_exit(plain[k + 1], k), fused.forward_exit(state, k))
        *_, short = full_pass(list(fused.stages)[:2], fused.forward_stem(x))
        assert _buffer_widths(short) == [t.shape[1] for t in plain[2]]
        after = fused.forward_stage(short, 2)  # going on, stage by stage, past where the pass ended
        for expected, got in zip(plain[3], after):
            _close(expected, got)


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
def test_the_fused_models_full_passes_are_one_pass(grad_mode):
    """forward_exits and model(x) (at every exit) of a fused model run ``full_pass``, not its stages one by
    one (none of them is called), and give exactly what the heads give on that pass's states."""
    torch.manual_seed(0)
    fused = reparameterize_model(_randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10)))
    calls = []
    for stage in fused.stages:
        stage.register_forward_hook(lambda *args: calls.append(args))
    x = torch.randn(2, 3, 32, 32)
    with grad_mode():
        states = list(full_pass(list(fused.stages), fused.forward_stem(x)))
        expected = [fused.forward_exit(s, k) for k, s in enumerate(states)]
        got = fused.forward_exits(x)
        assert len(got) == fused.num_exits and all(torch.equal(a, b) for a, b in zip(expected, got))
        for k in range(fused.num_exits):
            fused.set_exit(k)
            assert torch.equal(fused(x), expected[k])
    assert not calls
    with grad_mode():
        fused.forward_until(x, 1)  # the contract's stage-by-stage path
    assert len(calls) == 2


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,kwargs,size", [CASES[0], CASES[4]])
def test_the_fused_model_answers_at_every_active_exit(name, kwargs, size, grad_mode):
    """model(x) at each exit (forward_until, then one head): the plain model's logits."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, num_classes=10, **kwargs))
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, size, size)
    for k in range(model.num_exits):
        model.set_exit(k)
        fused.set_exit(k)
        with grad_mode():
            _close(model(x), fused(x))


def test_gradients_are_refused_and_a_forward_without_a_grad_mode_works():
    """The fused stages write into buffers in place, which autograd cannot differentiate: an input that
    needs a gradient is refused with an error that says what to do. Its parameters need none, so a
    forward outside no_grad (a quick script, or with Gradient Equilibrium switched on) still answers."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3, num_channels=4, growth_rate=2))
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, 32, 32)
    fused.gradient_equilibrium = True  # reshapes the state between stages when grad is enabled
    with torch.no_grad():
        expected, last = model.forward_exits(x), model(x)
    assert torch.is_grad_enabled()
    for a, b in zip(expected, fused.forward_exits(x)):
        _close(a, b)
    _close(last, fused(x))
    with pytest.raises(RuntimeError, match=r"computes no gradients .* torch.no_grad\(\) or torch.inference_mode\(\)"):
        fused(x.requires_grad_())


def test_a_fused_stage_refuses_inputs_of_other_widths():
    fused = reparameterize_model(_randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3)))
    with torch.no_grad():
        state = fused.forward_stage(fused.forward_stem(torch.randn(2, 3, 32, 32)), 0)
        with pytest.raises(ValueError, match="reads scales of"):
            fused.forward_stage(state, 0)


def test_shared_input_bottlenecks_are_merged():
    model = _randomise(timm.create_model("msdnet_cifar_7exit"))
    fused = reparameterize_model(model)
    layers = [m for m in fused.modules() if isinstance(m, FusedMsdLayer)]
    first = layers[0]  # 3 scales: scale 0 feeds the normal path of 0 and the down path of 1, ...
    assert first.read_scales == [0, 1, 2] and [len(r.widths) for r in first.reduce] == [2, 2, 1]
    plain_1x1 = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    fused_1x1 = sum(1 for m in fused.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert fused_1x1 < 0.7 * plain_1x1
    assert all(m.conv.weight.is_contiguous(memory_format=torch.channels_last) for m in fused.modules()
               if isinstance(m, FoldedConvAct))


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("batch", [16, 1])
def test_the_executor_runs_the_fused_model_with_the_same_predictions(grad_mode, batch):
    torch.manual_seed(1)
    model = _randomise(MSDNet(num_blocks=3, base=1, step=1, num_channels=4, growth_rate=2, gr_factor=[1, 2],
                              bn_factor=[1, 2], stem_type="cifar", head_channels=8, num_classes=3, img_size=16))
    fused = reparameterize_model(model)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        confidence = [z.softmax(1).amax(1).sort().values for z in model.forward_exits(x)]
    # about half leave at each exit; thresholds halfway between two scores, so that rounding cannot move a sample
    thresholds = [float(c[7:9].mean()) for c in confidence[:2]] + [-1e8]
    with grad_mode():
        plain = [EarlyExitExecutor(model, thresholds)(x[i:i + batch]) for i in range(0, len(x), batch)]
        fast = [EarlyExitExecutor(fused, thresholds)(x[i:i + batch]) for i in range(0, len(x), batch)]
    for p, f in zip(plain, fast):
        assert torch.equal(p.exits, f.exits) and torch.equal(p.preds, f.preds)
        _close(p.logits, f.logits)
    exits = torch.cat([p.exits for p in plain])
    assert 0 < (exits == 0).sum() < len(x) and (exits == 2).any()  # some samples left early, some did not


def test_fusing_needs_conv_bn_relu_units():
    model = timm.create_model("msdnet_cifar_5exit", num_classes=3).eval()
    model.stem.convs[0].bn.act = nn.GELU()
    with pytest.raises(ValueError, match="expects conv-BN-ReLU units"):
        reparameterize_model(model)


def test_a_state_made_under_inference_mode_continues_outside_it():
    """A state made under inference mode (inference tensors) continues under no_grad."""
    model = _randomise(timm.create_model("msdnet_cifar_5exit", num_classes=3))
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        state = fused.forward_stage(fused.forward_stem(x), 0)
    with torch.no_grad():
        got = fused.forward_exit(fused.forward_stage(state, 1), 1)
        expected = model.forward_exit(model.forward_until(x, 1), 1)
    _close(expected, got)


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=["no_grad", "inference_mode"])
def test_the_fused_executor_takes_the_exits_of_the_cached_evaluation(grad_mode):
    """The executor on the fused model answers each sample where the cached evaluation of the plain
    model's outputs (``assign_exits`` on the same thresholds) says it leaves, with that exit's logits."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model("msdnet_cifar_7exit", num_classes=10))
    fused = reparameterize_model(model)
    x = torch.randn(48, 3, 32, 32) * torch.linspace(0.2, 3, 48).view(-1, 1, 1, 1)  # confidences spread out
    with torch.no_grad():
        logits = torch.stack(model.forward_exits(x))
    scores = exit_scores(logits.softmax(-1))
    thresholds = []
    for s in scores[:-1]:  # a fifth of the samples (roughly) leave at each exit; halfway between two scores
        top = s.sort(descending=True).values[9:11]
        thresholds.append(float(top.mean()))
    thresholds.append(-1e8)
    expected = assign_exits(scores, torch.tensor(thresholds, dtype=torch.float64))
    assert len(set(expected.tolist())) >= 4  # samples leave at several exits: compaction happens
    with grad_mode():
        result = EarlyExitExecutor(fused, thresholds)(x)
    assert torch.equal(result.exits, expected)
    _close(logits[expected, torch.arange(len(x))], result.logits)
    assert torch.equal(result.preds, logits[expected, torch.arange(len(x))].argmax(-1))
