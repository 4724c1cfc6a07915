"""Export: the folder round-trips (outputs equal to the eager model's at any batch size, in both grad
modes, and through the early-exit executor), it is replaced atomically, and loading never runs code
from the files: crafted payloads, operators off the package's list, deep nesting, oversized files
and every manifest tampering are refused with a clear error; a pinned export loads, no other."""
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.utils import reparameterize_model

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import (EarlyExitExecutor, ExportedModel, Thresholds, export_model, manifest_sha256,
                                  weights_sha256)
from timm_exits.inference import export as export_module
from timm_exits.models.boostnet import BoostedExits
from timm_exits.models.product_anytime import ProductAnytimeModel
from timm_exits.models.ztw import ZTWModel

from helpers import randomise_norms

MODELS = {  # the 5-exit MSDNet shrunk to 3 blocks: its export takes a minute on a shared 2-core machine
    "msdnet": lambda: timm.create_model("msdnet_cifar_5exit", num_classes=10, num_channels=4, growth_rate=2,
                                        num_blocks=3),
    "resnet": lambda: timm.create_model("resnet18_exits", num_classes=10),
    # MSDNet's fused inference path (folded norms, buffers written in place): the deployable form
    "msdnet_fused": lambda: reparameterize_model(randomise_norms(MODELS["msdnet"]()).eval()),
    # exit-history wrappers: a nested state ([inner state, output, history]), ZTW's cascade and ensembles,
    # product anytime's float64 log-product with -inf for a class ruled out; BoostNet's running sum
    "msdnet_ztw_product_anytime": lambda: ProductAnytimeModel(ZTWModel(MODELS["msdnet"]())),
    "resnet_boostnet": lambda: BoostedExits(MODELS["resnet"](), reweight=0.5),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (eager model, export folder, files, loaded ExportedModel); each exported once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = randomise_norms(MODELS[name]()).eval()
            folder = str(tmp_path_factory.mktemp(name) / "export")
            files = export_model(model, torch.randn(1, 3, 32, 32), folder, name=name)
            cache[name] = model, folder, files, ExportedModel(folder)
        return cache[name]
    return get


@pytest.fixture
def copy(exports, tmp_path):
    """A fresh copy of the resnet export, to tamper with."""
    folder = tmp_path / "export"
    shutil.copytree(exports("resnet")[1], folder)
    return folder


# -- the good path -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_outputs_equal_the_eager_model_at_any_batch_size(exports, name, grad_mode):
    model, _, _, exported = exports(name)
    assert exported.num_exits == model.num_exits and exported.name == name
    for batch in (1, 3):  # the export saw batch 2
        x = torch.randn(batch, 3, 32, 32)
        with grad_mode():
            ours, theirs, stagewise = exported.forward_exits(x), model.forward_exits(x), _stage_by_stage(model, x)
        assert len(ours) == model.num_exits
        for a, b, c in zip(ours, theirs, stagewise):
            assert a.shape == (batch, 10) and torch.equal(a, c)  # what the export holds, bit for bit
            # a full pass may compute it in another order (the fused model's buffers reach across stages)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _stage_by_stage(model, x):
    """Every exit's logits computed piece by piece, as the export's pieces run."""
    state, out = model.forward_stem(x), []
    for k in range(model.num_exits):
        state = model.forward_stage(state, k)
        out.append(model.forward_exit(state, k))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_executor_runs_the_export_like_the_eager_model(exports, name):
    model, _, _, exported = exports(name)
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():  # thresholds at each exit's median confidence: about half the samples leave there
        scores = [logits.softmax(-1).amax(-1) for logits in model.forward_exits(x)]
    thresholds = [s.median().item() for s in scores[:-1]] + [-1e8]
    ours, theirs = EarlyExitExecutor(exported, thresholds)(x), EarlyExitExecutor(model, thresholds)(x)
    assert len(set(theirs.exits.tolist())) > 1  # samples really leave at different exits
    assert torch.equal(ours.exits, theirs.exits) and torch.equal(ours.preds, theirs.preds)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-6)
    assert torch.equal(exported.early_exit(x, thresholds).exits, theirs.exits)


def test_an_export_keeps_what_answers_at_its_exits(exports):
    """Thresholds fitted on product anytime's answers run on its export, and only there."""
    for name, predictor in (("msdnet_ztw_product_anytime", "product_anytime"), ("resnet", "exits")):
        exported = exports(name)[3]
        assert exported.predictor == predictor
        fitted = Thresholds(name, exported.num_exits, "maxprob", [0.5] * exported.num_exits, predictor=predictor)
        EarlyExitExecutor(exported, fitted)  # accepted
        other = Thresholds(name, exported.num_exits, "maxprob", [0.5] * exported.num_exits,
                           predictor="exits" if predictor == "product_anytime" else "product_anytime")
        with pytest.raises(ValueError, match="these thresholds were fitted on the answers of"):
            EarlyExitExecutor(exported, other)


def test_an_export_keeps_the_identity_of_its_weights(exports):
    """Thresholds that record the weights they were fitted on run on the export of those weights and are
    refused on an export of other weights of the same architecture."""
    model, exported = exports("resnet")[0], exports("resnet")[3]
    assert exported.weights_sha256 == weights_sha256(model)
    n = exported.num_exits
    fitted = Thresholds("resnet", n, "maxprob", [0.5] * n, weights=weights_sha256(model))
    EarlyExitExecutor(exported, fitted)  # accepted
    other = Thresholds("resnet", n, "maxprob", [0.5] * n, weights=weights_sha256(MODELS["resnet"]()))
    with pytest.raises(ValueError, match="fitted on other weights"):
        EarlyExitExecutor(exported, other)


class Toy(torch.nn.Module):
    """Two exits with what the families above lack: a non-persistent buffer, a tensor constant made in
    forward, and a reshape over the batch (a symbolic size: Mul(Integer(16), batch)); and an operator none
    of the package's models calls (``aten.sub.Tensor``), allowed by name (TOY_OPERATORS)."""

    num_exits = 2

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(2))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 4) for _ in range(2))
        self.register_buffer("mean", torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), persistent=False)

    def forward_stem(self, x):
        return x - self.mean

    def forward_stage(self, x, index):
        return self.convs[index](x).relu()

    def forward_exit(self, x, index):
        tokens = x.permute(0, 2, 3, 1).reshape(-1, 3) * torch.tensor([1.0, 2.0, 3.0])
        return self.heads[index](tokens).view(x.shape[0], -1, 4).mean(1)


TOY_OPERATORS = ("aten.relu.default", "aten.sub.Tensor")


def test_buffers_outside_the_state_dict_and_constants_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Toy().eval()
    export_model(model, torch.randn(1, 3, 4, 4), str(tmp_path / "toy"), extra_operators=TOY_OPERATORS)
    weights = load_file(tmp_path / "toy" / "weights.safetensors")
    assert "stem/model.mean" in weights and "model.mean" not in weights and "exit_1/lifted_tensor_0" in weights
    program = (tmp_path / "toy" / "exit_0.json").read_text()
    assert "Mul(Integer(16), Symbol(" in program
    exported = ExportedModel(str(tmp_path / "toy"), extra_operators=TOY_OPERATORS)
    x = torch.randn(3, 3, 4, 4)
    with torch.inference_mode():
        ours, state = exported.forward_exits(x), model.forward_stem(x)
        for k in range(2):
            state = model.forward_stage(state, k)
            assert torch.equal(ours[k], model.forward_exit(state, k))


def test_the_folder_holds_programs_weights_and_a_manifest_of_digests(exports):
    model, folder, files, _ = exports("resnet")
    pieces = ["stem"] + [f"{kind}_{k}" for k in range(4) for kind in ("stage", "exit")]
    assert files == [f"{p}.json" for p in pieces] + ["weights.safetensors"]
    assert sorted(os.listdir(folder)) == sorted(files + ["manifest.json", ".timm-exits"])  # + the writer's marker
    manifest = json.loads((open(os.path.join(folder, "manifest.json")).read()))
    assert manifest["format_version"] == 2 and manifest["num_exits"] == 4 and manifest["input_shape"] == [3, 32, 32]
    for file in files:
        data = open(os.path.join(folder, file), "rb").read()
        assert manifest["files"][file] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert not data.startswith((b"\x80", b"PK"))  # neither a pickle nor a zip archive
    weights = load_file(os.path.join(folder, "weights.safetensors"))
    assert torch.equal(weights["model.backbone.bn1.running_var"], model.backbone.bn1.running_var)
    used = {f"model.{k}" for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert sorted(weights) == sorted(used)  # one copy of each weight the programs use, not one per program


def test_channels_last_weights_are_loaded_channels_last(exports, tmp_path):
    """safetensors stores tensors contiguous; the manifest lists the weights that were channels-last
    (the fused MSDNet's), and they are loaded so again: a convolution's output layout follows its
    weight's, so the export computes in the eager model's layouts, bit for bit (checked above). An
    export without the list (older) loads with contiguous weights: the same values to fp32 rounding."""
    model, folder, _, exported = exports("msdnet_fused")
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    expected = sorted(k for k, v in model.state_dict().items()
                      if v.dim() == 4 and v.stride() != torch.empty(v.shape).stride())
    assert expected and all(model.state_dict()[k].is_contiguous(memory_format=torch.channels_last) for k in expected)
    assert manifest["channels_last"] == [f"model.{k}" for k in expected]
    assert json.loads(open(os.path.join(exports("resnet")[1], "manifest.json")).read())["channels_last"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = exported.forward_stem(x), model.forward_stem(x)
        assert all(a.is_contiguous(memory_format=torch.channels_last) for a in theirs)
        assert [a.stride() for a in ours] == [a.stride() for a in theirs]
        older = tmp_path / "older"
        shutil.copytree(folder, older)
        _edit_manifest(older, lambda m: m.pop("channels_last"))
        for a, b in zip(ExportedModel(str(older)).forward_exits(x), exported.forward_exits(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_one_channel_stem_keeps_its_layout(tmp_path):
    """A weight of one input channel, (O, 1, 3, 3), is contiguous in both layouts: only its strides
    tell that it is channels-last, and the layout of the stem's output follows them."""
    torch.manual_seed(0)
    model = reparameterize_model(randomise_norms(timm.create_model(
        "msdnet_cifar_5exit", num_classes=10, num_channels=4, growth_rate=2, num_blocks=2, in_chans=1)).eval())
    weight = model.stem.convs[0].conv.weight
    assert weight.is_contiguous() and weight.stride() != torch.empty(weight.shape).stride()
    export_model(model, torch.randn(2, 1, 32, 32), str(tmp_path / "export"))
    exported = ExportedModel(str(tmp_path / "export"))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        ours, theirs = exported.forward_stem(x), model.forward_stem(x)
        assert [a.stride() for a in ours] == [a.stride() for a in theirs]
        for a, b in zip(exported.forward_exits(x), _stage_by_stage(model, x)):
            assert torch.equal(a, b)


def test_a_failed_export_leaves_the_previous_one_and_a_new_one_replaces_it(exports, copy):
    model = exports("resnet")[0]
    before = (copy / "manifest.json").read_text()
    with pytest.raises(RuntimeError):  # 4 channels instead of 3: the stem cannot be exported
        export_model(model, torch.randn(1, 4, 32, 32), str(copy))
    assert (copy / "manifest.json").read_text() == before and ExportedModel(str(copy)).num_exits == 4
    export_model(model, torch.randn(1, 3, 24, 24), str(copy))
    assert ExportedModel(str(copy)).input_shape == (3, 24, 24)
    assert sorted(os.listdir(copy.parent)) == ["export"]  # no temporary or previous version left beside it


def test_an_export_replaces_only_an_export_with_nothing_added(exports, copy):
    """A user's file put into an export folder is never deleted by the next export there; an export
    written before exports were marked (no marker, exactly its files) is still replaced."""
    model = exports("resnet")[0]
    (copy / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(FileExistsError, match=r"files added since it was written \(notes.txt\)"):
        export_model(model, torch.randn(1, 3, 24, 24), str(copy))
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    (copy / "notes.txt").unlink()
    (copy / ".timm-exits").unlink()  # as an earlier version wrote it
    export_model(model, torch.randn(1, 3, 24, 24), str(copy))
    assert ExportedModel(str(copy)).input_shape == (3, 24, 24) and (copy / ".timm-exits").exists()
    (copy / ".timm-exits").unlink()
    (copy / "notes.txt").write_text("mine")  # unmarked and not only an export's files: refused
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(model, torch.randn(1, 3, 24, 24), str(copy))


def test_inputs_of_another_shape_and_a_folder_without_manifest_are_refused(exports, tmp_path):
    exported = exports("resnet")[3]
    with pytest.raises(ValueError, match=r"expected inputs of shape \(batch, 3, 32, 32\)"):
        exported.forward_stem(torch.randn(2, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ExportedModel(str(tmp_path))


# -- tampering: the manifest ---------------------------------------------------------------------

def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _truncate(folder):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[:len(text) // 2])


def _nested(depth):
    return json.loads("[" * depth + "]" * depth)


def _flip_a_byte(folder):
    data = bytearray((folder / "stage_1.json").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "stage_1.json").write_bytes(bytes(data))


TAMPERING = {
    "truncated": (_truncate, "manifest.json is not valid JSON"),
    "fewer exits": (lambda f: _edit_manifest(f, lambda m: m.update(num_exits=3)),
                    r"num_exits 3, which needs .* \(missing \[\], unexpected \['exit_3.json', 'stage_3.json'\]\)"),
    "more exits": (lambda f: _edit_manifest(f, lambda m: m.update(num_exits=5)),
                   r"num_exits 5, which needs .* \(missing \['exit_4.json', 'stage_4.json'\], unexpected \[\]\)"),
    "no exits": (lambda f: _edit_manifest(f, lambda m: m.update(num_exits=0)), "num_exits 0, expected a positive"),
    "a billion exits": (lambda f: _edit_manifest(f, lambda m: m.update(num_exits=10 ** 9)),
                        "num_exits 1000000000, which needs 2000000002 files .* but it lists 10"),
    "files not a mapping": (lambda f: _edit_manifest(f, lambda m: m.update(files=[1])),
                            "but it has no mapping of files to digests"),
    "weights identity": (lambda f: _edit_manifest(f, lambda m: m.update(weights_sha256="mine")),
                         "weights_sha256 'mine', expected a SHA-256 digest"),
    "file unlisted": (lambda f: _edit_manifest(f, lambda m: m["files"].pop("exit_2.json")),
                      r"missing \['exit_2.json'\]"),
    "file deleted": (lambda f: os.remove(f / "exit_2.json"), "exit_2.json is missing"),
    "digest": (_flip_a_byte, "stage_1.json does not match its SHA-256 digest"),
    "no digest": (lambda f: _edit_manifest(f, lambda m: m["files"]["stem.json"].pop("sha256")),
                  "no sha256 digest and size for stem.json"),
    "size": (lambda f: open(f / "weights.safetensors", "ab").write(b"\0"), "weights.safetensors has .* bytes, the "
                                                                          "manifest says"),
    "unknown version": (lambda f: _edit_manifest(f, lambda m: m.update(format_version=3)), "format version 3"),
    "first format": (lambda f: _edit_manifest(f, lambda m: m.pop("format_version")), "format version None"),
    "input shape": (lambda f: _edit_manifest(f, lambda m: m.update(input_shape="3x32x32")), "input_shape '3x32x32'"),
    "predictor": (lambda f: _edit_manifest(f, lambda m: m.update(predictor="pa")), r"predictor 'pa', expected one of"),
    "layouts": (lambda f: _edit_manifest(f, lambda m: m.update(channels_last="all")),
                "channels_last 'all', expected a list of weight names"),
    "unknown layout": (lambda f: _edit_manifest(f, lambda m: m.update(channels_last=["model.fc.weight", "x.weight"])),
                       "lists 'model.fc.weight' as a channels-last weight, but weights.safetensors has no 4-D"),
    # nesting and sizes, bounded before anything walks the JSON (json itself raises RecursionError)
    "manifest deeper than json parses": (lambda f: (f / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
                                         "manifest.json is nested too deeply"),
    "manifest deeply nested": (lambda f: _edit_manifest(f, lambda m: m.update(note=_nested(200))),
                               "manifest.json is nested too deeply"),
    "program deeper than json parses": (lambda f: _rewrite(f, "stem.json", b"[" * 100_000 + b"]" * 100_000),
                                        "stem.json is nested too deeply"),
    "program deeply nested": (lambda f: _edit_program(f, "stem.json", lambda d: d.update(note=_nested(200))),
                              "stem.json is nested too deeply"),
    "pytree spec deeply nested": (lambda f: _edit_program(f, "stem.json", _set_first("in_spec", json.dumps(
        _nested(200)))), r"stem.json: .*in_spec is .*, expected a pytree spec in JSON, nested at most 64 deep"),
    "manifest too large": (lambda f: _edit_manifest(f, lambda m: m.update(note="x" * (1 << 20))),
                           "manifest.json has more than 1048576 bytes"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_a_tampered_manifest_or_file_is_refused(copy, tampering):
    tamper, message = TAMPERING[tampering]
    tamper(copy)
    with pytest.raises(ValueError, match=f"{copy} is not a usable export: .*{message}.*; re-export the model"):
        ExportedModel(str(copy))


# -- tampering: payloads that would run code -----------------------------------------------------

class Payload:
    """Unpickling it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _rewrite(folder, file, data: bytes):
    """Replace ``file`` and its digest in the manifest: only the loader's own checks remain."""
    (folder / file).write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"].update({file: {"sha256": hashlib.sha256(data).hexdigest(),
                                                               "bytes": len(data)}}))


def _edit_program(folder, file, edit):
    doc = json.loads((folder / file).read_text())
    edit(doc)
    _rewrite(folder, file, json.dumps(doc).encode())


def _each(obj, key):
    """Every dict under ``obj`` that has ``key``."""
    if isinstance(obj, dict):
        if key in obj:
            yield obj
        for v in obj.values():
            yield from _each(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _each(v, key)


def _sympy_payload(folder, marker):  # torch's reader gives expr_str to sympy.sympify, which evals it
    def edit(doc):
        for d in _each(doc, "expr_str"):
            d["expr_str"] = f"__import__('builtins').open('{marker}', 'w') and {d['expr_str']}"
    _edit_program(folder, "stem.json", edit)


def _guard_payload(folder, marker):  # ExportedProgram.module() compiles guards into its code (if the
    # program has example inputs, which exports do not keep: not live today, refused all the same)
    _edit_program(folder, "stem.json", lambda doc: doc.update(
        guards_code=[f"__import__('builtins').open('{marker}', 'w') is not None"]))


def _name_payload(folder, marker):  # parameter names become attribute lookups in the module's code
    # the name may not hold a dot, so the marker is opened by a path relative to the test's folder
    doc = json.loads((folder / "stem.json").read_text())
    spec = next(s["parameter"] for s in doc["graph_module"]["signature"]["input_specs"] if "parameter" in s)
    old = spec["parameter_name"]
    spec["parameter_name"] = old + f'")if open("{marker.name}","w")else("'
    _rewrite(folder, "stem.json", json.dumps(doc).encode())
    weights = load_file(folder / "weights.safetensors")
    weights[spec["parameter_name"]] = weights.pop(old)
    save_file(weights, folder / "weights.safetensors")
    _rewrite(folder, "weights.safetensors", (folder / "weights.safetensors").read_bytes())


def _target_payload(folder, marker):  # a call target resolved by torch's reader outside torch.ops.aten
    def edit(doc):
        node = next(_each(doc, "target"))
        node["target"] = "torch.save"
    _edit_program(folder, "stem.json", edit)


PROGRAM_PAYLOADS = {  # name: (plant, refusal, whether torch's reader runs it without our check)
    "sympy expression": (_sympy_payload, r"stem.json: .*\.expr_str is .*, expected arithmetic on size symbols", True),
    "parameter name": (_name_payload, r"stem.json: .*\.parameter_name is .*, expected a plain name", True),
    "guard": (_guard_payload, r"stem.json: .guards_code\[0\] is .*, expected no guard at all", False),
    "call target": (_target_payload, r"stem.json: .*\.target is 'torch.save', expected an aten operator", False),
}


def _set_first(key, value):
    def edit(doc):
        next(_each(doc, key))[key] = value
    return edit


CHECK_CASES = {  # edit of a real program: what the refusal says
    "power": (_set_first("expr_str", "9**9**9**9"), "expected arithmetic on size symbols"),
    "sympy name": (_set_first("expr_str", "exec"), "expected arithmetic on size symbols"),
    "argument name": (_set_first("forward_arg_names", ["x:__import__"]), "expected a plain name"),
    "spec": (_set_first("in_spec", "[1, {"), "expected a pytree spec in JSON"),
    "spec content": (_set_first("in_spec", json.dumps([1, {"type": "builtins.dict", "context": json.dumps(['a"'])}])),
                     "expected a plain name"),
    "key": (lambda doc: doc["graph_module"].update({"x'": 1}), "a key in .graph_module is \"x'\", expected a plain"),
    "extension operator": (_set_first("target", "#my_op"), "expected an aten operator"),
    "dunder operator": (_set_first("target", "torch.ops.aten.__class__.__call__"), "expected an aten operator"),
    "float string": (lambda doc: doc["graph_module"].update({"as_float": "float('inf')"}),
                     "expected a float written as a string: Infinity, -Infinity or NaN"),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_the_program_check_refuses_strings_torch_would_evaluate(exports, case):
    doc = json.loads(open(os.path.join(exports("resnet")[1], "stage_1.json")).read())
    export_module._check_program(doc, "stage_1.json")  # an export passes
    assert doc["guards_code"] == [] and all(node["metadata"] == {} for node in _each(doc, "target"))
    edit, message = CHECK_CASES[case]
    edit(doc)
    with pytest.raises(ValueError, match=re.escape("stage_1.json: ") + ".*" + message):
        export_module._check_program(doc, "stage_1.json")


@pytest.mark.parametrize("payload", sorted(PROGRAM_PAYLOADS))
def test_code_in_a_program_is_refused_and_never_runs(copy, tmp_path, monkeypatch, payload):
    plant, message, live = PROGRAM_PAYLOADS[payload]
    marker = tmp_path / "marker"
    monkeypatch.chdir(tmp_path)
    plant(copy, marker)
    with pytest.raises(ValueError, match=f"{message}.*; re-export the model"):
        ExportedModel(str(copy))
    assert not marker.exists()
    if not live:  # a call target: torch's verifier refuses it too, after resolving the name
        return
    # the control: without the program check, torch's reader runs the payload (on load or first call)
    monkeypatch.setattr(export_module, "_check_program", lambda doc, where="": set())
    try:
        ExportedModel(str(copy)).forward_exits(torch.randn(2, 3, 32, 32))
    except Exception:
        pass  # the payload may break the program after it ran
    assert marker.exists(), "the payload did not run through torch's reader: this test no longer proves anything"


def _drop_a_weight(folder):
    weights = load_file(folder / "weights.safetensors")
    weights.pop("model.backbone.conv1.weight")
    save_file(weights, folder / "weights.safetensors")
    _rewrite(folder, "weights.safetensors", (folder / "weights.safetensors").read_bytes())


def test_a_program_torch_cannot_read_or_without_its_weights_is_refused(copy):
    major = json.loads((copy / "stem.json").read_text())["schema_version"]["major"]
    _edit_program(copy, "stem.json", lambda doc: doc["schema_version"].update(major=99))
    with pytest.raises(ValueError, match=r"torch .* cannot read stem.json \(exported with torch .*\): SerializeError"):
        ExportedModel(str(copy))
    _edit_program(copy, "stem.json", lambda doc: doc["schema_version"].update(major=major))
    _drop_a_weight(copy)
    with pytest.raises(ValueError, match="stem.json needs 'model.backbone.conv1.weight', which weights.safetensors"):
        ExportedModel(str(copy))


@pytest.mark.parametrize("file", ["weights.safetensors", "stem.json"])
def test_a_pickle_in_place_of_a_file_is_refused_and_never_runs(copy, tmp_path, file):
    marker = tmp_path / "marker"
    data = pickle.dumps(Payload(marker))
    _rewrite(copy, file, data)
    message = "weights.safetensors is not a safetensors file" if file.endswith("safetensors") else \
        "stem.json is not valid JSON"
    with pytest.raises(ValueError, match=message):
        ExportedModel(str(copy))
    assert not marker.exists()
    pickle.loads(data)  # the control: the payload is live
    assert marker.exists()


def test_a_first_format_export_with_a_tampered_archive_is_refused_unread(tmp_path):
    """The tester's payload: a .pt2 archive whose sample inputs are a pickle; torch.export.load runs it
    (its weights_only=True load fails and it falls back to weights_only=False)."""
    import zipfile

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x

    folder, marker = tmp_path / "first", tmp_path / "marker"
    folder.mkdir()
    archive = folder / "stem.pt2"
    torch.export.save(torch.export.export(Square(), (torch.randn(2),)), str(archive))
    with zipfile.ZipFile(archive) as z:
        members = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, pickle.dumps(Payload(marker), protocol=2) if "sample_inputs" in name else data)
    (folder / "manifest.json").write_text(json.dumps({"model": "m", "num_exits": 1, "input_shape": [2],
                                                      "files": ["stem.pt2", "stage_0.pt2", "exit_0.pt2"]}))
    with pytest.raises(ValueError, match="format version None, this timm-exits reads version 2; re-export"):
        ExportedModel(str(folder))
    assert not marker.exists()
    try:  # the control: torch's own loader runs it
        torch.export.load(str(archive))
    except Exception:
        pass
    assert marker.exists()


# -- the operators a program may call ------------------------------------------------------------

def _generator():
    """tools/export_operators.py, which makes the package's operator list."""
    path = Path(__file__).resolve().parents[1] / "tools" / "export_operators.py"
    spec = importlib.util.spec_from_file_location("export_operators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_operator_list_is_exactly_what_exports_of_the_package_are_made_of():
    """Regenerated from small models of every family (MSDNet CIFAR and ImageNet, plain and fused,
    ResNet, ConvNeXt, EfficientNet, MobileNetV3, ViT, Swin with exits; ResNet and ViT ADN; RANet; Dynamic
    Perceiver), every
    exit-history wrapper and IMTA's phase-II model, the conv and SDN heads, under no_grad; the fused
    MSDNet and product anytime around ZTW around MSDNet also with gradients on, under inference_mode
    and channels-last (a few minutes on a shared 2-core machine). The list must equal it: an operator a change brings in would make every export of that model
    refused, one no longer made would be allowed for nothing. ``python tools/export_operators.py
    --check`` compares the full regeneration (every registered model, in every grad mode and layout)."""
    generator = _generator()
    shipped = json.loads(generator.LIST.read_text())["operators"]
    assert shipped == sorted(shipped) and export_module.listed_operators() == frozenset(shipped)
    cases = generator.REPRESENTATIVE
    once = {name: case for name, case in cases.items() if name not in generator.EVERY_MODE}
    found = set(generator.operators(once, grad_modes=("no_grad",), layouts=(torch.contiguous_format,)))
    found |= set(generator.operators({name: cases[name] for name in generator.EVERY_MODE}))
    assert sorted(found) == shipped


def _from_file_payload(folder, marker):
    """The stem program edited to call ``aten.from_file(marker, shared=True, size=16)`` first, its digest
    rewritten: run, it creates ``marker`` (or overwrites it: a ``.pth`` file in site-packages would
    run at Python's next start)."""
    doc = json.loads((folder / "stem.json").read_text())
    graph = doc["graph_module"]["graph"]
    meta = json.loads(json.dumps(next(iter(graph["tensor_values"].values()))))
    meta.update(sizes=[{"as_int": 16}], strides=[{"as_int": 1}])
    graph["tensor_values"]["payload"] = meta
    graph["nodes"].insert(0, {
        "target": "torch.ops.aten.from_file.default", "name": "payload", "metadata": {},
        "inputs": [{"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                   {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                   {"name": "size", "arg": {"as_int": 16}, "kind": 1}],
        "outputs": [{"as_tensor": {"name": "payload"}}], "is_hop_single_tensor_return": None})
    _rewrite(folder, "stem.json", json.dumps(doc).encode())


def _contents(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_an_operator_off_the_list_is_refused_at_load_and_nothing_is_written(copy, tmp_path):
    marker = tmp_path / "evil.pth"
    _from_file_payload(copy, marker)
    before = _contents(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            f"{copy} is refused: stem.json calls aten.from_file.default: not among the operators") + ".*" +
            re.escape("ExportedModel(folder, extra_operators=('aten.from_file.default',))")):
        ExportedModel(str(copy))
    assert not marker.exists() and _contents(tmp_path) == before
    # the control: the payload is live; allowed by name (as only its caller can), it writes the file
    ExportedModel(str(copy), extra_operators=("aten.from_file.default",)).forward_exits(torch.randn(2, 3, 32, 32))
    assert marker.exists()


class Cumulative(Toy):
    """Toy whose exits call an operator none of the package's models does (aten.cumsum)."""

    def forward_exit(self, x, index):
        return super().forward_exit(x, index).cumsum(-1)


def test_an_operator_off_the_list_is_refused_at_export_unless_allowed_by_name_there_and_at_load(tmp_path):
    assert "aten.cumsum.default" not in export_module.listed_operators()
    torch.manual_seed(0)
    model, x, folder = Cumulative().eval(), torch.randn(2, 3, 4, 4), str(tmp_path / "export")
    with pytest.raises(ValueError, match=re.escape(
            "Cumulative: exit_0.json calls aten.cumsum.default; exit_1.json calls aten.cumsum.default: not among "
            "the operators exports of timm-exits' models are made of") + ".*" + re.escape(
            "export_model(..., extra_operators=('aten.cumsum.default',)) and ExportedModel(folder, "
            "extra_operators=('aten.cumsum.default',))")):
        export_model(model, x, folder, extra_operators=TOY_OPERATORS)
    assert os.listdir(tmp_path) == []  # nothing written
    export_model(model, x, folder, extra_operators=TOY_OPERATORS + ("aten.cumsum.default",))
    with pytest.raises(ValueError, match="is refused: exit_0.json calls aten.cumsum.default; exit_1.json calls"):
        ExportedModel(folder, extra_operators=TOY_OPERATORS)  # the loader trusts only what its caller allows
    exported = ExportedModel(folder, extra_operators=[*TOY_OPERATORS, "aten.cumsum.default"])
    with torch.inference_mode():
        for ours, theirs in zip(exported.forward_exits(x), _stage_by_stage(model, x)):
            assert torch.equal(ours, theirs)
    for bad in ("aten.cumsum.default", ["torch.ops.aten.cumsum.default"], ["aten.__class__.__call__"], [None]):
        with pytest.raises(ValueError, match="extra_operators must be a sequence of aten operator names such as"):
            ExportedModel(folder, extra_operators=bad)
        with pytest.raises(ValueError, match="extra_operators must be a sequence of aten operator names such as"):
            export_model(model, x, folder, extra_operators=bad)


# -- sizes: bounded before reading (nesting: TAMPERING above) ------------------------------------

def test_a_program_larger_than_any_export_needs_is_refused_unread(copy):
    size = export_module.MAX_PROGRAM_BYTES + 1
    with open(copy / "stem.json", "r+b") as f:  # sparse: nothing is stored, and nothing should be read
        f.truncate(size)
    _edit_manifest(copy, lambda m: m["files"]["stem.json"].update(bytes=size))
    with pytest.raises(ValueError, match=f"manifest.json gives stem.json {size} bytes, more than a program may"):
        ExportedModel(str(copy))


# -- pinning a trusted export --------------------------------------------------------------------

def test_a_pinned_export_loads_and_any_other_manifest_is_refused_before_anything_else_is_read(copy):
    pinned = manifest_sha256(str(copy))
    assert pinned == hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
    assert ExportedModel(str(copy), expected_manifest_sha256=pinned).num_exits == 4
    _edit_manifest(copy, lambda m: m.update(model="another"))  # still a consistent export
    assert ExportedModel(str(copy)).name == "another"
    for file in os.listdir(copy):  # and nothing else to read: the pin is checked first
        if file != "manifest.json":
            os.remove(copy / file)
    with pytest.raises(ValueError, match=f"manifest.json has SHA-256 [0-9a-f]{{64}}, not the pinned {pinned}: not "
                                         f"the export you pinned"):
        ExportedModel(str(copy), expected_manifest_sha256=pinned)
    for bad in ("sha256:" + pinned, pinned[:-1], 123):
        with pytest.raises(ValueError, match="expected_manifest_sha256 must be a SHA-256 digest in hex"):
            ExportedModel(str(copy), expected_manifest_sha256=bad)


# -- what the export says about itself: preprocessing, class names, thresholds --------------------

TOY_CONFIG = dict(input_size=(3, 4, 4), mean=(0.5,), std=(0.25, 0.5, 0.75), interpolation="bicubic", crop_pct=0.9)
TOY_NAMES = ["ant", "bee", "cat", "dog"]


def _toy_thresholds(model, **changes):
    return Thresholds("toy", 2, "maxprob", [0.3, -1e8], weights=weights_sha256(model), input_size=[3, 4, 4],
                      **changes)


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """A toy export recording its preprocessing, class names and thresholds: (model, folder)."""
    torch.manual_seed(0)
    model = Toy().eval()
    folder = tmp_path_factory.mktemp("described") / "export"
    export_model(model, torch.randn(1, 3, 4, 4), str(folder), name="toy", extra_operators=TOY_OPERATORS,
                 data_config=TOY_CONFIG, label_names=TOY_NAMES, thresholds=_toy_thresholds(model))
    return model, folder


def test_an_export_records_its_preprocessing_class_names_and_thresholds(described):
    model, folder = described
    exported = ExportedModel(str(folder), extra_operators=TOY_OPERATORS)
    assert exported.name == "toy" and exported.num_classes == 4 and exported.label_names == TOY_NAMES
    assert exported.data_config == dict(input_size=[3, 4, 4], mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 0.75],
                                        interpolation="bicubic", crop_pct=0.9)  # one mean serves every channel
    assert exported.thresholds == _toy_thresholds(model)
    x = torch.randn(16, 3, 4, 4)
    ours, theirs = exported.early_exit(x), EarlyExitExecutor(model, _toy_thresholds(model))(x)  # its own thresholds
    assert len(set(theirs.exits.tolist())) > 1 and torch.equal(ours.exits, theirs.exits)
    export_model(model, x[:1], str(folder.parent / "plain"), extra_operators=TOY_OPERATORS)  # nothing given
    plain = ExportedModel(str(folder.parent / "plain"), extra_operators=TOY_OPERATORS)
    assert (plain.data_config, plain.label_names, plain.thresholds, plain.num_classes) == (None, None, None, 4)
    with pytest.raises(ValueError, match=f"{folder.parent / 'plain'} records no thresholds: pass thresholds"):
        plain.early_exit(x)


@pytest.mark.parametrize("given, message", [
    (dict(label_names=["ant", "bee"]), r"label_names must be 4 class names \(one per output\), got \['ant', 'bee'\]"),
    (dict(data_config=dict(TOY_CONFIG, input_size=(3, 8, 8))),
     r"data_config\['input_size'\] is \[3, 8, 8\], but the export takes inputs of shape \[3, 4, 4\]"),
    (dict(data_config=dict(TOY_CONFIG, std=(0.0,))), r"data_config\['std'\] must be a list of numbers > 0.0"),
    (dict(data_config=dict(TOY_CONFIG, colour="red")), r"data_config has keys \['colour'\]; expected some of"),
    (dict(thresholds=Thresholds("toy", 2, "maxprob", [0.3, 0.0], weights="0" * 64)), "fitted on other weights"),
    (dict(thresholds=Thresholds("toy", 2, "maxprob", [0.3, 0.0], input_size=[3, 8, 8])),
     r"the thresholds were fitted at input size \[3, 8, 8\], the export takes \[3, 4, 4\]"),
])
def test_a_description_that_does_not_fit_the_model_is_refused_before_anything_is_written(tmp_path, given, message):
    with pytest.raises(ValueError, match=message):
        export_model(Toy().eval(), torch.randn(1, 3, 4, 4), str(tmp_path / "toy"), extra_operators=TOY_OPERATORS,
                     **given)
    assert not (tmp_path / "toy").exists()


DESCRIPTION_TAMPERING = {
    "fewer names": (lambda m: m.update(label_names=["ant"]), r"label_names \['ant'\], expected a list of 4 class"),
    "classes": (lambda m: m.update(num_classes="4"), "num_classes '4', expected a positive integer"),
    "std": (lambda m: m["preprocessing"].update(std=[0.0, 1.0, 1.0]), r"preprocessing.std must be a list of numbers"),
    "mean per channel": (lambda m: m["preprocessing"].update(mean=[0.5, 0.5]), "preprocessing.mean has 2 values for "
                                                                                "3-channel input"),
    "input size": (lambda m: m["preprocessing"].update(input_size=[3, 8, 8]),
                   r"preprocessing.input_size is \[3, 8, 8\], but the export takes inputs of shape \[3, 4, 4\]"),
    "unknown key": (lambda m: m["preprocessing"].update(resize=7), r"preprocessing has keys \['resize'\]"),
    "thresholds": (lambda m: m["thresholds"].update(thresholds=[float("nan"), 0.0]), "thresholds that are not a"),
    "thresholds' weights": (lambda m: m["thresholds"].update(weights="0" * 64), "thresholds for another model: weights"),
    "thresholds' exits": (lambda m: m["thresholds"].update(num_exits=3, thresholds=[0.1, 0.2, 0.3]),
                          r"thresholds for another model: num_exits 3 \(the export's: 2\)"),
}


@pytest.mark.parametrize("tampering", sorted(DESCRIPTION_TAMPERING))
def test_a_tampered_description_is_refused(described, tmp_path, tampering):
    edit, message = DESCRIPTION_TAMPERING[tampering]
    folder = tmp_path / "export"
    shutil.copytree(described[1], folder)
    _edit_manifest(folder, edit)
    with pytest.raises(ValueError, match=f"{folder} is not a usable export: .*{message}.*; re-export the model"):
        ExportedModel(str(folder), extra_operators=TOY_OPERATORS)


def test_an_export_of_a_model_folder_takes_its_name_preprocessing_and_class_names(tmp_path):
    from timm_exits.model_folder import export_model_folder
    from timm_exits.model_folder import save_model_folder

    model = timm.create_model("vit_tiny_patch16_224_exits", num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                              depth=4, num_heads=2, exits=[0, 2]).eval()
    data_config = dict(input_size=(3, 32, 32), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), interpolation="bilinear",
                       crop_pct=1.0)
    save_model_folder(model, str(tmp_path / "folder"), data_config, ["cat", "dog", "eel"])
    thresholds = Thresholds("vit", model.num_exits, "maxprob", [0.5] * model.num_exits, weights=weights_sha256(model))
    export_model_folder(str(tmp_path / "folder"), str(tmp_path / "export"), thresholds=thresholds)
    exported = ExportedModel(str(tmp_path / "export"))
    assert exported.name == "vit_tiny_patch16_224_exits" and exported.label_names == ["cat", "dog", "eel"]
    assert exported.data_config == {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    assert exported.thresholds == thresholds and exported.input_shape == (3, 32, 32)
