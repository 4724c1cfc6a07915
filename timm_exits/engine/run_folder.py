"""A run folder: its files, its record (run.json), claiming it, and what a resumed run may change."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, List

from accelerate import Accelerator

from ..config import phase_configs
from ..files import OutputLock, check_writable, claim_fresh_folder, read_json, write_json
from ..model_folder import CONFIG_FILE, WEIGHTS_FILE
from .checks import batch_plan


RUN_FILE = "run.json"  # the resolved config, the process count and the identity of the run in a folder
LOG_FILE = "log.txt"  # every line the run printed, in the run folder
RUN_FILES = (RUN_FILE, "results.json", LOG_FILE)  # the files of a run folder, and of each phase's folder
SUMMARY_FILE = "summary.csv"  # a row per epoch, in each phase's folder
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")  # timm's; then per exit
PHASE_FILES = (WEIGHTS_FILE, CONFIG_FILE, "evaluation.json", "evaluation.png", SUMMARY_FILE)
SAFE_TO_CHANGE = ("data.dir", "data.workers", "data.eval_batch_size", "train.log_every", "train.checkpoint_every",
                  "tracker", "output_dir", "evaluation.policy", "evaluation.q_grid", "evaluation.convention")


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def resume_changes(saved: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, List[str]]:
    """What differs between a run's saved config and the config it is resumed with, leaving out
    :data:`SAFE_TO_CHANGE`.

    Args:
        saved: the config the run was started with (its ``run.json``).
        config: the config it is resumed with.

    Returns:
        ``{phase: ["key: old -> new", ...]}`` for the phases that differ (``{'phases': [...]}`` if
        the phases' names differ); empty if nothing does.
    """
    normal = lambda c: json.loads(json.dumps(c, default=str))  # noqa: E731  (tuples as lists, as saved)
    old, new = dict(phase_configs(normal(saved))), dict(phase_configs(normal(config)))
    if list(old) != list(new):
        return {"phases": [f"names: {list(old)} -> {list(new)}"]}
    changes = {}
    for name in old:
        a, b = _flat(old[name]), _flat(new[name])
        differ = [k for k in sorted(a.keys() | b.keys()) if a.get(k, "<unset>") != b.get(k, "<unset>")
                  and k not in SAFE_TO_CHANGE]
        if differ:
            changes[name] = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in differ]
    return changes


def check_files(folder: str, names: tuple) -> None:
    """Refuse a run folder where something other than a file sits in the place of one of its files.

    Args:
        folder: the run folder.
        names: the names of its files.

    Raises:
        FileExistsError: a directory, a link or a special file has one of the names.
    """
    for name in names:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            raise FileExistsError(f"{path!r} is not a file; the run writes its {name} there: move it away, or "
                                  f"choose another --output-dir")


def class_difference(old: List[str], new: List[str]) -> str:
    """What differs between the class names a run was trained on and those of the data.

    Args:
        old: the class names the run was trained on, in index order.
        new: the data's, in index order.

    Returns:
        A sentence (for an error message).
    """
    if sorted(old) == sorted(new):
        moved = [f"{a!r} -> {b!r}" for a, b in zip(old, new) if a != b]
        return f"the same {len(old)} names in another order (index by index: {', '.join(moved[:5])})"
    gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
    return f"trained on {len(old)} classes, the data has {len(new)}; missing: {gone[:5]}, not trained on: {added[:5]}"


def _read_run_file(path: str) -> Dict[str, Any]:
    """A run folder's ``run.json``, checked to be one this package wrote."""
    try:
        saved = read_json(path)
    except (OSError, ValueError) as e:
        problem = f"cannot be read as JSON ({e})"
    else:
        processes = saved.get("processes") if isinstance(saved, dict) else None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            problem = "is not a timm-exits run record (expected a mapping with the run's 'config')"
        elif type(processes) is not int or processes < 1:
            problem = f"records {processes!r} processes, expected an integer >= 1"
        elif not isinstance(saved.get("run_id", ""), str):
            problem = f"records run_id {saved['run_id']!r}, expected a string"
        else:
            return saved
    raise ValueError(f"{path!r} {problem}: the run's record is damaged; restore it from a copy, or start a new run in "
                     f"another --output-dir")


def saved_checkpoint(lock: OutputLock) -> bool:
    """Whether the run in the locked folder saved a checkpoint since it locked it (its own, or a phase's)."""
    added = set(os.listdir(lock.folder)) - lock.found
    return any(os.path.isdir(os.path.join(lock.folder, name, "checkpoint")) for name in added) or \
        "checkpoint" in added


def _holds_run(folder: str) -> bool:
    """Whether ``folder`` holds a run's output: its results or a checkpoint (its own, or a phase's). A
    ``run.json`` alone is a run killed before its first checkpoint: nothing to keep or resume."""
    if not os.path.isdir(folder):
        return False
    if any(os.path.exists(os.path.join(folder, f)) for f in ("results.json", "checkpoint")):
        return True
    return any(os.path.isdir(os.path.join(folder, name, "checkpoint")) for name in os.listdir(folder))


def claim_output_dir(accelerator: Accelerator, config: Dict[str, Any], resume: bool, extend_epochs: bool):
    """Lock the run's output folder (the main process, for the whole run) and check a resumed run's
    config; writes the run's ``run.json``.

    Args:
        accelerator: the run's accelerator (its number of processes).
        config: the resolved config; ``output_dir`` is the folder wanted.
        resume, extend_epochs: as in :func:`~timm_exits.engine.run.run`.

    Returns:
        The :class:`~timm_exits.files.OutputLock` (its ``folder`` is the one taken), the phases
        whose epochs are extended and the run's identity.
    """
    wanted = config["output_dir"]
    batches = {name: batch_plan(phase, accelerator.num_processes) for name, phase in phase_configs(config)}
    if resume:  # the run in that folder, or an error if another process has it
        lock = OutputLock(wanted, check_writable(wanted))
    else:
        lock = claim_fresh_folder(wanted, _holds_run)
    candidate = lock.folder
    if candidate != wanted:
        accelerator.print(f"{wanted} holds another run (--resume continues it); this run writes to {candidate}")
    check_files(candidate, RUN_FILES)
    run_file, extended = os.path.join(candidate, RUN_FILE), []
    record = {"config": config, "processes": accelerator.num_processes, "batches": batches,
              "run_id": uuid.uuid4().hex}
    if resume and os.path.isfile(run_file):
        saved = _read_run_file(run_file)
        record["run_id"] = saved.get("run_id", record["run_id"])  # a run of an older version has none
        if saved["processes"] != accelerator.num_processes:
            raise ValueError(f"the run in {candidate} used {saved['processes']} processes, this one has "
                             f"{accelerator.num_processes}: resume it with the same number (accelerate launch "
                             f"--num_processes {saved['processes']}), or start a new run")
        changes = resume_changes(saved["config"], config)
        extended = _extensions(changes, saved["config"], config, candidate) if extend_epochs else []
        changes = {phase: c for phase, c in changes.items() if phase not in extended}
        if changes:
            listed = "; ".join(f"phase {phase!r}: {', '.join(c)}" for phase, c in changes.items())
            raise ValueError(f"--resume: the config differs from the one the run in {candidate} was started with "
                             f"({listed}). Resume with the same config (only {', '.join(SAFE_TO_CHANGE)} may "
                             f"change; more train.epochs with --extend-epochs), or start a new run")
    elif resume and _holds_run(candidate):
        accelerator.print(f"--resume: {candidate} has no {RUN_FILE} (a run of an older version): its config cannot "
                          f"be checked; resuming with this one")
    elif resume:
        accelerator.print(f"--resume: {candidate} holds no run to continue; starting a fresh run")
    write_json(run_file, record, default=str)
    return lock, extended, record["run_id"]


def _extensions(changes: Dict[str, List[str]], saved: Dict[str, Any], config: Dict[str, Any], folder: str) -> List[str]:
    """The phases whose only change is more ``train.epochs`` (checked: no later phase has started
    from their weights yet)."""
    old, new = dict(phase_configs(saved)), dict(phase_configs(config))
    names, extended = list(new), []
    for name, change in changes.items():
        if any(not c.startswith("train.epochs:") for c in change) or new[name]["train"]["epochs"] < old[name]["train"]["epochs"]:
            continue
        later = [n for n in names[names.index(name) + 1:] if os.path.isdir(os.path.join(folder, n, "checkpoint"))]
        if later:
            raise ValueError(f"--extend-epochs: phase {name!r} cannot train longer, phase {later[0]!r} already started "
                             f"from its weights; extend the last phase only, or start a new run")
        extended.append(name)
    return extended
