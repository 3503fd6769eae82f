"""A rank's run, in four phases read top to bottom: set up (data, model and engine, checkpoint, run log), train,
finish (the final evaluation, the best model back, the model saved, the recipe's finish) and summarize
(summary.json and the done table). worker/main starts it in a rank; the tests' session worker runs it too."""

from __future__ import annotations

import json
import os
import time

import torch
import transformers
from transformers import AutoTokenizer

from launcher import checkpoints
from launcher.config import choice_name
from launcher.data import take_notes
from launcher.errors import Preempted
from launcher.files import write_atomic
from launcher.hangs import logs_folder
from launcher.job import Job
from launcher.overrides import to_dict
from launcher.plan import Plan
from launcher.recipe import Recipe
from launcher.selection import Selection
from launcher.worker import checkpoint, dist, loop, memory, summary
from launcher.worker.assembly import adapt, wrap
from launcher.worker.export import save_model
from launcher.worker.preempt import stop_after_training, stop_requests
from launcher.worker.runlog import RunLog
from launcher.worker.trackers import open_trackers
from launcher.worker.watchdog import Watchdog, beating_forwards, stacks_on_sigquit


def run(recipe: Recipe, plan: Plan, ranks, job: Job | None = None) -> dict:
    """One run on this rank, from its plan to summary.json (whose content it returns)."""
    rank = RankRun(recipe, plan, ranks, job or Job())
    rank.set_up()
    # From the first step to the saved model, a rank that stops advancing is stopped and says where it was.
    with Watchdog(rank.cfg.watchdog.timeout, logs_folder(rank.cfg.output_dir), ranks.rank) as watchdog:
        progress = rank.train()
        metrics, saved = rank.finish(progress, watchdog)
    return rank.summarize(progress, metrics, saved)


class RankRun:
    """What one rank's run holds from phase to phase."""

    def __init__(self, recipe: Recipe, plan: Plan, ranks, job: Job):
        transformers.utils.logging.disable_progress_bar()
        self.t_start = time.time()
        self.recipe, self.plan, self.cfg, self.ranks, self.job = recipe, plan, plan.config, ranks, job
        stacks_on_sigquit(logs_folder(self.cfg.output_dir), ranks.rank)
        self.figures: dict = {}
        """Memory and timing figures of the set-up, for summary.json."""

    def say(self, what: str) -> None:
        """Rank 0 tells what the seconds before the first step are spent on."""
        if self.ranks.is_main:
            print(f"{self.recipe.name}: {what} ({time.time() - self.t_start:.0f}s)", flush=True)

    # ---- set up

    def set_up(self) -> None:
        cfg, ranks = self.cfg, self.ranks
        self.chosen = checkpoint.choose(cfg, ranks)  # checked before anything is built: a bad one fails in seconds
        self.say("reading and tokenizing the data")
        if self.recipe.build_tokenizer is not None:  # e.g. one trained on the data, for a model built from a config
            self.tokenizer = self.recipe.build_tokenizer(cfg)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.task = self.recipe.build_task(cfg, self.tokenizer)
        # What the data layer and the recipe want the user to know.
        self.notes = [*self.plan.notes, *take_notes(), *self.task.notes]
        self.loader = loop.train_loader(self.task, cfg, ranks)
        self.total = loop.total_steps(self.loader, cfg)
        t_model = time.time()
        self._build_engine()
        self.start = self._resume()
        self.figures["model_load_seconds"] = round(time.time() - t_model, 1)
        # Peak resident memory once the model is loaded and wrapped, before training adds activations and optimizer
        # state.
        self.figures["peak_rss_mib_loaded_per_rank"] = dist.gather_objects(round(memory.rss_mib()[1], 1))
        self.log = self._open_log()
        # The metric early stopping and keep_best follow; a resumed run goes on from its checkpoint's count.
        self.selection = Selection.of(cfg)
        self.evals = loop.Evaluations(selection=self.selection, keep_best=cfg.checkpoint.keep_best)
        chosen = self.chosen
        if (
            chosen is not None
            and self.selection is not None
            and self.selection.restore(chosen.manifest.get("selection"))
        ):
            best = os.path.join(os.path.dirname(chosen.path), checkpoints.folder_name(self.selection.best_step))
            self.evals.best_checkpoint = best if cfg.checkpoint.keep_best and os.path.isdir(best) else None

    def _build_engine(self) -> None:
        cfg, ranks, task = self.cfg, self.ranks, self.task
        self.say(f"building the model ({cfg.model})")
        self.figures["rss_mib_before_model_per_rank"] = dist.gather_objects(round(memory.rss_mib()[0], 1))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and under every strategy
        # A model built on the meta device (launcher.empty_weights) is loaded by its strategy, each rank its part.
        base = self.recipe.build_model(cfg, task)
        adapted = adapt(
            base, cfg, task_type=task.peft_task_type, heads=task.heads, device=ranks.device, total_steps=self.total
        )
        self.say(
            f"applying {choice_name(cfg.adapter)} and {choice_name(cfg.strategy)} on {ranks.world_size} process(es)"
        )
        # What this rank holds of its model state is measured on the first steps (the second has the optimizer's
        # states): summary.json says it beside the peak RSS, and `launcher plan` is checked against it.
        self.built = wrap(
            adapted,
            cfg,
            device=ranks.device,
            total_steps=self.total,
            local_world_size=self.plan.local_world_size,
            holdings_steps=2,
        )
        self.engine = self.built.engine
        self.notes += self.built.notes

    def _resume(self) -> checkpoint.Position | None:
        """Where training starts: the chosen checkpoint's state loaded into the engine, or None (a fresh start)."""
        chosen, cfg = self.chosen, self.cfg
        if chosen is None:
            if cfg.resume == "auto":
                where = os.path.join(cfg.output_dir, "checkpoints")
                self.notes.append(f"resume=auto: no checkpoint in {where} yet: a fresh start")
            return None
        self.say(f"loading the checkpoint {chosen.path}")
        start = checkpoint.load(
            self.engine, chosen, self.ranks, grad_accum=cfg.train.grad_accum, restore=self.engine.hooks.restore
        )
        self.notes.append(chosen.note)
        return start

    def _open_log(self) -> RunLog:
        cfg, ranks, start, job = self.cfg, self.ranks, self.start, self.job
        log = RunLog(
            cfg.output_dir,
            active=ranks.is_main,
            total_steps=self.total,
            log_every=cfg.train.log_every,
            resumed_at=start.step if start is not None else None,
            epochs=None if cfg.train.max_steps else cfg.train.epochs,
            world_size=ranks.world_size,
            **(summary.gpu_view(cfg, self.task, ranks) if ranks.device.type == "cuda" and ranks.is_main else {}),
            trackers=open_trackers(cfg.tracking, self.recipe.name, cfg.output_dir, to_dict(cfg))
            if ranks.is_main
            else None,
        )
        if job.restart:  # the run log says the job was started again, from which step and why
            log.event(
                "restart",
                start.step if start is not None else 0,
                restart=job.restart,
                after=job.restart_reason or "a failure (the job was started again by its launcher, e.g. torchrun)",
            )
        rows = summary.start_rows(cfg, ranks, self.built.adapted, self.task, self.total, start, self.notes)
        log.table(f"{type(cfg).recipe}: starting", rows)
        return log

    # ---- train

    def train(self) -> dict:
        """Train to the plan's last step; returns the loop's figures (steps, throughput)."""
        try:
            return loop.train(
                self.engine,
                self.task,
                self.recipe,
                self.cfg,
                self.ranks,
                self.log,
                self.loader,
                start=self.start,
                save=self.save_checkpoint,
                evals=self.evals,
            )
        except Preempted:
            self.log.close()
            raise

    def save_checkpoint(self, position: checkpoint.Position) -> str:
        selection, keep_best = self.selection, self.cfg.checkpoint.keep_best
        path = checkpoint.save(
            self.engine,
            self.cfg,
            position,
            self.ranks,
            recipe=self.recipe.path,
            selection=selection.state() if selection is not None else None,
            protect=selection.best_step if selection is not None and keep_best else None,
            extra=self.engine.hooks.state() or None,
        )
        self.log.checkpointed()
        if self.ranks.is_main:
            self.log.console.print(f"checkpoint: {path}")
        return path

    # ---- finish

    def finish(self, progress: dict, watchdog: Watchdog) -> tuple[dict[str, float], str]:
        """The final evaluation (of the best model, with keep_best), the model saved, then the recipe's finish;
        returns (the final metrics, where the model was saved)."""
        cfg, ranks = self.cfg, self.ranks
        # A stop signal from here on (a preemption during the final evaluation or the save) is noted, not fatal: the
        # ranks agree on it between these phases and stop where a resumed run takes over, once a complete checkpoint
        # of the trained state exists (without one, the save ahead is the only copy of the training: it goes on).
        with stop_requests() as after:
            try:
                stop_after_training(after, progress["steps"], cfg, ranks, "the final evaluation")
                metrics = self._final_evaluation(progress["steps"], watchdog)
                stop_after_training(after, progress["steps"], cfg, ranks, "saving the model", last=True)
            except Preempted:
                self.log.close()
                raise
            self.log.close()
            # The trained weights first: whatever the recipe does after them (generations, say) is optional, and a
            # failure there never loses the training.
            saved = save_model(self.engine, cfg, self.task, self.tokenizer, ranks)
        if self.recipe.finish is not None:  # e.g. generations from the trained model; every rank (collective forwards)
            with beating_forwards(self.engine.module, "finishing (the recipe's finish)"):
                self.recipe.finish(self.engine, self.task, cfg, ranks)
        return metrics, saved

    def _final_evaluation(self, final: int, watchdog: Watchdog) -> dict[str, float]:
        """The metrics of the model saved: the last step's (early stopping's own evaluation when it ended there), or
        with keep_best the best checkpoint's, loaded back; its predictions written."""
        task, evals, selection, cfg, ranks = self.task, self.evals, self.selection, self.cfg, self.ranks
        if task.eval is None:
            return {}
        if evals.last is not None and evals.last[0] == final:
            metrics, outputs = evals.last[1], evals.last[2]
        else:
            metrics, outputs = loop.evaluate(self.engine, task, self.recipe, cfg, ranks)
            evals.evaluated(final, metrics, self.log)
        if cfg.checkpoint.keep_best and selection.best_step != final and evals.best_checkpoint:
            watchdog.beat(phase="loading the best checkpoint")
            self.say(f"keep_best: the model of step {selection.best_step} ({evals.best_checkpoint})")
            best = checkpoint.Resume(evals.best_checkpoint, checkpoint.manifest_of(evals.best_checkpoint), "")
            restore = self.engine.hooks.restore
            checkpoint.load(self.engine, best, ranks, grad_accum=cfg.train.grad_accum, restore=restore)
            metrics, outputs = loop.evaluate(self.engine, task, self.recipe, cfg, ranks)
            self.log.event("best", selection.best_step, **metrics)
        if ranks.is_main:
            summary.write_predictions(os.path.join(cfg.output_dir, "eval_predictions.jsonl"), outputs)
        return metrics

    # ---- summarize

    def summarize(self, progress: dict, metrics: dict[str, float], saved: str) -> dict:
        """summary.json (rank 0 writes it) and the done table; returns summary.json's content. Collective (every
        rank's figures are gathered): every rank calls it."""
        cfg, ranks, built, selection = self.cfg, self.ranks, self.built, self.selection
        elapsed = time.time() - self.t_start
        peak = summary.peak_rss_mib_per_rank()
        hooks = built.engine.hooks.summary()  # model_state_bytes_per_rank, and AdaLoRA's ranks
        content = {
            "metrics": metrics,
            "peak_rss_mib_per_rank": peak,
            "rss_mib_before_model_per_rank": self.figures["rss_mib_before_model_per_rank"],
            "peak_rss_mib_loaded_per_rank": self.figures["peak_rss_mib_loaded_per_rank"],
            "host_memory": "lean" if built.adapted.lean else "fast",
            "compiled_blocks": built.compiled,
            **summary.peak_gpu(ranks),
            "model_state_bytes_per_rank": hooks.pop("model_state_bytes_per_rank"),
            "model_load_seconds": self.figures["model_load_seconds"],
            **progress,
            "seconds": round(elapsed, 1),
            "world_size": ranks.world_size,
            "strategy": choice_name(cfg.strategy),
            "adapter": choice_name(cfg.adapter),
            "trainable_parameters": built.adapted.trainable,
            "saved": os.path.abspath(saved),
            "resumed_from": self.chosen.path if self.chosen is not None else None,
            **summary.selection_summary(selection, self.evals, cfg.checkpoint.keep_best),
            **hooks,
        }
        if ranks.is_main:
            write_atomic(os.path.join(cfg.output_dir, "summary.json"), json.dumps(content, indent=2))
            self.log.table(f"{type(cfg).recipe}: done in {elapsed:.0f}s", summary.done_rows(cfg, content))
        return content
