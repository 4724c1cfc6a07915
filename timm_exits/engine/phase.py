"""One phase of a run: build, resume, train epochs, validate, save, evaluate."""
from __future__ import annotations

import csv
import gc
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import (gather_object, set_seed)
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint, set_rng_state, rng_state, training_state
from ..config import ConfigError
from ..files import atomic_file, check_writable, recover_folder
from ..data import (EpochSampler, class_names, loader_workers)
from ..model_folder import save_model_folder
from ..models.capabilities import is_multi_exit
from ..inference.outputs import anytime_accuracy, collect_outputs
from ..inference.evaluation import evaluate
from ..inference.report import EvaluationReport, format_report, report_paths
from ..train.techniques import TrainingForward, build_technique
from ..train.trainer import check_trainer
from .checks import batch_plan, model_kwargs
from .run_folder import PHASE_FILES, SUMMARY_COLUMNS, SUMMARY_FILE, check_files, class_difference
from .run_log import RunLog
from .splits import Splits
from .trainer import EngineTrainer


def train_phase(
        accelerator: Accelerator,
        config: Dict[str, Any],
        output_dir: str,
        name: str = "train",
        previous: Optional[str] = None,
        resume: bool = False,
        extend: bool = False,
        run_id: Optional[str] = None,
        log: Optional[RunLog] = None,
) -> Dict[str, Any]:
    """Train one phase of a config and evaluate it.

    Args:
        accelerator: the run's accelerator.
        config: the phase's resolved config.
        output_dir: the phase's folder (checkpoint, summary, model folder, evaluation).
        name: the phase's name, in messages and recorded in its checkpoints.
        previous: the weights file of the phase before, which this phase starts from (IMTA phase II,
            the phases of a phase-wise regime); ``None``: a fresh model.
        resume: continue from the phase's checkpoint, if there is one.
        extend: the checkpoint was made with fewer epochs, the run goes on with the schedule of the
            longer run.
        run_id: the run's identity (``run.json``), recorded in its checkpoints: another run's
            checkpoint is refused.
        log: the run's log file (the main process's), opened at the phase's first checkpoint.

    Returns:
        The phase's evaluation report.
    """
    phase = TrainingPhase(accelerator, config, output_dir, name, previous, resume, run_id, log)
    try:
        phase.start(resume, extend)
        if phase.data.few_held_out and accelerator.is_main_process:  # once the run has begun: a failed start says only why
            print(f"warning: {phase.data.few_held_out}", file=sys.stderr)
        for epoch in phase.remaining_epochs():
            phase.train_epoch(epoch)
        return phase.finish()
    finally:
        # the accelerator keeps what it prepared: without this, every phase's DDP model, optimizer and
        # loaders stay alive through the later phases, and a DDP model outliving the process group
        # (destroyed by end_training) can abort gloo at interpreter exit
        del phase
        accelerator.free_memory()
        gc.collect()


class TrainingPhase:
    """The pieces of one phase (data, model, technique, optimizer, loader, scheduler, EMA, mixup) and
    its steps: build (the constructor), :meth:`start` (resume a checkpoint or seed a fresh run),
    :meth:`train_epoch` (ending with :meth:`record_epoch`: the summary row, the validation, the best
    checkpoint), :meth:`finish` (the last checkpoint, the model folder, the evaluation).

    Args:
        accelerator: the run's accelerator.
        config: the phase's resolved config.
        output_dir: the phase's folder.
        name: the phase's name.
        previous: the weights file the model starts from; ``None``: a fresh model.
        resume: a checkpoint in ``output_dir`` may be resumed (without it, one is refused with a
            FileExistsError).
        run_id: the run's identity, recorded in its checkpoints.
        log: the run's log file, opened at the phase's first checkpoint.
    """

    def __init__(self, accelerator: Accelerator, config: Dict[str, Any], output_dir: str, name: str = "train",
                 previous: Optional[str] = None, resume: bool = False, run_id: Optional[str] = None,
                 log: Optional[RunLog] = None):
        self.accelerator, self.config, self.output_dir, self.name = accelerator, config, output_dir, name
        self.run_id, self.log = run_id, log
        self.checkpoint_dir = os.path.join(output_dir, "checkpoint")
        self.best_dir = os.path.join(output_dir, "best")
        check_files(output_dir, PHASE_FILES)
        # the position, and what the epochs so far measured: the running sum of this epoch's losses, a
        # summary.csv row per epoch and the best value of train.best_metric (None: none yet)
        self.state: Dict[str, Any] = {"epoch": 0, "batch": 0, "updates": 0, "finished": False, "loss_sum": 0.0,
                                      "summary": [], "best": None}
        train_cfg, dc = config["train"], config["data"]
        if accelerator.gradient_accumulation_steps != train_cfg["grad_accum_steps"]:
            raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} batches per update "
                             f"but train.grad_accum_steps is {train_cfg['grad_accum_steps']}: build it with "
                             f"Accelerator(gradient_accumulation_steps={train_cfg['grad_accum_steps']}) (run() does)")
        for folder in (self.checkpoint_dir, self.best_dir):
            if accelerator.is_main_process and (restored := recover_folder(folder)):
                accelerator.print(f"[{name}] {restored}")
        accelerator.wait_for_everyone()
        if os.path.isdir(self.checkpoint_dir) and not resume:
            raise FileExistsError(f"{self.checkpoint_dir!r} exists: pass --resume to continue that run, or choose "
                                  f"another --output-dir")

        self.data = data = Splits(config, accelerator)
        self.classes = class_names(data.train_files)
        self.technique = build_technique(config["technique"])
        self.trainer = EngineTrainer(self)
        check_trainer(self.technique, self.trainer)
        set_seed(train_cfg["seed"])  # the same initial weights on every process
        model = self.technique.create_model(config["model"]["name"], model_kwargs(config, data.num_classes), previous)
        self.data_config = data.set_transforms(config, model)
        self.model = model = self.technique.prepare(model.to(accelerator.device))
        num_exits = model.num_exits if is_multi_exit(model) else 1
        self.columns = [*SUMMARY_COLUMNS, *(f"exit{k}_top1" for k in range(1, num_exits + 1)), "anytime_top1"]
        if train_cfg["best_metric"] not in self.columns:
            raise ConfigError(f"train.best_metric {train_cfg['best_metric']!r} names an exit {model.__class__.__name__} "
                              f"does not have: it has {num_exits} exits (exit1_top1 to exit{num_exits}_top1)")
        if accelerator.is_main_process:  # a checkpoint (weights, optimizer state, the previous one aside) and the weights
            check_writable(output_dir, 8 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2 ** 26)
        optimizer = create_optimizer_v2(model, **config["optimizer"])
        sampler = EpochSampler(len(data.train), train_cfg["seed"])
        plan = batch_plan(config, accelerator.num_processes)
        if len(data.train) < dc["batch_size"]:
            raise ValueError(f"{len(data.train)} training images make no batch of {dc['batch_size']}")
        # each process loads its share of every global batch (accelerate deals the loader's batches out
        # in turn); the loader's own generator: an iterator must not draw from the global RNG (dropout's)
        train_loader = DataLoader(data.train, batch_size=plan["per_process_batch"], sampler=sampler, drop_last=True,
                                  num_workers=loader_workers(dc["workers"]),
                                  generator=torch.Generator().manual_seed(train_cfg["seed"]))
        self.forward, self.optimizer, self.train_loader = accelerator.prepare(TrainingForward(model, self.technique), optimizer,
                                                                              train_loader)
        updates_per_epoch = math.ceil(len(self.train_loader) / accelerator.gradient_accumulation_steps)
        accelerator.print(f"[{name}] global batch {plan['global_batch']} ({plan['per_process_batch']} per process x "
                          f"{plan['processes']} processes x {plan['grad_accum_steps']} accumulation steps), "
                          f"{updates_per_epoch} updates per epoch, lr {plan['lr']}")
        self.scheduler, self.epochs = create_scheduler_v2(self.optimizer, num_epochs=train_cfg["epochs"],
                                                          updates_per_epoch=updates_per_epoch, **config["scheduler"])
        self.ema = ModelEmaV3(model, decay=train_cfg["ema_decay"]) if train_cfg["ema_decay"] else None
        # what a checkpoint keeps beyond the model, optimizer and scheduler: each part's state_dict, by name
        self.stateful = {"technique": self.technique, **({"ema": self.ema} if self.ema is not None else {})}
        mixup = config["mixup"]
        self.mixup = Mixup(**mixup, label_smoothing=config["technique"].get("label_smoothing", 0.0),
                           num_classes=data.num_classes) if mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0 else None
        self.val_loader = None
        if train_cfg["val_interval"] and data.val is None:
            accelerator.print(f"[{name}] no validation split (data.val_fraction is 0): summary.csv records the "
                              f"training loss only and no best checkpoint is kept")
        elif train_cfg["val_interval"]:
            self.val_loader = _eval_loader(accelerator, data.val, dc)

    def start(self, resume: bool = False, extend: bool = False) -> None:
        """Continue from the phase's checkpoint, else seed a fresh run.

        Args:
            resume: restore the checkpoint, if there is one: weights, optimizer, scheduler, RNG
                states, the technique's state, EMA.
            extend: the run was made longer: the scheduler is not restored, and a finished run goes on.
        """
        acc, train_cfg = self.accelerator, self.config["train"]
        self.started = time.time()
        if not (resume and os.path.isdir(self.checkpoint_dir)):
            set_seed(train_cfg["seed"], device_specific=True)  # dropout and mixup differ between processes
            return
        # a longer run has its own schedule: timm's schedulers are functions of the epoch and step,
        # their saved state is their length (an extended run must not restore it)
        saved = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, None if extend else self.scheduler,
                                self.config["model"]["name"], restore_rng=False, run_id=self.run_id)
        self.state = self._checked_state(saved, extend)
        if extend and self.state["epoch"] < self.epochs:
            self.state["finished"] = False
        training = training_state(self.checkpoint_dir)
        try:
            rngs = training["rng_per_process"]
            set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
            for name, part in self.stateful.items():
                part.load_state_dict(training[name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"{os.path.join(self.checkpoint_dir, 'training.pt')!r} does not fit this run "
                             f"({type(e).__name__}: {e}): resume with the config it was made with, or remove "
                             f"{self.checkpoint_dir!r} to start afresh") from None
        acc.print(f"[{self.name}] resumed from {self.checkpoint_dir}: epoch {self.state['epoch'] + 1}, batch "
                  f"{self.state['batch']}" + (f" (extended to {self.epochs} epochs)" if extend else ""))

    def _checked_state(self, saved: Dict[str, Any], extend: bool) -> Dict[str, Any]:
        """The position of a checkpoint's ``state.json`` (epoch, batch, updates, finished), each value
        checked against this run (``extend``: a finished run made longer), and its classes against
        the data's."""
        path = os.path.join(self.checkpoint_dir, "state.json")
        batches = len(self.train_loader)
        limits = {"epoch": self.epochs, "batch": batches - 1, "updates": self.epochs * batches}
        state = {k: saved.get(k) for k in self.state}
        for key, top in limits.items():
            if type(state[key]) is not int or not 0 <= state[key] <= top:
                raise ValueError(f"{path!r}: {key} is {state[key]!r}, expected an integer from 0 to {top} for this "
                                 f"run; the checkpoint is damaged: remove {self.checkpoint_dir!r} to start afresh")
        if type(state["finished"]) is not bool or (state["epoch"] == self.epochs and state["batch"]) or (
                state["finished"] and state["epoch"] < self.epochs and not extend):
            raise ValueError(f"{path!r}: finished is {state['finished']!r} at epoch {state['epoch']}, batch "
                             f"{state['batch']}; the checkpoint is damaged: remove {self.checkpoint_dir!r} to start "
                             f"afresh")
        if saved.get("phase", self.name) != self.name:
            raise ValueError(f"{self.checkpoint_dir!r} is the checkpoint of phase {saved['phase']!r}, not of "
                             f"{self.name!r}: it was copied here; remove it to start this phase afresh")
        classes = saved.get("classes", self.classes)
        if classes != self.classes:
            raise ValueError(f"the classes of {self.data.train_files.root!r} are not those the run was trained on: "
                             f"{class_difference(classes, self.classes)}. Resume with the data the run was "
                             f"trained on (data.dir may move, its classes may not), or start a new run")
        measured = {k: saved.get(k, self.state[k]) for k in ("loss_sum", "summary", "best")}  # an older version's: none
        rows, best = measured["summary"], measured["best"]
        number = lambda v: type(v) in (int, float) and math.isfinite(v)  # noqa: E731
        if not (number(measured["loss_sum"]) and isinstance(rows, list)
                and (len(rows) == state["epoch"] or "summary" not in saved)
                and all(isinstance(r, dict) and list(r) == self.columns and all(v is None or number(v) for v in r.values())
                        for r in rows)
                and (best is None or isinstance(best, dict) and best.get("metric") == self.config["train"]["best_metric"]
                     and number(best.get("value")) and type(best.get("epoch")) is int)):
            raise ValueError(f"{path!r}: its loss_sum, summary or best is not what this run records at epoch "
                             f"{state['epoch']} ({len(self.columns)} summary columns: {', '.join(self.columns)}); the "
                             f"checkpoint is damaged: remove {self.checkpoint_dir!r} to start afresh")
        return {**state, **measured}

    def remaining_epochs(self) -> range:
        return range(self.state["epoch"] if not self.state["finished"] else self.epochs, self.epochs)

    def train_epoch(self, epoch: int) -> None:
        """The epoch's batches from the saved position (a checkpoint every ``train.checkpoint_every``
        updates), then the end-of-epoch checkpoint."""
        acc, state, train_cfg = self.accelerator, self.state, self.config["train"]
        self.scheduler.step(epoch)
        self.scheduler.step_update(state["updates"])  # a no-op unless the schedule steps per update
        self.data.train_files.set_epoch(epoch)
        loader = acc.skip_first_batches(self.train_loader, state["batch"]) if state["batch"] else self.train_loader
        loader.set_epoch(epoch)
        bar = tqdm(loader, desc=f"[{self.name}] epoch {epoch + 1}/{self.epochs}", initial=state["batch"],
                   total=len(self.train_loader), disable=not acc.is_local_main_process)
        for images, target in bar:
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            losses = self.step(images, target)
            state["loss_sum"] += losses["loss"]
            state["batch"] += 1
            if not acc.sync_gradients:
                continue
            state["updates"] += 1
            self.scheduler.step_update(state["updates"])
            if self.ema is not None:
                self.ema.update(self.model, step=state["updates"])
            lr = self.optimizer.param_groups[0]["lr"]
            if train_cfg["log_every"] and state["updates"] % train_cfg["log_every"] == 0:
                acc.log({f"{self.name}/{k}": v for k, v in losses.items()} | {f"{self.name}/lr": lr},
                        step=state["updates"])
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.3g}")
            every = train_cfg["checkpoint_every"]
            if every and state["updates"] % every == 0 and state["batch"] < len(self.train_loader):
                self.save()
                acc.print(f"[{self.name}] checkpoint: epoch {epoch + 1}, batch {state['batch']}, "
                          f"{state['updates']} updates", flush=True)
        self.record_epoch(epoch + 1)
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
        self.save()

    def record_epoch(self, epoch: int) -> None:
        """The end of ``epoch`` (1-based): its ``summary.csv`` row (the mean loss of its batches, the
        learning rate, and every ``train.val_interval`` epochs and after the last the validation), logged
        to the tracker and printed, and the best checkpoint kept (before the epoch's checkpoint records
        them: a run killed in between repeats the epoch and its row)."""
        acc, interval = self.accelerator, self.config["train"]["val_interval"]
        groups = self.optimizer.param_groups
        row = dict.fromkeys(self.columns)
        row.update(epoch=epoch, train_loss=self.state["loss_sum"] / len(self.train_loader),
                   lr=sum(g["lr"] for g in groups) / len(groups))  # timm's summary: the mean over param groups
        if self.val_loader is not None and (epoch % interval == 0 or epoch == self.epochs):
            measured = self.validate()
            row.update(measured)
            acc.log({f"{self.name}/val/{k}": v for k, v in measured.items()}, step=self.state["updates"])
        acc.print(f"[{self.name}] epoch {epoch}/{self.epochs}: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and v is not None), flush=True)
        self.keep_best(row)
        self.state["summary"].append(row)
        if acc.is_main_process:
            with atomic_file(os.path.join(self.output_dir, SUMMARY_FILE)) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.state["summary"])

    def validate(self) -> Dict[str, float]:
        """Accuracy (%) on the held-out split, every process's samples, of the weights evaluated at the
        end (the EMA's if any): timm's eval columns for the last exit (what ``model(x)`` answers), every
        exit's top-1 and their mean (the anytime accuracy)."""
        acc = self.accelerator
        outputs = collect_outputs(self.evaluated, self.val_loader, acc.device, acc.gather_for_metrics,
                                  progress=acc.is_local_main_process)
        self.model.train()  # back from eval mode (a regime keeps its frozen parts in eval mode)
        top = anytime_accuracy(outputs)
        return {"eval_loss": nn.functional.cross_entropy(outputs.logits[-1], outputs.labels).item(),
                "eval_top1": top["top1"][-1], "eval_top5": top["top5"][-1],
                **{f"exit{k}_top1": v for k, v in enumerate(top["top1"], 1)},
                "anytime_top1": sum(top["top1"]) / len(top["top1"])}

    @property
    def evaluated(self) -> nn.Module:
        """The weights evaluated and kept: the EMA's if any, else the model's."""
        return self.ema.module if self.ema is not None else self.model

    def keep_best(self, row: Dict[str, Any]) -> None:
        """Save the evaluated weights to ``best/`` (with the metric, its value and the epoch) if the
        row's ``train.best_metric`` was measured and beats the best so far (higher; eval_loss: lower),
        as timm's CheckpointSaver keeps ``model_best``."""
        metric, best = self.config["train"]["best_metric"], self.state["best"]
        value = row[metric]
        if value is None or best is not None and not (value < best["value"] if metric == "eval_loss" else
                                                      value > best["value"]):
            return  # not validated this epoch, or not better
        self.state["best"] = {"metric": metric, "value": value, "epoch": row["epoch"]}
        if self.accelerator.is_main_process:
            save_checkpoint(self.best_dir, self.evaluated, model_name=self.config["model"]["name"], phase=self.name,
                            run_id=self.run_id, classes=self.classes, **self.state["best"])
        self.accelerator.print(f"[{self.name}] best {metric} so far ({value:.4g}): epoch {row['epoch']}, saved to "
                               f"{self.best_dir}")

    def step(self, images: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """One batch: the technique's step through the engine's trainer, then the backward and (on
        update steps) the optimizer update.

        Args:
            images: the process's share of the batch, ``(N, C, H, W)``.
            target: its labels: class indices ``(N,)``, or soft targets ``(N, classes)`` after mixup.

        Returns:
            ``{"loss": the terms' sum, <term>: value, ...}``, each term averaged over the processes.
        """
        with self.accelerator.accumulate(self.forward):
            result = self.technique.train_step(self.trainer, images, target)
            values = self.update(result.loss, result.terms)
        return {"loss": sum(values.values()), **values}

    def update(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Stop on a non-finite loss, back-propagate ``loss``, clip, step the optimizer and zero the
        gradients (accelerate skips the last two between the batches of an accumulation).

        Args:
            loss: the loss to back-propagate.
            terms: its named terms, each a scalar tensor.

        Returns:
            ``terms`` as floats, averaged over the processes.

        Raises:
            FloatingPointError: a term is not finite (before the optimizer step).
        """
        acc = self.accelerator
        values = acc.reduce(torch.stack([v.detach().float() for v in terms.values()]), "mean")
        named = dict(zip(terms, values.tolist()))
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"the loss is not finite ({named}); training stopped before the optimizer step, "
                                     f"the last checkpoint is the last good state: lower optimizer.lr or set "
                                     f"train.clip_grad")
        acc.backward(loss)
        if acc.sync_gradients and self.config["train"]["clip_grad"]:
            acc.clip_grad_norm_(self.model.parameters(), self.config["train"]["clip_grad"])
        self.optimizer.step()
        self.optimizer.zero_grad()
        return named

    def save(self, **extra) -> None:
        """An atomic checkpoint of the phase (every process's RNG state, the technique's state, EMA)."""
        training = {"rng_per_process": gather_object([rng_state()]),
                    **{name: part.state_dict() for name, part in self.stateful.items()}}
        if self.accelerator.is_main_process:
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler,
                            self.config["model"]["name"], training, phase=self.name, run_id=self.run_id,
                            classes=self.classes, **self.state, **extra)
            if self.log is not None:  # the run has files of its own now: its log goes on in log.txt
                self.log.open()
        self.accelerator.wait_for_everyone()

    def finish(self) -> EvaluationReport:
        """The finished checkpoint (once), the model folder (EMA weights if any) and the evaluation."""
        if not self.state["finished"]:
            self.state["finished"] = True
            self.save(seconds=round(time.time() - self.started, 1))
        acc, config, evaluated = self.accelerator, self.config, self.evaluated
        if acc.is_main_process:  # a timm model folder: model.safetensors and config.json
            save_model_folder(evaluated, self.output_dir, self.data_config, self.classes,
                              technique=config["technique"], phase=self.name, config=config)
        report = _evaluate(acc, evaluated, self.data, self.data_config, config, self.name, self.output_dir)
        acc.log({f"{self.name}/exit{e['exit']}_top1": e["top1"] for e in report["exits"]}, step=self.state["updates"])
        acc.wait_for_everyone()
        return report


def _eval_loader(accelerator: Accelerator, dataset: Dataset, dc: Dict[str, Any]) -> DataLoader:
    """A prepared loader of a held-out split, each process a share (its own generator: iterating it
    never draws from the global RNG, so evaluating leaves training as it was)."""
    return accelerator.prepare(DataLoader(dataset, batch_size=dc["eval_batch_size"],
                                          num_workers=loader_workers(dc["workers"]), generator=torch.Generator()))


def _evaluate(accelerator: Accelerator, model: nn.Module, data: Splits, data_config: dict, config: Dict[str, Any],
              name: str, output_dir: str) -> EvaluationReport:
    """The phase's evaluation on every process's share of the test (and validation) split; the main
    process prints it and writes ``evaluation.json`` and ``.png``."""
    ev, dc, model_name, main = config["evaluation"], config["data"], config["model"]["name"], accelerator.is_main_process
    report = evaluate(model, _eval_loader(accelerator, data.test, dc),
                      None if data.val is None else _eval_loader(accelerator, data.val, dc),
                      input_size=data_config["input_size"], convention=ev["convention"], policy=ev["policy"],
                      q_grid=ev["q_grid"], output_dir=output_dir if main else None, label=f"{model_name} ({name})",
                      device=accelerator.device, gather=accelerator.gather_for_metrics,
                      progress=accelerator.is_local_main_process,
                      info=dict(model=model_name, phase=name, data_dir=dc["dir"], test_split=dc["test_split"],
                                convention=ev["convention"], epochs=config["train"]["epochs"],
                                technique=config["technique"]))
    if main:
        paths = report_paths(output_dir)
        accelerator.print(f"\n[{name}] {model_name}: {report['test_samples']} test images\n{format_report(report)}")
        accelerator.print(f"[{name}] wrote {paths['json']}, {paths['png']} and {os.path.join(output_dir, 'model.safetensors')}")
    return report
