"""The ``timm-exits`` console script.

Importing ``timm_exits`` registers its models with timm, which imports torch and timm (seconds).
``timm-exits --help`` and ``timm-exits <command> --help`` need neither: they are answered from
``timm_exits/cli.py`` loaded on its own (it imports nothing heavy at module level); every other
invocation runs :func:`timm_exits.cli.main`.
"""
import importlib.util
import os
import sys

_HELP = ("-h", "--help")


def _wants_help_only(argv: list) -> bool:
    if not argv or argv[0] in _HELP:
        return True
    return argv[0] not in ("train", "launch") and len(argv) >= 2 and any(a in _HELP for a in argv[1:])


def main() -> int:
    argv = sys.argv[1:]
    if _wants_help_only(argv):
        origin = importlib.util.find_spec("timm_exits").submodule_search_locations[0]  # no import of the package
        spec = importlib.util.spec_from_file_location("_timm_exits_cli_help", os.path.join(origin, "cli.py"))
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        cli.build_parser().parse_args(argv)  # prints the help (or a usage error) and exits
        return 0
    from timm_exits.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
