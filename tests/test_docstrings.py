"""The public API documents its parameters the way timm and mmengine do: every public function or
method of the package that takes two or more parameters (besides ``self`` / ``cls``) has an
``Args:`` section, unless it overrides a documented method of a base class (whose docstring applies)."""
import ast
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parameters(node: ast.FunctionDef) -> int:
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def undocumented(path: Path, module) -> list:
    """``module:qualname`` of the public functions and methods in ``path`` with >= 2 parameters and no
    ``Args:`` section; a method that overrides one of a base class is left out."""
    missing = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            if _parameters(node) >= 2 and "Args:" not in (ast.get_docstring(node) or ""):
                missing.append(f"{module.__name__}:{node.name}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            cls = getattr(module, node.name)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef) or item.name.startswith("_") or _parameters(item) < 2:
                    continue
                inherited = any(item.name in vars(base) for base in inspect.getmro(cls)[1:])
                if not inherited and "Args:" not in (ast.get_docstring(item) or ""):
                    missing.append(f"{module.__name__}:{node.name}.{item.name}")
    return missing


def test_public_functions_document_their_arguments():
    missing = []
    for path in sorted((ROOT / "timm_exits").rglob("*.py")):
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        missing += undocumented(path, importlib.import_module(dotted))
    assert not missing, f"{len(missing)} without an Args: section:\n" + "\n".join(missing)


def test_the_check_finds_an_undocumented_function_and_spares_an_override(tmp_path):
    import types

    source = ('def f(a, b):\n    """No sections."""\n'
              'class Base:\n    def step(self, a, b):\n        """Args:\n            a: x\n            b: y"""\n'
              'class Child(Base):\n    def step(self, a, b):\n        return a\n    def other(self, a, b):\n        pass\n')
    path = tmp_path / "m.py"
    path.write_text(source)
    module = types.ModuleType("m")
    exec(source, module.__dict__)
    assert undocumented(path, module) == ["m:f", "m:Child.other"]
