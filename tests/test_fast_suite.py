"""The default test run is the fast suite: pyproject's addopts leave out the tests marked ``slow``
(multi-process runs, full mmengine Runner runs, long engine runs), which CI runs separately, and every
test file keeps at least one fast test, so the default run still imports and exercises each of them."""
import ast
import shlex
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
OPTIONS = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
SLOW = "pytest.mark.slow"


def _fast_tests(path: Path) -> list[str]:
    """The test functions of a test file that carry no ``slow`` mark, neither their own nor the
    file's (``pytestmark``)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                and SLOW in ast.unparse(node.value)):
            return []
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
            and SLOW not in [ast.unparse(d) for d in node.decorator_list]]


def test_the_default_run_leaves_out_the_registered_slow_marker():
    addopts = shlex.split(OPTIONS["addopts"])
    assert "-m" in addopts and addopts[addopts.index("-m") + 1] == "not slow", addopts
    assert any(marker.startswith("slow:") for marker in OPTIONS["markers"]), OPTIONS.get("markers")


def test_every_test_file_keeps_a_fast_test():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 40
    without = [path.name for path in files if not _fast_tests(path)]
    assert not without, f"no fast test left in {without}: keep one unmarked test per file"
