"""One readable distillation recipe: teacher frozen, student trained with task, output and
feature KD losses, checkpointed so it can stop, die or crash at any step and resume exactly.

Run as ``python -m workbench distill ...`` or ``accelerate launch -m workbench distill ...``.
Everything the outside world sees goes through the run folder (``workbench.runs``).

Exact resume: the batch of step ``s`` is a pure function of (seed, s) (``data.Batches``), and
so are the noise, timesteps and prompt dropout; the checkpoint restores the student,
optimizer and lr scheduler: a resumed run takes exactly the steps an uninterrupted one would.

Options and their checks live in ``distill_config``; a stage's objective and the teacher's
targets in ``losses``; what trains and how in ``optim``; checkpoints and status in ``runs``.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from workbench import data, lora_kd, losses, memory, optim, runs, sensitivity_kd, targets
from workbench.distill_config import (
    Checked,
    DistillConfig,
    check_run_dir,
    init_student_folder,
    launched_config,
    preflight,
    sensitivity_settings,
)
from workbench.errors import WorkbenchError
from workbench.export import Student, finish_folder, local_paths
from workbench.files import atomic_dir, remove_tree, write_json_atomic
from workbench.modelcard import model_card
from workbench.models import (
    DROP_MIN_BYTES,
    ENCODERS,
    TeacherPipeline,
    freeze_pipeline,
    give_back_memory,
    load_pipeline,
    module_bytes,
)
from workbench.parallel import any_across, full_student, is_sharded, make_accelerator
from workbench.resume import describe_changes, resume_config
from workbench.reward import load_reward
from workbench.runs import MetricsWriter, Reporter, RunDir, Stopper, read_checkpoint_info
from workbench.sensitivity_kd import GUIDANCE_FILE  # noqa: F401  (re-exported: where a run keeps its guidance)
from workbench.stage import (
    Stage,
    add_adapters,
    ema_target,
    kd_setup,
    lcd_setup,
    stage_models,
    train_step,
    trainable,
)
from workbench.surgery import save_student
from workbench.trackers import Trackers

LCM_LORA_DIR = "lcm_lora"  # an LCM-LoRA run's adapter, for load_lora_weights on the stage's starting student


def run_distillation(config: DistillConfig | None, run_dir: str | Path, resume: bool = False,
                     changes: dict[str, Any] | None = None, from_job: bool = False) -> dict[str, Any]:  # fmt: skip
    """Check everything (the preflight), then train every stage and export; returns the final
    status. Errors before training raise ``WorkbenchError`` and leave no run folder behind
    (unless resuming). A resumed run uses its own config, with ``changes`` (field -> value,
    e.g. the flags given with ``--resume``) applied where they can be and refused otherwise.
    ``from_job``: the config the app validated and wrote into the run folder's job.json."""
    run, changed = RunDir(Path(run_dir)), []
    if resume:
        check_run_dir(run.root, resume=True)
        config, changed = resume_config(DistillConfig.from_dict(run.read_job()["config"]), changes or {})
    elif from_job:
        config = launched_config(run.root)
    checked = preflight(config, run_dir=run.root, resume=resume, launched=from_job)
    return Distillation(checked, run, changed).run(resume)


class Distillation:
    """One run: ``run`` reads top to bottom."""

    def __init__(self, checked: Checked, run: RunDir, changed: list[dict[str, Any]]) -> None:
        self.config, self.base, self.specs = checked.config, checked.base, checked.specs
        self.run_dir, self.changed = run, changed
        self.report, self.stopper = Reporter(run), Stopper(run)
        self.fault_step = runs.fault_step()
        self.total_steps = self.config.steps * len(self.specs)

    def run(self, resume: bool) -> dict[str, Any]:
        try:
            self.setup(resume)
            start, checkpoint = self.run_dir.resume_point(self.config.steps) if resume else (0, None)
            for k in range(start, len(self.specs)):
                if not self.train_stage(self.stage(k, checkpoint if k == start else None)):
                    return self.report.status("stopped")
            if self.report.main:
                self.export()
            return self.report.status("done")
        except WorkbenchError as err:
            self.report.status("failed", error=str(err))
            raise
        except torch.OutOfMemoryError:  # one line naming the options that would fit: no CUDA traceback
            error = memory.out_of_memory(self.config, getattr(self, "acc", None))
            self.report.status("failed", error=error)
            raise WorkbenchError(error) from None
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            self.report.status("failed", error=error, traceback=traceback.format_exc())
            raise
        finally:
            if hasattr(self, "trackers"):
                self.trackers.close()

    # 1. set up: process group, run folder, teacher pipeline, cached data, guidance, sample grids
    def setup(self, resume: bool) -> None:
        # not at the top: workbench.sampling loads diffusers' pipelines and transformers (seconds),
        # which the CLI (it imports this module to build its parser) must not
        from workbench.sampling import SampleGrids, default_prompts

        torch.set_flush_denormal(True)
        cfg = self.config
        self.acc = make_accelerator(cfg)
        self.sharded = is_sharded(self.acc)  # FSDP: no process can draw a grid alone mid-run
        check_sharding(cfg, self.sharded)
        self.report = Reporter(self.run_dir, main=self.acc.is_main_process, started=self.report.started)
        if self.report.main:
            self.start_run_folder(resume)
        self.trackers = Trackers(cfg.report_to, self.run_dir.root, self.report.main, self.report.log)
        self.trackers.config(cfg.to_dict())
        self.stopper.install()
        self.pipe = freeze_pipeline(load_pipeline(self.base, device=str(self.acc.device)))
        self.parts = TeacherPipeline(self.pipe, self.base, self.acc.device)
        self.batches = self.load_batches()
        self.guidance = self.load_guidance(resume)
        prompts = list(cfg.sample_prompts) or default_prompts(cfg.base, cfg.data)
        self.grids = SampleGrids(self.pipe, self.run_dir.samples, prompts, steps=cfg.sample_steps,
                                 guidance=cfg.guidance, size=cfg.resolution, first_seed=cfg.sample_seed)  # fmt: skip
        if self.report.main and any(self.parts.drops(n) for n in (*ENCODERS, "unet")):
            self.grids.teacher_row  # noqa: B018  (drawn once, kept: while the whole pipeline is here)
            self.report.log("sample grids: the teacher's row is drawn")
        self.parts.set_aside(*ENCODERS)  # the data is cached: encoders and VAE leave (back for grids)
        if self.parts.away:
            self.report.log(f"the text encoders and VAE leave memory until a sample grid ({', '.join(self.parts.away)})")

    def sampler(self, k: int) -> dict[str, Any] | None:
        return grid_sampler(self.config, k)

    def start_run_folder(self, resume: bool) -> None:
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            mode = self.config.feature_mode
            stages = [s.summary() | {"feature_pairs": s.feature_pairs(mode)} for s in self.specs]
            self.run_dir.write_job(self.config.to_dict(), self.base, stages)
        else:
            self.run_dir.clear_stop()  # the STOP that ended the last session is spent
        if self.changed:
            self.report.log(describe_changes(self.config, self.changed))
            self.run_dir.record_resume(self.config.to_dict(), self.changed)
        self.report.status("running", pid=os.getpid(), error=None, traceback=None, total_steps=self.total_steps,
                           world_size=self.acc.num_processes)  # fmt: skip

    def load_batches(self) -> data.Batches:
        cfg, acc, pipe = self.config, self.acc, self.pipe
        resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        folder, where = self.run_dir.root / "cache", self.base.location
        with acc.main_process_first():  # the main process encodes (once); the others then read
            cache = data.training_data(cfg, pipe, resolution, where, folder, encode=self.report.main,
                                       progress=self.report.progress)  # fmt: skip
        self.report.log(f"training data: {len(cache)} cached examples at {resolution}px")
        noise = data.Batches.schedule_of(pipe.scheduler.config)
        return data.Batches(cache, noise, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.uncond_prob,
                            acc.num_processes, acc.process_index, acc.device, cfg.has_lcd)  # fmt: skip

    def load_guidance(self, resume: bool) -> list[dict[str, Any]] | None:
        """Per-stage feature weights and frozen modules (sensitivity-guided runs only)."""
        if not self.config.needs_sensitivity:
            return None
        path = self.run_dir.root / sensitivity_kd.GUIDANCE_FILE
        if self.report.main and not (resume and path.exists()):  # worked out once, kept in the run
            device = "cuda" if self.acc.device.type == "cuda" else "cpu"
            smap = sensitivity_kd.teacher_map(
                self.base, self.pipe, sensitivity_settings(self.config), device, self.report
            )
            write_json_atomic(path, sensitivity_kd.measure_guidance(self.config, self.specs, smap))
        self.acc.wait_for_everyone()
        return sensitivity_kd.read_guidance(path, len(self.specs), self.report.log)

    # 2. a stage: its student (from the teacher or the previous stage) and teacher, what
    #    trains, the optimizer and schedule, and the checkpoint it starts from
    def stage(self, k: int, checkpoint: Path | None) -> Stage:
        cfg, log = self.config, lambda m: self.report.log(f"stage {k + 1}: {m}")
        acc = make_accelerator(cfg)  # the stage's own: its checkpoints hold this stage's objects
        previous = self.load_stage_student(k - 1) if k else None
        start = self.load_init_student() if k == 0 and cfg.init_student else None  # checked in preflight
        original = self.parts.bring_back("unet").unet  # set aside by an earlier stage, if it was
        models = stage_models(cfg, self.specs, k, original, previous, acc.device, start)
        kind, student, teacher = models.kind, models.student, models.teacher
        if teacher is not original:  # a cast copy or the previous stage's student teaches
            self.parts.set_aside("unet")
        guidance = self.guidance[k] if self.guidance else None
        frozen = guidance["frozen_modules"] if guidance else []
        weights = sensitivity_kd.pair_weights(guidance, models.pairs, acc.device)
        setup = kd_setup(cfg, models.pairs, weights)
        if cfg.teacher_targets == "precompute":  # before the optimizer: the teacher then leaves
            teacher = self.precompute(k, teacher, setup, acc)
        add_adapters(cfg, self.specs, k, models, log)
        params = trainable(cfg, student, frozen, log)
        optimizer = optim.make_optimizer(params, cfg)
        schedule = optim.make_schedule(optimizer, cfg)
        wrapped, optimizer = acc.prepare(student, optimizer)
        acc.register_for_checkpointing(schedule)  # not prepared: accelerate would step it per process
        if kind == "lcd":  # its EMA target network is checkpointed with the stage: exact resume
            setup = self.lcd_setup(student)
            acc.register_for_checkpointing(setup.target)
        first = 0
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
            first = read_checkpoint_info(checkpoint)["stage_step"] + 1
            self.report.log(f"resumed stage {k + 1} at step {first} from {checkpoint.name}")
        raw = acc.unwrap_model(wrapped)  # hooks on the unwrapped model: names survive DDP
        return Stage(k, kind, wrapped, raw, teacher, setup, optimizer, schedule, acc, first)

    def lcd_setup(self, student) -> losses.LCDSetup:
        """Consistency distillation on the teacher's noise schedule, with an EMA target network
        that starts as a copy of the student, and the frozen reward of RG-LCD if asked for (not
        checkpointed: it never changes, so it is loaded again on resume)."""
        cfg, schedule = self.config, self.batches.noise_schedule
        reward = load_reward(cfg.lcd_reward, self.base, student.device) if cfg.lcd_reward else None
        if reward is not None:
            self.report.log(f"lcd: reward {cfg.lcd_reward} with weight {cfg.lcd_reward_weight:g} (RG-LCD)")
        alphas = schedule.alphas_cumprod.to(student.device).float()  # (T,)
        return lcd_setup(cfg, ema_target(student), alphas, schedule.config.prediction_type, reward)

    def precompute(self, k: int, teacher, setup: losses.KDSetup, acc) -> targets.TargetStore:
        """Stage ``k``'s teacher targets on disk (those still missing); the teacher then
        leaves the device."""
        store = targets.TargetStore(self.run_dir.targets(k) / f"rank_{acc.process_index}", acc.device)
        steps = range(k * self.config.steps, (k + 1) * self.config.steps)
        log = lambda f, m: self.report.log(f"stage {k + 1}: {m} {f:.0%}")  # noqa: E731
        files, size = targets.precompute(
            store, teacher, self.batches, setup, steps, self.config.grad_accum, log
        )
        self.report.log(f"stage {k + 1}: teacher targets precomputed ({files} files, {size / 2**20:.1f} MiB "
                        f"new) in {store.folder}; the teacher leaves the device")  # fmt: skip
        if teacher is self.pipe.unet:
            self.parts.set_aside("unet")
        else:  # a cast copy or a stage's student: nothing needs it again (no copy to the CPU first)
            teacher.to("meta")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return store

    def load_init_student(self) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        path = init_student_folder(self.config.init_student)
        self.report.log(f"stage 1: the student starts from {path}")
        return UNet2DConditionModel.from_pretrained(path).state_dict()

    def load_stage_student(self, k: int):
        from diffusers import UNet2DConditionModel

        if not self.run_dir.stage_done(k):
            raise WorkbenchError(
                f"stage {k + 1}'s student is missing from {self.run_dir.stage_dir(k)}; cannot go on"
            )
        return UNet2DConditionModel.from_pretrained(self.run_dir.stage_dir(k)).to(self.acc.device)

    # 3. the loop: step, log, checkpoint, samples; it stops between steps when asked
    def train_stage(self, stage: Stage) -> bool:
        cfg, k, main = self.config, stage.index, self.report.main
        last_logged = k * cfg.steps + stage.first - 1
        metrics = MetricsWriter(self.run_dir, truncate_after_step=last_logged, enabled=main)
        stage.student.train()
        try:
            for s in range(stage.first, cfg.steps):
                g = k * cfg.steps + s  # global step, monotonic across stages
                runs.inject_fault(g, self.fault_step)  # the crash drill of the tests (runs.FAULT_ENV)
                terms = train_step(stage, self.batches, g, cfg)
                done = s == cfg.steps - 1
                if main and (g % cfg.log_every == 0 or done):
                    row = {"step": g, "stage": k + 1, "time": round(time.time() - self.report.started, 3),
                           "lr": stage.schedule.get_last_lr()[0], **terms}  # fmt: skip
                    metrics.write(row)
                    self.trackers.log(row, g)
                    self.report.status("running", step=g + 1, total_steps=self.total_steps, stage=k + 1)
                    self.report.progress((g + 1) / self.total_steps, f"loss {terms['loss/total']:.4f}")
                stop = any_across(stage.accelerator, self.stopper.should_stop()) and not done
                if stop or done or (s + 1) % cfg.checkpoint_every == 0:
                    self.checkpoint(stage, s, g)
                if main and cfg.sample_every and (g + 1) % cfg.sample_every == 0 and not self.sharded:
                    self.save_grid(stage.raw, g + 1, self.sampler(k))
                if stop:
                    self.report.log(f"stopped at step {g + 1}; resume with --resume")
                    return False
        finally:
            metrics.close()
        stage.optimizer.state.clear()  # its states are in the last checkpoint: out of memory before the merge
        if main and stage.kind == "lcd" and self.config.lcd_lora_rank:  # LCM-LoRA: the adapter alone too
            atomic_dir(
                self.run_dir.root / LCM_LORA_DIR,
                lambda tmp: lora_kd.save_adapter(stage.raw, type(self.pipe), tmp),
            )
        student, spec = full_student(stage.accelerator, stage, self.specs[k], main), self.specs[k]
        if main:  # the next stage starts from it (adapters merged: a stock UNet)
            atomic_dir(self.run_dir.stage_dir(k), lambda tmp: save_student(student, spec, tmp))
        if isinstance(stage.teacher, targets.TargetStore):  # precomputed targets: spent with the stage
            stage.accelerator.wait_for_everyone()  # every process is done reading its own
            if main:
                remove_tree(self.run_dir.targets(k))
        if module_bytes(stage.raw) >= DROP_MIN_BYTES:
            stage.accelerator.free_memory()  # a large stage: its references to student and optimizer go now
            give_back_memory()  # (each a full garbage collection, 0.3 s: not worth it for a toy)
        return True

    def save_grid(self, student, step: int, sampler: dict[str, Any] | None) -> None:
        with self.parts.using(*self.parts.for_student()):  # the parts set aside come back for the grid only
            self.trackers.grid(self.grids.save(student, step, sampler), step)

    # 4. checkpoints: every process saves its state into step_N.tmp, the main one completes it
    def checkpoint(self, stage: Stage, s: int, g: int) -> None:
        acc, tmp = stage.accelerator, self.run_dir.checkpoint_dir(g + 1).with_suffix(".tmp")
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.report.main:
            info = {"stage": stage.index, "stage_step": s, "step": g,
                    "data_position": {"step": g, "micro_batches": self.config.grad_accum}}  # fmt: skip
            final = self.run_dir.commit_checkpoint(tmp, info, self.config.keep_checkpoints)
            self.report.status("running", checkpoint=final.name)
        acc.wait_for_everyone()

    # 5. export: the last stage's student with its plan, layer map and model card
    def export(self) -> None:
        student, spec = self.load_stage_student(len(self.specs) - 1), self.specs[-1]
        if not self.grids.path(self.total_steps).exists():
            self.save_grid(student, self.total_steps, self.sampler(len(self.specs) - 1))
        trained = Student(spec=spec, base=self.base, unet=student, run=self.run_dir)
        card = model_card(trained)

        def write(tmp: Path) -> None:
            save_student(student, spec, tmp)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            finish_folder(tmp, local_paths(trained) + [str(tmp.resolve())])

        atomic_dir(self.run_dir.student, write)
        remove_tree(self.run_dir.root / "targets")  # precomputed teacher targets: spent
        self.report.log(f"student saved to {self.run_dir.student}")


def check_sharding(config: DistillConfig, sharded: bool) -> None:
    """What a sharded (FSDP) run cannot do, refused before any model loads."""
    if sharded and config.lora_rank:
        raise WorkbenchError("--lora-rank with FSDP: adapters hold a fraction of the weights already; "
                             "launch with --multi_gpu (DDP) instead, or use --lora-rank 0")  # fmt: skip
    if sharded and config.has_lcd:  # torch: "FSDP does not support deepcopy"
        raise WorkbenchError("an lcd stage with FSDP: its EMA target network is a copy of the student, "
                             "which a sharded student cannot be copied into; launch with --multi_gpu (DDP) "
                             "instead")  # fmt: skip


def grid_sampler(config: DistillConfig, k: int) -> dict[str, Any] | None:
    """How stage ``k``'s student draws its sample grids (``SampleGrids.save``'s overrides): few
    LCM steps after LCD; an LCM-LoRA student also without classifier-free guidance (no
    w-embedding: the guided teacher's flow is in its weights, and it never trained on the empty
    prompt that a guided pass would add)."""
    if config.stage_kind(k) != "lcd":
        return None
    sampler: dict[str, Any] = {"scheduler": "lcm", "steps": config.lcd_sample_steps}
    return sampler | {"guidance": 1.0} if config.lcd_lora_rank else sampler
