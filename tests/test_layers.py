"""Imports run down the layers only. Every module of the package is parsed (``ast``, nothing is
imported) and each import of a package module, at the top or inside a function, is checked
against the table below: a module may import its own layer and the layers below it, never one
above, and ``train`` and ``inference`` (siblings) never each other."""
import ast
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "timm_exits"

# bottom to top; a module's layer is the first whose patterns match its path (relative to the
# repository). The package's __init__ registers the models and names the public API: top.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("base", ("timm_exits/errors.py", "timm_exits/files.py", "timm_exits/cpu.py", "timm_exits/values.py",
              "timm_exits/quotas.py")),
    # profile.py counts the cost of a model (part of the multi-exit contract); catalogue.py lists them
    ("models", ("timm_exits/models/*", "timm_exits/profile.py", "timm_exits/catalogue.py")),
    ("train", ("timm_exits/train/*",)),
    ("inference", ("timm_exits/inference/*",)),
    ("engine", ("timm_exits/engine/*", "timm_exits/config.py", "timm_exits/data.py", "timm_exits/checkpoint.py",
                "timm_exits/model_folder.py", "timm_exits/task.py")),
    ("integrations", ("timm_exits/integrations/*",)),
    ("cli", ("timm_exits/cli.py", "timm_exits_cli.py", "timm_exits/__init__.py")),
]
SIBLINGS = {frozenset({"train", "inference"})}  # the same height, and independent of each other
RANK = {"base": 0, "models": 1, "train": 2, "inference": 2, "engine": 3, "integrations": 4, "cli": 5}

# inside models/: the multi-exit contract that every family builds on names no family
CONTRACT = ("timm_exits/models/multi_exit.py", "timm_exits/models/capabilities.py",
            "timm_exits/models/training_outputs.py", "timm_exits/models/branch_gradients.py")

# imports up the layers not fixed yet, each with why: to be emptied, never added to


def layer_of(path: str) -> Optional[str]:
    for name, patterns in LAYERS:
        if any(fnmatch(path, pattern) for pattern in patterns):
            return name
    return None


def module_path(dotted: str) -> Optional[str]:
    """The repository path of a package module (``timm_exits.models.exits``), None if it is none."""
    base = ROOT.joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT).as_posix()
    return None


def package_modules() -> Iterator[str]:
    yield "timm_exits_cli.py"
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix()


def imported_modules(path: str, source: str) -> Iterator[Tuple[int, Optional[str]]]:
    """(line, repository path) of every package module the module at ``path`` imports in ``source``,
    anywhere in it. ``from A import b`` imports module ``A.b`` if there is one, else ``A`` (its
    ``__init__``); a module that does not exist is None."""
    package = path[:-len(".py")].split("/")[:-1]  # a module's package; an __init__'s is its own
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "timm_exits":
                    yield node.lineno, module_path(alias.name)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else []
            source_module = ".".join(anchor + ([node.module] if node.module else []))
            if source_module.split(".")[0] != "timm_exits":
                continue
            for alias in node.names:
                yield node.lineno, module_path(f"{source_module}.{alias.name}") or module_path(source_module)


def violations_of(path: str, source: str) -> Dict[str, str]:
    """``"path -> imported"``: what is wrong, for every import up the layers in the module at ``path``."""
    layer, found = layer_of(path), {}
    assert layer is not None, f"{path} is in no layer: add it to LAYERS"
    for line, target in imported_modules(path, source):
        assert target is not None, f"{path}:{line} imports a module that does not exist"
        other = layer_of(target)
        assert other is not None, f"{target} is in no layer: add it to LAYERS"
        if RANK[other] > RANK[layer] or (other != layer and frozenset({layer, other}) in SIBLINGS):
            found[f"{path} -> {target}"] = f"{path}:{line}: {layer} imports {other} ({target})"
        elif path in CONTRACT and target.startswith("timm_exits/models/") and target not in CONTRACT:
            found[f"{path} -> {target}"] = f"{path}:{line}: the multi-exit contract imports a family ({target})"
    return found


def test_imports_run_down_the_layers():
    found = {}
    for path in package_modules():
        found.update(violations_of(path, (ROOT / path).read_text()))
    assert not found, "\n".join(found.values())


def test_the_checker_finds_imports_up_the_layers_anywhere_in_a_module():
    """What the package once had: a model importing train/ inside a method, a model file importing the
    engine's checkpoint, the contract importing a family, train/ importing inference/ (a sibling)."""
    lazy = "class M:\n    def f(self):\n        from ..train.deconfliction import deconflict_branch\n"
    assert list(violations_of("timm_exits/models/multi_exit.py", lazy)) == [
        "timm_exits/models/multi_exit.py -> timm_exits/train/deconfliction.py"]
    assert list(violations_of("timm_exits/models/msdnet.py", "from ..checkpoint import save_checkpoint\n")) == [
        "timm_exits/models/msdnet.py -> timm_exits/checkpoint.py"]
    assert list(violations_of("timm_exits/models/capabilities.py", "from .adaptive_depth import set_depth\n")) == [
        "timm_exits/models/capabilities.py -> timm_exits/models/adaptive_depth.py"]
    assert list(violations_of("timm_exits/train/l2w.py", "import timm_exits.inference.budgeted\n")) == [
        "timm_exits/train/l2w.py -> timm_exits/inference/budgeted.py"]
    assert list(violations_of("timm_exits/integrations/accelerate.py", "from .. import models, profile\n")) == []
    assert list(violations_of("timm_exits/models/__init__.py", "from .. import cli\n")) == [
        "timm_exits/models/__init__.py -> timm_exits/cli.py"]


# the trainers: they run any technique through the trainer interface, and name none
TRAINERS = ("timm_exits/engine/*", "timm_exits/integrations/*", "timm_exits/task.py", "timm_exits/train/loop.py")
OLD_NAMES = ("ce", "ofa", "hdkd", "adn", "boostnet", "ztw", "l2w", "pcgrad")  # the config's former technique strings


def technique_names_in(source: str, names) -> List[str]:
    """The names of ``names`` that ``source`` uses as an identifier, an attribute or a string (docstrings
    aside), each with its line."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else
                node.name if isinstance(node, ast.alias) else
                node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings else None)
        if word is None and isinstance(node, ast.alias):
            word = node.name
        if word is not None and word.split(".")[-1] in names:
            found.append(f"line {getattr(node, 'lineno', '?')}: {word!r}")
    return found


def test_no_trainer_names_a_technique():
    from timm_exits.train.techniques import TECHNIQUES

    names = set(TECHNIQUES) | set(OLD_NAMES)
    trainers = [p for p in package_modules() if any(fnmatch(p, pattern) for pattern in TRAINERS)]
    assert len(trainers) >= 8  # the engine's, mmengine's and the task's modules
    found = {p: technique_names_in((ROOT / p).read_text(), names) for p in trainers}
    assert not {p: f for p, f in found.items() if f}


def test_the_technique_name_check_finds_a_trainer_that_names_one():
    names = {"HDKD", "PCGrad", "hdkd"}
    source = ('"""Runs HDKD."""\nfrom ..train.techniques import HDKD\n'
              'def step(t):\n    """PCGrad too."""\n    return isinstance(t, techniques.PCGrad) or t.loss == "hdkd"\n')
    assert [f.split(":")[1].strip() for f in technique_names_in(source, names)] == ["'HDKD'", "'PCGrad'", "'hdkd'"]
