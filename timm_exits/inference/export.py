"""Export a multi-exit model for deployment: one ``torch.export`` program per stem, stage and exit,
loaded without running anything from the files.

The folder holds:

* ``stem.json``, ``stage_<k>.json``, ``exit_<k>.json``: the programs in torch.export's JSON
  serialization (dynamic batch size), without debug metadata and guards;
* ``weights.safetensors``: the model's parameters and buffers (each program takes those it uses)
  and each program's tensor constants (``<piece>/<name>``);
* ``manifest.json``: format version, model name, number of exits, input shape, what answers at the
  exits (``predictor``: :mod:`timm_exits.models.predictors`, e.g. ``'product_anytime'`` for a
  ProductAnytimeModel; older exports: the exits),
  the weights that were channels-last (``channels_last``: safetensors stores every tensor contiguous,
  and a convolution's output layout, so its kernel and last-bit rounding, follows its weight's), and
  the SHA-256 digest and size of every file; and what the deployment needs to use it, if given
  (:func:`export_model`'s ``data_config``, ``label_names``, ``thresholds``; from a model folder's
  ``config.json`` by default, :func:`timm_exits.model_folder.export_model_folder`): the preprocessing (``preprocessing``:
  input size, mean, std, interpolation, crop_pct), the class names in the order of the outputs
  (``label_names``, with ``num_classes``) and the thresholds to exit with (``thresholds``, a
  :class:`~timm_exits.inference.budgeted.Thresholds` file's content).

:class:`ExportedModel` runs them, with or without early exit, without the Python model code. It has
the same ``forward_stem`` / ``forward_stage`` / ``forward_exit`` interface, so
:class:`~timm_exits.inference.executor.EarlyExitExecutor` runs it too.

Why not ``.pt2`` archives: ``torch.export.load`` unpickles (sample inputs fall back to
``weights_only=False``, weights and constants can be marked as pickled). And torch's JSON reader
evaluates some strings: symbolic expressions go to ``sympy.sympify`` (``eval``), guards and parameter
names are compiled into the module's code. So :class:`ExportedModel` checks a program before torch
reads it: every string a plain name, every symbolic expression arithmetic on size symbols, no guards
(:func:`_check_program`), nesting and sizes bounded; and every call one of the ``aten`` operators
timm-exits' own exports are made of (``export_operators.json`` beside this module, made by
``python tools/export_operators.py``), or one its caller allowed by name (``extra_operators``): some
``aten`` operators write files or shared storage (``aten.from_file`` with ``shared=True`` creates one).

The manifest's digests tell that no file changed since export (integrity), not who exported it:
anyone can rewrite them. A deployer pins a trusted export by its manifest's digest
(:func:`manifest_sha256`, ``ExportedModel(folder, expected_manifest_sha256=...)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from importlib import resources
from dataclasses import asdict
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize
from torch.export import Dim, ExportedProgram, ExportGraphSignature, export
from torch.export.graph_signature import InputKind

from ..files import MAX_JSON_NESTING, atomic_folder, nested_too_deeply, nests_deeper_than, parse_json, write_weights
from ..values import PREPROCESSING, check_preprocessing
from .budgeted import Thresholds
from .executor import EarlyExitExecutor, weights_sha256
from ..models.predictors import known_predictor, predictor_choices, predictor_of

__all__ = ["export_model", "ExportedModel", "manifest_sha256", "listed_operators",
           "exported_operators"]

FORMAT_VERSION = 2  # 1: one .pt2 archive per piece (loaded with torch.export.load, which unpickles)
WEIGHTS = "weights.safetensors"
OPERATORS = "export_operators.json"  # beside this module: the operators exports are made of
# bounds checked before anything is parsed, far above what exports of timm-exits' models need (programs
# of at most a few MB, nested at most 18 deep, manifests of a few kB)
MAX_MANIFEST_BYTES = 1 << 20
MAX_PROGRAM_BYTES = 64 << 20
MAX_NESTING = MAX_JSON_NESTING
_BATCH = Dim("batch", min=1, max=1 << 20)


class _Piece(nn.Module):
    """One piece of the contract as a module with a single forward, for torch.export."""

    def __init__(self, model: nn.Module, kind: str, index: int = 0):
        super().__init__()
        self.model, self.kind, self.index = model, kind, index

    def forward(self, x):
        if self.kind == "stem":
            return self.model.forward_stem(x)
        if self.kind == "stage":
            return self.model.forward_stage(x, self.index)
        return self.model.forward_exit(x, self.index)


def _batch_dims(state):
    """The dynamic batch dimension of every tensor of a state (a tensor or nested lists of tensors:
    an exit-history model's state is ``[inner state, output, history]``)."""
    return {0: _BATCH} if isinstance(state, torch.Tensor) else [_batch_dims(part) for part in state]


def _used_only(program: ExportedProgram) -> ExportedProgram:
    """``program`` without the weights it does not use: a piece is exported from the whole model, so
    every parameter and buffer is an input of every piece."""
    signature, graph = program.graph_signature, program.graph_module.graph
    unused = {n.name for n in graph.nodes if n.op == "placeholder" and not n.users}
    unused -= {s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT}
    for node in [n for n in graph.nodes if n.name in unused]:
        graph.erase_node(node)
    program.graph_module.recompile()
    specs = [s for s in signature.input_specs if s.arg.name not in unused]
    kept = {s.target for s in specs}
    return ExportedProgram(
        root=program.graph_module, graph=graph, graph_signature=ExportGraphSignature(specs, signature.output_specs),
        state_dict={k: v for k, v in program.state_dict.items() if k in kept},
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        constants={k: v for k, v in program.constants.items() if k in kept}, verifiers=program.verifiers)


def _pieces(num_exits: int) -> List[str]:
    return ["stem"] + [f"{kind}_{k}" for k in range(num_exits) for kind in ("stage", "exit")]


def _files(num_exits: int) -> List[str]:
    """The files of an export with ``num_exits`` exits, besides the manifest."""
    return [f"{piece}.json" for piece in _pieces(num_exits)] + [WEIGHTS]


def _digest(data: bytes) -> Dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# -- what a program may contain ------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.]*")
_OPERATOR = re.compile(r"aten\._?[a-z][a-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*")  # aten's private ops too, no dunders
_OPS = "torch.ops."  # how a program names an operator: torch.ops.aten.conv2d.default
_TARGET = re.compile(rf"{re.escape(_OPS)}{_OPERATOR.pattern}"
                     r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|eq|ne|ge|gt|le|lt)")
_SYMBOL = r"Symbol\('[a-z]+\d+'(?:, [a-z]+=(?:True|False))*\)"  # how torch writes a size symbol
_INTEGER_FUNCTIONS = ("Integer", "Add", "Mul", "FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod", "Max", "Min")
_EXPR_TOKEN = re.compile(rf"{_SYMBOL}|\d+|[A-Za-z]+|[-+*/(), ]")


def _is_size_arithmetic(expr: str) -> bool:
    """What torch's reader gives to sympy (``eval``): size symbols, integers, + - * / and integer
    functions; no powers (9**9**9 would never end), no other names."""
    tokens = _EXPR_TOKEN.findall(expr)
    names = [t for t in tokens if t.isalpha()]
    return "".join(tokens) == expr and "**" not in expr and all(n in _INTEGER_FUNCTIONS for n in names)


_NON_FINITE = frozenset({"Infinity", "-Infinity", "NaN"})  # how torch's JSON writes non-finite floats
_STRINGS = {  # key -> (what its strings must be, check); any other key: a plain name
    "target": ("an aten operator (or getitem / arithmetic)", _TARGET.fullmatch),
    "expr_str": ("arithmetic on size symbols", _is_size_arithmetic),
    "guards_code": ("no guard at all (guards are Python source; exports have none)", lambda s: False),
    "torch_version": ("a version", re.compile(r"[A-Za-z0-9_.+]*").fullmatch),
    "as_string": ("an operator's string argument", lambda s: True),  # passed on as a value, never as code
    "as_strings": ("an operator's string argument", lambda s: True),
    "as_float": ("a float written as a string: Infinity, -Infinity or NaN", _NON_FINITE.__contains__),
    "as_floats": ("a float written as a string: Infinity, -Infinity or NaN", _NON_FINITE.__contains__),
}
_JSON_STRINGS = ("in_spec", "out_spec", "context")  # pytree specs: JSON inside a string, checked in turn




def _check_program(doc: Any, where: str = "program") -> Set[str]:
    """Refuse (ValueError) a program in torch.export's JSON form unless everything torch's reader
    would evaluate is plain: strings are names, calls are aten operators (or getitem / arithmetic),
    symbolic expressions are arithmetic on size symbols, there are no guards (Python source), and it
    is nested at most ``MAX_NESTING`` deep. Returns the operators it calls (``aten.conv2d.default``):
    whether they are allowed is for the caller (:func:`_refuse_unlisted`)."""
    calls: Set[str] = set()

    def fail(path: str, value: Any, expected: str):
        raise ValueError(f"{where}: {path} is {str(value)[:120]!r}, expected {expected}")

    def walk(obj: Any, path: str, key: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if not isinstance(k, str) or not _NAME.fullmatch(k):
                    fail(f"a key in {path or 'the program'}", k, "a plain name")
                walk(v, f"{path}.{k}", k)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", key)
        elif isinstance(obj, str) and key in _JSON_STRINGS:
            try:
                inner = parse_json(obj, path)
            except ValueError:
                fail(path, obj, f"a pytree spec in JSON, nested at most {MAX_NESTING} deep")
            walk(inner, path)
        elif isinstance(obj, str):
            expected, check = _STRINGS.get(key, ("a plain name (letters, digits, _ and .)", _NAME.fullmatch))
            if not check(obj):
                fail(path, obj, expected)
            if key == "target" and obj.startswith(_OPS):
                calls.add(obj[len(_OPS):])
        elif obj is not None and not isinstance(obj, (bool, int, float)):
            fail(path, type(obj).__name__, "JSON")

    if nests_deeper_than(doc, MAX_NESTING):
        raise nested_too_deeply(where)
    walk(doc, "")
    return calls


@lru_cache(maxsize=None)
def listed_operators() -> FrozenSet[str]:
    """The operators exports of timm-exits' models are made of (``aten.conv2d.default``, ...), from the
    package's ``export_operators.json``: the only ones :class:`ExportedModel` runs unless its caller
    allows more by name. Made by ``python tools/export_operators.py``."""
    return frozenset(json.loads((resources.files(__package__) / OPERATORS).read_text())["operators"])


def _allowed(extra_operators: Sequence[str]) -> FrozenSet[str]:
    """The listed operators and ``extra_operators``, each checked to be an aten operator's name."""
    if not isinstance(extra_operators, (list, tuple, set, frozenset)) or not all(
            isinstance(op, str) and _OPERATOR.fullmatch(op) for op in extra_operators):
        raise ValueError(f"extra_operators must be a sequence of aten operator names such as "
                         f"('aten.foo.default',), got {extra_operators!r}")
    return listed_operators() | frozenset(extra_operators)


def _refuse_unlisted(calls: Dict[str, Set[str]], allowed: FrozenSet[str], what: str) -> None:
    """Refuse (ValueError, naming ``what``) programs that call operators not ``allowed``: some aten
    operators write files or shared storage (``aten.from_file`` with ``shared=True`` creates one)."""
    unlisted = {piece: sorted(ops - allowed) for piece, ops in calls.items() if ops - allowed}
    if unlisted:
        names = tuple(sorted({op for ops in unlisted.values() for op in ops}))
        pieces = "; ".join(f"{piece} calls {', '.join(ops)}" for piece, ops in unlisted.items())
        raise ValueError(f"{what}: {pieces}: not among the operators exports of timm-exits' models are made "
                         f"of (some aten operators write files or shared storage, so no other runs). If they "
                         f"are pure, allow them by name when exporting and when loading: export_model(..., "
                         f"extra_operators={names!r}) and ExportedModel(folder, extra_operators={names!r})")


def _strip(obj: Any) -> Any:
    """The program without debug metadata (stack traces with the exporter's paths, module stacks) and
    without guards: torch compiles guards (Python source) only for a program with example inputs,
    which an export does not keep (:meth:`ExportedModel.forward_stem` checks the input shape)."""
    if isinstance(obj, dict):
        return {k: {} if k == "metadata" else [] if k == "guards_code" else _strip(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# -- writing -------------------------------------------------------------------------------------

@torch.no_grad()
def _strides(t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tuple[int, ...]:
    """The strides a new tensor shaped like ``t`` gets in ``memory_format`` (where a size-1 dimension makes
    a tensor contiguous in both layouts, its strides still tell which one it was made in)."""
    return torch.empty_like(t, memory_format=memory_format).stride()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of a 4-D tensor with channels-last strides (``.contiguous(memory_format=...)`` keeps the
    old strides of a tensor contiguous in both layouts)."""
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


class _Pieces(NamedTuple):
    """Every piece of a model exported, in memory: what :func:`export_model` writes."""
    programs: Dict[str, bytes]  # file name -> program (stripped, checked JSON)
    calls: Dict[str, Set[str]]  # file name -> the operators its program calls
    weights: Dict[str, torch.Tensor]
    channels_last: List[str]


def _export_pieces(model: nn.Module, example: torch.Tensor, where: str) -> _Pieces:
    """Export every piece of ``model`` (put in eval mode) for inputs shaped like ``example``, with a
    dynamic batch size; each program is checked as the loader checks it (``where`` names the model)."""
    model.eval()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised
    weights: Dict[str, torch.Tensor] = {}
    channels_last: List[str] = []
    programs: Dict[str, bytes] = {}
    calls: Dict[str, Set[str]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        weights[key] = value.detach().contiguous()
        if value.dim() == 4 and value.stride() == _strides(value, torch.channels_last) != _strides(value):
            channels_last.append(key)

    def add(piece: str, module: _Piece, arg) -> None:
        program = _used_only(export(module, (arg,), dynamic_shapes=(_batch_dims(arg),)))
        for key, value in program.state_dict.items():
            keep(key, value)
        for key, value in program.constants.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{piece} holds a {type(value).__name__} constant ({key}); only tensors can be "
                                 f"exported (other objects would need pickling)")
            keep(f"{piece}/{key}", value)
        doc = _strip(json.loads(serialize(program, serialize_state_dict=False, serialize_constants=False,
                                          serialize_example_inputs=False).exported_program))
        calls[f"{piece}.json"] = _check_program(doc, f"{piece} of {where}")  # never write what the loader refuses
        data = programs[f"{piece}.json"] = json.dumps(doc).encode()
        if len(data) > MAX_PROGRAM_BYTES:
            raise ValueError(f"{piece} of {where} is a program of {len(data)} bytes, more than ExportedModel "
                             f"reads ({MAX_PROGRAM_BYTES})")

    add("stem", _Piece(model, "stem"), example)
    state = model.forward_stem(example)
    for k in range(model.num_exits):
        add(f"stage_{k}", _Piece(model, "stage", k), state)
        state = model.forward_stage(state, k)
        add(f"exit_{k}", _Piece(model, "exit", k), state)
    return _Pieces(programs, calls, weights, channels_last)


def exported_operators(model: nn.Module, example: torch.Tensor) -> Set[str]:
    """The operators an export of ``model`` for inputs shaped like ``example`` calls (nothing is
    written): how the package's list (:func:`listed_operators`) is made.

    Args:
        model: a multi-exit model (stem, stages, exits).
        example: an input batch ``(N, C, H, W)``.

    Returns:
        The operators' names, such as ``"aten.conv2d.default"``.
    """
    return set().union(*_export_pieces(model, example, type(model).__name__).calls.values())


def _preprocessing(given: Dict[str, Any], shape: List[int], name) -> Dict[str, Any]:
    """The preprocessing an export records: timm's data config keys (:data:`~timm_exits.values.PREPROCESSING`)
    checked as a config's (a single mean or std repeated per channel), the input size the export's."""

    unknown = sorted(set(given) - set(PREPROCESSING))
    if unknown:
        raise ValueError(f"{name('')} has keys {unknown}; expected some of {', '.join(PREPROCESSING)}")
    values = check_preprocessing({k: v for k, v in given.items() if v is not None}, name, shape[0])
    size = values.get("input_size")
    if size is not None and list(size) != shape:
        raise ValueError(f"{name('input_size')} is {list(size)}, but the export takes inputs of shape {shape}")
    return {**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}, "input_size": shape}


def _described(model: nn.Module, example: torch.Tensor, data_config: Optional[Dict[str, Any]],
               label_names: Optional[Sequence[str]], thresholds: Optional[Thresholds]) -> Dict[str, Any]:
    """The manifest's account of what a deployment needs (number of classes; preprocessing, class
    names and thresholds if given), each checked against the model being exported."""
    shape = list(example.shape[1:])
    with torch.no_grad():  # the contract's pieces: the stem, every stage, the last exit
        state = model.forward_stem(example[:1])
        for k in range(model.num_exits):
            state = model.forward_stage(state, k)
        num_classes = model.forward_exit(state, model.num_exits - 1).shape[-1]
    out: Dict[str, Any] = {"num_classes": num_classes}
    if data_config is not None:
        keys = {k: v for k, v in data_config.items() if k != "crop_mode"}  # timm's resolved config has it
        out["preprocessing"] = _preprocessing(keys, shape, lambda key: f"data_config[{key!r}]" if key else "data_config")
    if label_names is not None:
        if isinstance(label_names, str) or len(label_names) != num_classes or \
                not all(isinstance(n, str) for n in label_names):
            raise ValueError(f"label_names must be {num_classes} class names (one per output), got {label_names!r}")
        out["label_names"] = list(label_names)
    if thresholds is not None:
        if not isinstance(thresholds, Thresholds):
            raise ValueError(f"thresholds must be a timm_exits.inference.Thresholds (Thresholds.load(path)), got "
                             f"{type(thresholds).__name__}")
        EarlyExitExecutor(model, thresholds)  # refuses another predictor, other weights, another count
        if thresholds.input_size is not None and thresholds.input_size != shape:
            raise ValueError(f"the thresholds were fitted at input size {thresholds.input_size}, the export takes "
                             f"{shape}: export with an example of that size, or fit thresholds at this one")
        out["thresholds"] = asdict(thresholds)
    return out


def export_model(model: nn.Module, example: torch.Tensor, folder: str, name: str = "",
                 extra_operators: Sequence[str] = (), data_config: Optional[Dict[str, Any]] = None,
                 label_names: Optional[Sequence[str]] = None, thresholds: Optional[Thresholds] = None) -> List[str]:
    """Export every piece of ``model`` (in eval mode) for inputs shaped like ``example``; the batch
    size stays dynamic. The folder is replaced whole or not at all (the previous export survives
    until the new one is complete). Get the manifest's digest, to pin the export, with
    :func:`manifest_sha256`.

    A program may call only the operators exports of timm-exits' models are made of
    (:func:`listed_operators`) and ``extra_operators``; another is refused (ValueError naming it)
    before anything is written.

    The manifest also records what is given of ``data_config``, ``label_names`` and ``thresholds``,
    each checked against the model; :class:`ExportedModel` exposes them.

    Args:
        model: a multi-exit model (stem, stages, exits).
        example: an input batch ``(N, C, H, W)``; the export takes inputs of its ``(C, H, W)``.
        folder: where the export goes: a missing or empty folder, or an earlier export (anything
            else is refused with a FileExistsError).
        name: the model's name recorded in the manifest.
        extra_operators: pure operators a model of your own needs beyond the listed ones, such as
            ``("aten.foo.default",)``; :class:`ExportedModel` must be given them too.
        data_config: the preprocessing (timm's ``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``; the input size must be the example's).
        label_names: the class names in the order of the outputs.
        thresholds: the :class:`~timm_exits.inference.budgeted.Thresholds` to exit with (fitted on
            this model's weights and answers, at this input size).

    Returns:
        The file names written, besides the manifest.
    """
    allowed = _allowed(extra_operators)
    where = name or type(model).__name__
    programs, calls, weights, channels_last = _export_pieces(model, example, where)
    _refuse_unlisted(calls, allowed, where)
    described = _described(model, example, data_config, label_names, thresholds)
    files = _files(model.num_exits)
    with atomic_folder(folder, kind="export", legacy=_earlier_export) as tmp:
        digests = {}
        for file, data in programs.items():
            with open(os.path.join(tmp, file), "wb") as f:
                f.write(data)
            digests[file] = _digest(data)
        write_weights(weights, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, WEIGHTS), "rb") as f:
            digests[WEIGHTS] = _digest(f.read())
        manifest = {"format_version": FORMAT_VERSION, "model": name, "num_exits": model.num_exits,
                    "input_shape": list(example.shape[1:]), "predictor": predictor_of(model),
                    "channels_last": sorted(set(channels_last)), "torch_version": torch.__version__,
                    "weights_sha256": weights_sha256(model), **described,
                    "files": {file: digests[file] for file in files}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    return files


# -- reading -------------------------------------------------------------------------------------

def _inputs(doc: Dict[str, Any], piece: str, weights: Dict[str, torch.Tensor]) -> Tuple[dict, dict]:
    """The weights a program takes, as torch's reader wants them: parameters (as ``nn.Parameter``)
    and persistent buffers by name, tensor constants and non-persistent buffers as the program's own."""
    state, constants = {}, {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        (kind, value), = spec.items()
        if kind == "parameter":
            state[value["parameter_name"]] = nn.Parameter(weights[value["parameter_name"]], requires_grad=False)
        elif kind == "buffer" and value["persistent"]:
            state[value["buffer_name"]] = weights[value["buffer_name"]]
        elif kind in ("buffer", "tensor_constant"):
            name = value["buffer_name" if kind == "buffer" else "tensor_constant_name"]
            constants[name] = weights[f"{piece}/{name}"]
        elif kind != "user_input":
            raise ValueError(f"a {kind!r} input, which exports never have")
    return state, constants


def _unusable(folder: str, what: str) -> ValueError:
    return ValueError(f"{folder} is not a usable export: {what}; re-export the model with "
                      f"timm_exits.inference.export_model")


def _manifest_bytes(folder: str) -> bytes:
    """The bytes of ``folder``'s manifest.json, at most ``MAX_MANIFEST_BYTES`` of them."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no manifest.json: not a folder written by export_model")
    with open(path, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise _unusable(folder, f"manifest.json has more than {MAX_MANIFEST_BYTES} bytes (an export's has a few "
                                f"thousand)")
    return data


def _earlier_export(folder: str) -> bool:
    """Whether ``folder`` holds an export written before exports were marked, and nothing else: its
    manifest.json and exactly the files that lists."""
    try:
        listed = parse_json(_manifest_bytes(folder), "manifest.json")["files"]
        return set(os.listdir(folder)) == {"manifest.json", *listed}
    except (OSError, ValueError, KeyError, TypeError):
        return False


def manifest_sha256(folder: str) -> str:
    """The SHA-256 digest (hex) of the manifest of the export in ``folder``. The manifest holds the
    digest of every other file, so this one digest pins the whole export:
    ``ExportedModel(folder, expected_manifest_sha256=...)`` loads it and nothing else."""
    return hashlib.sha256(_manifest_bytes(folder)).hexdigest()


_SHA256 = re.compile(r"[0-9a-f]{64}")


class ExportedModel:
    """An exported multi-exit model loaded from its folder: the manifest is checked (its pinned
    digest if given, version, files, digests), then each program (:func:`_check_program`, and the
    operators it calls: :func:`listed_operators` and ``extra_operators``); nothing is unpickled and
    nothing runs before every check passed. A folder that fails a check is refused with a ValueError
    that says what is wrong.

    The digests in the manifest tell that no file changed since export (integrity), not who wrote
    the export: anyone can rewrite them.

    Args:
        folder: the folder :func:`export_model` wrote.
        extra_operators: operators allowed beyond the listed ones, the same ones given to
            :func:`export_model`.
        expected_manifest_sha256: the manifest digest of the export you trust (from
            :func:`manifest_sha256`); any other manifest is refused before anything else is read.
            ``None`` does not pin the export.
    """

    def __init__(self, folder: str, extra_operators: Sequence[str] = (),
                 expected_manifest_sha256: Optional[str] = None):
        if expected_manifest_sha256 is not None and not (
                isinstance(expected_manifest_sha256, str) and _SHA256.fullmatch(expected_manifest_sha256.lower())):
            raise ValueError(f"expected_manifest_sha256 must be a SHA-256 digest in hex (64 digits, as "
                             f"manifest_sha256 gives it), got {expected_manifest_sha256!r}")
        allowed = _allowed(extra_operators)
        self.folder = folder
        manifest = self._manifest(expected_manifest_sha256)
        self.name, self.num_exits = manifest["model"], manifest["num_exits"]
        self.input_shape = tuple(manifest["input_shape"])
        self.predictor = manifest.get("predictor", "exits")  # what the executor checks thresholds against
        self.torch_version = manifest.get("torch_version", "?")
        self.weights_sha256 = manifest.get("weights_sha256")  # what thresholds were fitted on (older exports: None)
        # what a deployment needs, if the export records it (else None)
        self.num_classes: Optional[int] = manifest.get("num_classes")
        self.data_config: Optional[Dict[str, Any]] = manifest.get("preprocessing")
        self.label_names: Optional[List[str]] = manifest.get("label_names")
        self.thresholds: Optional[Thresholds] = manifest.get("thresholds")
        data = {file: self._read(file, entry) for file, entry in manifest["files"].items()}
        try:
            weights = load_safetensors(data[WEIGHTS])
        except SafetensorError as e:
            raise self._refuse(f"{WEIGHTS} is not a safetensors file ({e})") from None
        for name in manifest.get("channels_last", []):  # older exports: none
            if name not in weights or weights[name].dim() != 4:
                raise self._refuse(f"manifest.json lists {name!r} as a channels-last weight, but {WEIGHTS} has no "
                                   f"4-D tensor of that name")
            weights[name] = _channels_last(weights[name])
        files = [f"{piece}.json" for piece in _pieces(self.num_exits)]
        docs, calls = {}, {}
        for file in files:
            try:
                docs[file] = parse_json(data[file], file)
                calls[file] = _check_program(docs[file], file)
            except ValueError as e:
                raise self._refuse(str(e)) from None
        _refuse_unlisted(calls, allowed, f"{self.folder} is refused")
        self.stem, *pieces = [self._program(file, data[file], docs[file], weights) for file in files]
        self.stages, self.exits = pieces[0::2], pieces[1::2]

    def _refuse(self, what: str) -> ValueError:
        return _unusable(self.folder, what)

    def _manifest(self, expected_sha256: Optional[str]) -> Dict[str, Any]:
        data = _manifest_bytes(self.folder)
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ValueError(f"{self.folder}: manifest.json has SHA-256 {digest}, not the pinned {expected_sha256}: "
                             f"not the export you pinned (changed since, or another one); nothing else was read")
        try:
            manifest = parse_json(data, "manifest.json")
        except ValueError as e:
            raise self._refuse(str(e)) from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise self._refuse(f"manifest.json has format version {version!r}, this timm-exits reads version "
                               f"{FORMAT_VERSION}")
        num_exits, files = manifest.get("num_exits"), manifest.get("files")
        shape = manifest.get("input_shape")
        if not isinstance(num_exits, int) or isinstance(num_exits, bool) or num_exits < 1:
            raise self._refuse(f"manifest.json has num_exits {num_exits!r}, expected a positive integer")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape)):
            raise self._refuse(f"manifest.json has input_shape {shape!r}, expected a list of positive integers")
        if not isinstance(manifest.get("model"), str):
            raise self._refuse("manifest.json has no model name")
        layouts = manifest.get("channels_last", [])
        if not (isinstance(layouts, list) and all(isinstance(name, str) for name in layouts)):
            raise self._refuse(f"manifest.json has channels_last {layouts!r}, expected a list of weight names")
        if not known_predictor(manifest.get("predictor", "exits")):
            raise self._refuse(f"manifest.json has predictor {manifest['predictor']!r}, expected {predictor_choices()}")
        identity = manifest.get("weights_sha256")
        if identity is not None and not (isinstance(identity, str) and _SHA256.fullmatch(identity)):
            raise self._refuse(f"manifest.json has weights_sha256 {str(identity)[:80]!r}, expected a SHA-256 digest")
        self._check_description(manifest)
        if not isinstance(files, dict) or num_exits > len(files):  # bounded before listing num_exits' files
            listing = f"lists {len(files)}" if isinstance(files, dict) else "has no mapping of files to digests"
            raise self._refuse(f"manifest.json has num_exits {num_exits}, which needs {2 * num_exits + 2} files "
                               f"(the stem, a stage and an exit per exit, {WEIGHTS}), but it {listing}")
        expected, listed = _files(num_exits), sorted(files)
        if listed != sorted(expected):
            missing, extra = sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected))
            last = num_exits - 1
            raise self._refuse(f"manifest.json has num_exits {num_exits}, which needs the stem, stage_0..{last}"
                               f" and exit_0..{last} programs and {WEIGHTS}, but lists other files (missing "
                               f"{missing}, unexpected {extra})")
        return manifest

    def _check_description(self, manifest: Dict[str, Any]) -> None:
        """The manifest's number of classes, preprocessing, class names and thresholds (each optional),
        checked as :func:`export_model` checks them; the thresholds are made a :class:`Thresholds`."""
        num_classes, names = manifest.get("num_classes"), manifest.get("label_names")
        if num_classes is not None and (type(num_classes) is not int or num_classes < 1):
            raise self._refuse(f"manifest.json has num_classes {num_classes!r}, expected a positive integer")
        if names is not None and not (isinstance(names, list) and len(names) == num_classes
                                      and all(isinstance(n, str) for n in names)):
            raise self._refuse(f"manifest.json has label_names {str(names)[:80]}, expected a list of {num_classes} "
                               f"class names (num_classes)")
        if manifest.get("preprocessing") is not None:
            given = manifest["preprocessing"]
            try:
                if not isinstance(given, dict):
                    raise ValueError(f"manifest.json has preprocessing {str(given)[:80]}, expected a mapping")
                _preprocessing(given, manifest["input_shape"],
                               lambda key: f"manifest.json: preprocessing.{key}" if key else "manifest.json: preprocessing")
                if given.get("input_size") is None:
                    raise ValueError("manifest.json: preprocessing has no input_size")
            except ValueError as e:
                raise self._refuse(str(e)) from None
        fitted = manifest.get("thresholds")
        if fitted is not None:
            try:
                fitted = manifest["thresholds"] = Thresholds(**fitted)
            except (TypeError, ValueError) as e:
                raise self._refuse(f"manifest.json has thresholds that are not a thresholds file's ({str(e)[:200]})") \
                    from None
            mismatch = [f"{key} {mine!r} (the export's: {theirs!r})" for key, mine, theirs in (
                ("num_exits", fitted.num_exits, manifest["num_exits"]), ("predictor", fitted.predictor,
                 manifest.get("predictor", "exits")), ("weights", fitted.weights, manifest.get("weights_sha256")),
                ("input_size", fitted.input_size, manifest["input_shape"])) if mine is not None and mine != theirs]
            if mismatch:
                raise self._refuse(f"manifest.json has thresholds for another model: {', '.join(mismatch)}")

    def _read(self, file: str, entry: Any) -> bytes:
        """The bytes of ``file``, checked against its size and digest in the manifest."""
        path = os.path.join(self.folder, file)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise self._refuse(f"manifest.json has no sha256 digest and size for {file}")
        if file != WEIGHTS and entry["bytes"] > MAX_PROGRAM_BYTES:
            raise self._refuse(f"manifest.json gives {file} {entry['bytes']} bytes, more than a program may have "
                               f"({MAX_PROGRAM_BYTES})")
        if not os.path.isfile(path):
            raise self._refuse(f"{file} is missing")
        if os.path.getsize(path) != entry["bytes"]:
            raise self._refuse(f"{file} has {os.path.getsize(path)} bytes, the manifest says {entry['bytes']}")
        with open(path, "rb") as f:
            data = f.read(entry["bytes"])  # never more than the manifest says, should the file grow meanwhile
        if _digest(data)["sha256"] != entry["sha256"]:
            raise self._refuse(f"{file} does not match its SHA-256 digest in the manifest (changed since export)")
        return data

    def _program(self, file: str, data: bytes, doc: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> nn.Module:
        """The runnable module of one piece: its program (``data``, checked: ``doc``) read by torch with
        its weights."""
        try:
            state, constants = _inputs(doc, file[:-len(".json")], weights)
        except KeyError as e:
            raise self._refuse(f"{file} needs {e}, which {WEIGHTS} (or the program) does not have") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise self._refuse(f"{file} is not a program of an export ({e})") from None
        try:
            return deserialize(SerializedArtifact(data, state, constants, None)).module()
        except Exception as e:  # a program torch cannot read: another torch version, or edited
            raise self._refuse(f"torch {torch.__version__} cannot read {file} (exported with torch "
                               f"{self.torch_version}): {type(e).__name__}: {str(e)[:200]}") from None

    def forward_stem(self, x: torch.Tensor):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return self.stem(x)

    def forward_stage(self, state, index: int):
        """Run one stage.

        Args:
            state: the stem's or the previous stage's output.
            index: the stage (0-based).

        Returns:
            The state after that stage.
        """
        return self.stages[index](state)

    def forward_exit(self, state, index: int) -> torch.Tensor:
        """Run one exit.

        Args:
            state: the output of stage ``index``.
            index: the exit (0-based).

        Returns:
            The exit's logits, ``(batch, classes)``.
        """
        return self.exits[index](state)

    def forward_exits(self, x: torch.Tensor) -> List[torch.Tensor]:
        state, out = self.forward_stem(x), []
        for k in range(self.num_exits):
            state = self.forward_stage(state, k)
            out.append(self.forward_exit(state, k))
        return out

    def early_exit(self, x: torch.Tensor, thresholds: Optional[Sequence[float]] = None, policy: str = "maxprob"):
        """Early-exit inference with the exported programs (see :class:`EarlyExitExecutor`).

        Args:
            x: an input batch of the export's input shape.
            thresholds: one per exit, or a :class:`Thresholds` (its policy is used); ``None``: those
                the export records.
            policy: an :class:`~timm_exits.inference.policies.ExitPolicy` or a score name, for
                thresholds given as numbers.

        Returns:
            The :class:`~timm_exits.inference.executor.ExitResult` of the batch.
        """
        if thresholds is None and self.thresholds is None:
            raise ValueError(f"{self.folder} records no thresholds: pass thresholds (one per exit, or a Thresholds), "
                             f"or export with thresholds=")
        return EarlyExitExecutor(self, self.thresholds if thresholds is None else thresholds, policy)(x)
