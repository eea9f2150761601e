"""One readable distillation recipe: teacher frozen, student trained with task, output and
feature KD losses, checkpointed so it can stop, die or crash at any step and resume exactly.

Run as ``python -m workbench distill ...`` or ``accelerate launch -m workbench distill ...``.
Everything the outside world sees goes through the run folder (``workbench.runs``).

Exact resume: the batch of step ``s`` is a pure function of (seed, s) (a seeded
permutation per epoch), and so are the noise, timesteps and prompt dropout (a generator
seeded from (seed, s, rank)); the checkpoint restores the student, optimizer and lr
scheduler. A resumed run therefore takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from workbench.distill_config import (
    DistillConfig,
    check_run_dir,
    preflight,
    sensitivity_settings,
    use_cuda,
)
from workbench.errors import WorkbenchError
from workbench.losses import distillation_loss
from workbench.runs import MetricsWriter, RunDir, read_json, write_json_atomic

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Crash drill for tests: WORKBENCH_FAULT_STEP=N raises inside the loop at global step N.
FAULT_ENV = "WORKBENCH_FAULT_STEP"
# Sensitivity-guided runs keep their feature weights and frozen modules here (see _guidance).
GUIDANCE_FILE = "sensitivity.json"


# --------------------------------------------------------------------------- data


def data_fingerprint(config: DistillConfig, base_location: str, resolution: int) -> dict[str, Any]:
    data = config.data
    if data != "toy":
        path = Path(data)
        data = {"path": str(path.resolve()), "mtime": path.stat().st_mtime if path.exists() else None}
    return {
        "base": base_location,
        "data": data,
        "n": config.toy_samples,
        "seed": config.seed,
        "res": resolution,
    }


def build_examples(config: DistillConfig, pipe, resolution: int) -> list[Any]:
    from workbench import data

    if config.data == "toy":
        return data.toy_examples(config.toy_samples, config.seed)
    path = Path(config.data)
    if path.suffix == ".txt" and not path.is_dir():
        prompts = data.prompt_file(path)
        return data.teacher_examples(
            pipe, prompts, config.seed, config.teacher_image_steps, config.sample_guidance
        )
    return data.folder_examples(path)


def batch_indices(n: int, global_batch: int, step: int, micro: int, accum: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro`` of optimizer step ``step`` (all processes).

    Consecutive slices of an endless stream of per-epoch permutations, so any step's data
    is known from the step number alone: resuming needs no data-loader state.
    """
    start = (step * accum + micro) * global_batch
    idx = []
    while len(idx) < global_batch:
        epoch, offset = divmod(start + len(idx), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset : offset + global_batch - len(idx)].tolist())
    return torch.tensor(idx)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank) % 2**63)


# --------------------------------------------------------------------------- run


class Stopper:
    """Stop when the STOP file appears or SIGTERM/SIGINT arrives; checked between steps."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.signalled = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signalled = True

    def should_stop(self) -> bool:
        return self.signalled or self.run.stop_requested()


def run_distillation(config: DistillConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Validate, then train every stage; returns the final status. Errors before training
    raise ``WorkbenchError`` and leave no run folder behind (unless resuming)."""
    run = RunDir(Path(run_dir))
    if resume:
        check_run_dir(run.root, resume=True)
        config = DistillConfig.from_dict(run.read_job()["config"])
    checked = preflight(config, run_dir=run.root, resume=resume)
    trainer = Trainer(checked.config, run, checked.base, checked.specs)
    return trainer.run(resume)


class Trainer:
    """Holds the run's state; ``run`` reads top to bottom."""

    def __init__(self, config: DistillConfig, run: RunDir, base, specs: list[Any]) -> None:
        self.config, self.run_dir, self.base, self.specs = config, run, base, specs
        self.stopper = Stopper(run)
        self.accelerator = None
        self.started = time.time()
        self.fault_step = int(os.environ.get(FAULT_ENV, "-1"))

    # 1. set up: process group, run folder, teacher pipeline, cached data
    def _setup(self, resume: bool) -> None:
        from accelerate import Accelerator

        torch.set_flush_denormal(True)
        cfg = self.config
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=1,  # we accumulate by hand: the data stream is ours
            cpu=not use_cuda(cfg),
        )
        self.main = self.accelerator.is_main_process
        if self.main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            if resume:
                self.run_dir.clear_stop()  # the STOP that ended the last session is spent
            else:
                write_json_atomic(self.run_dir.job, self._job_record())
            self._status(
                "running", pid=_pid(), error=None, traceback=None, world_size=self.accelerator.num_processes
            )
        self.stopper.install()
        self.pipe = self._load_pipeline()
        self.cache = self._load_data()
        self.guidance = self._guidance(resume)

    def _job_record(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "base": {"name": self.base.name, "location": self.base.location},
            "stages": [
                s.summary() | {"feature_pairs": s.feature_pairs(self.config.feature_mode)} for s in self.specs
            ],
            "command": " ".join(sys.argv),
            "created": time.time(),
        }

    def _load_pipeline(self):
        from workbench.models import load_pipeline

        pipe = load_pipeline(self.base, device=str(self.accelerator.device))
        pipe.unet.requires_grad_(False).eval()
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        return pipe

    def _load_data(self):
        from workbench.data import LatentCache, encode_examples

        cfg = self.config
        resolution = cfg.resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        fingerprint = data_fingerprint(cfg, self.base.location, resolution)
        folder = self.run_dir.root / "cache"
        with self.accelerator.main_process_first():
            cache = LatentCache.load(folder, fingerprint)
            if cache is None and self.main:
                self._log(f"encoding training data once ({cfg.data}) ...")
                examples = build_examples(cfg, self.pipe, resolution)
                cache = encode_examples(self.pipe, examples, resolution, progress=self._progress_line)
                cache.save(folder, fingerprint)
        if cache is None:
            cache = LatentCache.load(folder, fingerprint)
        self._log(f"training data: {len(cache)} cached examples at {resolution}px")
        return cache

    def _guidance(self, resume: bool) -> list[dict[str, Any]] | None:
        """Per-stage feature weights and frozen modules from the teacher's sensitivity map.

        Worked out once (the map from the cache, or measured now on the loaded teacher) and
        kept in the run folder: a resumed run trains with exactly these, whatever the cache
        holds by then.
        """
        cfg = self.config
        if not cfg.needs_sensitivity:
            return None
        path = self.run_dir.root / GUIDANCE_FILE
        if self.main:
            if resume and path.exists():
                self._log(f"feature weights and frozen modules from the run folder ({GUIDANCE_FILE})")
            else:
                write_json_atomic(path, self._measure_guidance())
        self.accelerator.wait_for_everyone()
        record = read_json(path)
        if not record or len(record.get("stages", ())) != len(self.specs):
            raise WorkbenchError(f"{path} does not match this run's {len(self.specs)} stage(s); delete it")
        for stage in record["stages"]:
            self._log_guidance(stage)
        return record["stages"]

    def _measure_guidance(self) -> dict[str, Any]:
        from workbench import sensitivity as sens
        from workbench import sensitivity_kd

        cfg = self.config
        settings = sensitivity_settings(cfg)
        device = "cuda" if self.accelerator.device.type == "cuda" else "cpu"
        smap = sens.cached_map(self.base, settings, device)
        if smap is None and device != "cpu":  # `workbench sensitivity` measures on the CPU by default
            smap = sens.cached_map(self.base, settings, "cpu")
        if smap is None:
            self._log("measuring the teacher's sensitivity map (once per teacher and settings; then cached)")
            probe = sens.Probe(
                self.base, settings, device=device, pipe=self.pipe, progress=self._measure_progress(0.0, 0.05)
            )
            smap = sens.sensitivity(self.base, settings, fidelity=False, device=device, probe=probe,
                                    progress=self._measure_progress(0.05, 1.0))  # fmt: skip
            self._log(f"sensitivity map measured in {smap.seconds:.0f}s, cached as {smap.path}")
        else:
            self._log(f"sensitivity map from the cache ({smap.path})")
        self._status("running", message=None)
        stages = []
        for k, spec in enumerate(self.specs):
            pairs = spec.feature_pairs(cfg.feature_mode) if cfg.w_feat > 0 else []
            record = sensitivity_kd.stage_guidance(
                spec, pairs, smap, cfg.feature_weights, cfg.freeze_sensitive
            )
            stages.append({"stage": k + 1, "plan": spec.plan.name, **record})
        return {
            "feature_weights": cfg.feature_weights,
            "freeze_sensitive": cfg.freeze_sensitive,
            "map": {
                "path": smap.path,
                "base": smap.base,
                "identity": smap.identity,
                "device": smap.device,
                "settings": smap.settings,
                "created": smap.created,
            },
            "stages": stages,
        }

    def _measure_progress(self, lo: float, hi: float):
        shown = [-1]

        def progress(fraction: float, message: str) -> None:
            f = lo + (hi - lo) * fraction
            self._status("running", message=f"measuring sensitivity {f:.0%}: {message}")
            if int(f * 10) != shown[0]:  # the log gets a line per 10%
                shown[0] = int(f * 10)
                self._log(f"sensitivity map {f:6.1%} {message}")

        return progress

    def _log_guidance(self, stage: dict[str, Any]) -> None:
        k = stage["stage"]
        if stage["feature_weights"] is not None:
            weights = ", ".join(f"{m} {w:.3f}" for m, w in stage["feature_weights"].items())
            self._log(f"stage {k} feature weights (sensitivity, mean 1): {weights}")
        if stage["frozen_units"]:
            units = ", ".join(f"{u['unit']} ({u['score']:.4g})" for u in stage["frozen_units"])
            self._log(
                f"stage {k} freezes the {len(stage['frozen_units'])} most sensitive layer units: {units}"
            )
            self._log(f"stage {k} frozen modules: {', '.join(stage['frozen_modules'])}")

    def _feature_weights(self, k: int, pairs: list[tuple[str, str]]) -> torch.Tensor | None:
        """This stage's weight per pair, in the pairs' order (None: the plain sum)."""
        weights = self.guidance[k]["feature_weights"] if self.guidance else None
        if weights is None or not pairs:
            return None
        missing = [s for s, _ in pairs if s not in weights]
        if missing:
            raise WorkbenchError(f"{GUIDANCE_FILE} has no feature weight for {missing[:3]}; delete it")
        return torch.tensor(
            [weights[s] for s, _ in pairs], dtype=torch.float32, device=self.accelerator.device
        )

    # 2. train each stage in turn
    def run(self, resume: bool) -> dict[str, Any]:
        try:
            self._setup(resume)
            start_stage, checkpoint = self._find_checkpoint() if resume else (0, None)
            for k in range(start_stage, len(self.specs)):
                finished = self._train_stage(k, checkpoint if k == start_stage else None)
                if not finished:
                    return self._status("stopped")
            if self.main:
                self._export()
            return self._status("done")
        except WorkbenchError as err:
            self._status("failed", error=str(err))
            raise
        except Exception as err:
            if self.main:
                self._status("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            raise

    def _total_steps(self) -> int:
        return self.config.steps * len(self.specs)

    def _train_stage(self, k: int, checkpoint: Path | None) -> bool:
        cfg, acc = self.config, self.accelerator
        student, teacher, pairs = self._stage_models(k)
        feature_weights = self._feature_weights(k, pairs if cfg.w_feat > 0 else [])
        optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        # The scheduler is not prepared: accelerate would step it once per process.
        student, optimizer = acc.prepare(student, optimizer)
        acc.register_for_checkpointing(schedule)
        first = 0
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
            first = _read_checkpoint_info(checkpoint)["stage_step"] + 1
            self._log(f"resumed stage {k + 1} at step {first} from {checkpoint.name}")
        metrics = self._metrics_writer(k * cfg.steps + first - 1)
        try:
            return self._loop(
                k, first, student, teacher, pairs, optimizer, schedule, metrics, feature_weights
            )
        finally:
            metrics.close()

    def _loop(self, k, first, student, teacher, pairs, optimizer, schedule, metrics, feature_weights) -> bool:
        cfg, acc = self.config, self.accelerator
        raw_student = acc.unwrap_model(student)  # hooks on the unwrapped model: names survive DDP
        student.train()
        for s in range(first, cfg.steps):
            g = k * cfg.steps + s  # global step, monotonic across stages
            if g == self.fault_step:
                raise RuntimeError(f"injected fault at step {g} (WORKBENCH_FAULT_STEP)")
            terms = self._step(g, student, raw_student, teacher, pairs, optimizer, schedule, feature_weights)
            done = s == cfg.steps - 1
            if self.main and (g % cfg.log_every == 0 or done):
                row = {"step": g, "stage": k + 1, "time": round(time.time() - self.started, 3),
                       "lr": schedule.get_last_lr()[0], **terms}  # fmt: skip
                metrics.write(row)
                self._status("running", step=g + 1, total_steps=self._total_steps(), stage=k + 1)
                self._progress_line((g + 1) / self._total_steps(), f"loss {terms['loss/total']:.4f}")
            stop = self._agree(self.stopper.should_stop()) and not done
            if stop or done or (s + 1) % cfg.checkpoint_every == 0:
                self._checkpoint(k, s, g)
            if self.main and cfg.sample_every and (g + 1) % cfg.sample_every == 0:
                self._samples(raw_student, g + 1)
            if stop:
                self._log(f"stopped at step {g + 1}; resume with --resume")
                return False
        if self.main:
            self._save_stage_student(k, raw_student)
        return True

    # 3. one optimizer step: teacher (no grad) and student forwards, losses, update
    def _step(self, g, student, raw_student, teacher, pairs, optimizer, schedule, feature_weights=None):
        from workbench.hooks import FeatureCapture

        cfg, acc = self.config, self.accelerator
        totals: dict[str, float] = {}
        pairs = pairs if cfg.w_feat > 0 else []
        for micro in range(cfg.grad_accum):
            batch = self._batch(g, micro)
            t_pred, t_feats = None, {}
            if cfg.w_out > 0 or pairs:  # task-only runs need no teacher
                with torch.no_grad(), FeatureCapture(teacher, [t for _, t in pairs]) as t_feats:
                    t_pred = teacher(**_cast(batch["inputs"], teacher.dtype)).sample.float()
            # Only the last micro-batch syncs gradients across processes.
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(student)
            with sync, acc.autocast(), FeatureCapture(raw_student, [s for s, _ in pairs]) as s_feats:
                s_pred = student(**batch["inputs"]).sample.float()
                terms = distillation_loss(
                    s_pred, t_pred if cfg.w_out > 0 else None, batch["target"], s_feats, t_feats,
                    pairs, cfg.weights, cfg.normalize_features, feature_weights if pairs else None,
                )  # fmt: skip
                acc.backward(terms["loss/total"] / cfg.grad_accum)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float().item() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return self._mean_across_processes(totals)

    def _batch(self, g: int, micro: int) -> dict[str, Any]:
        """This process's slice of micro-batch ``micro`` of step ``g``, noised."""
        cfg, acc, c = self.config, self.accelerator, self.cache
        world, rank = acc.num_processes, acc.process_index
        idx = batch_indices(len(c), cfg.batch_size * world, g, micro, cfg.grad_accum, cfg.seed)
        idx = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        gen = step_generator(cfg.seed, g, micro, rank)
        b = len(idx)
        latents = c.latent_mean[idx] + c.latent_std[idx] * torch.randn(
            c.latent_mean[idx].shape, generator=gen
        )
        noise = torch.randn(latents.shape, generator=gen)  # (B, C, h, w)
        sched = self.pipe.scheduler
        n_train = sched.config.num_train_timesteps
        t = torch.randint(0, n_train, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < cfg.uncond_prob  # classifier-free guidance dropout
        embeds = torch.where(drop[:, None, None], c.uncond_embeds, c.prompt_embeds[idx])
        noisy, target = _noise(self._train_scheduler(), latents, noise, t)
        inputs: dict[str, Any] = {"sample": noisy, "timestep": t, "encoder_hidden_states": embeds}
        if c.pooled is not None:
            pooled = torch.where(drop[:, None], c.uncond_pooled, c.pooled[idx])
            inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": c.time_ids[idx]}
        device = acc.device
        return {"inputs": _to(inputs, device), "target": target.to(device)}

    def _train_scheduler(self):
        """A DDPM scheduler with the pipeline's noise schedule, for add_noise / targets."""
        if getattr(self, "_ddpm", None) is None:
            from diffusers import DDPMScheduler

            self._ddpm = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return self._ddpm

    def _mean_across_processes(self, totals: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return totals
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _agree(self, flag: bool) -> bool:
        """Every process stops at the same step if any of them was asked to."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # 4. models of a stage: the student (from the teacher or the previous stage) and its teacher
    def _stage_models(self, k: int):
        from workbench.surgery import build_student, derive_stage_plan

        cfg = self.config
        original = self.pipe.unet
        spec = self.specs[k]
        if k == 0:
            student, _ = build_student(original, spec.plan)
            pairs = spec.feature_pairs(cfg.feature_mode)
            teacher = original
        else:
            previous = self._load_stage_student(k - 1)
            step_plan = derive_stage_plan(self.specs[k - 1], spec, name=f"stage-{k + 1}")
            student, step_spec = build_student(previous, step_plan)
            if cfg.stage_teacher == "previous":
                teacher, pairs = previous, step_spec.feature_pairs(cfg.feature_mode)
            else:
                teacher, pairs = original, spec.feature_pairs(cfg.feature_mode)
        teacher = teacher.to(self.accelerator.device).eval()
        if teacher.dtype != TEACHER_DTYPES[cfg.teacher_dtype]:
            teacher = teacher.to(TEACHER_DTYPES[cfg.teacher_dtype])
        teacher.requires_grad_(False)
        student = student.float().to(self.accelerator.device)
        student.requires_grad_(True)
        self._freeze(k, student)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student, teacher, pairs

    def _freeze(self, k: int, student) -> None:
        """Frozen modules get no gradient and stay out of the optimizer (and of DDP's buckets)."""
        from workbench.sensitivity_kd import freeze

        modules = self.guidance[k]["frozen_modules"] if self.guidance else []
        if modules:
            frozen = freeze(student, modules)
            total = sum(p.numel() for p in student.parameters())
            self._log(f"stage {k + 1}: {len(modules)} modules frozen ({frozen:,} of {total:,} parameters)")

    def _stage_dir(self, k: int) -> Path:
        return self.run_dir.root / "stages" / f"stage_{k + 1}"

    def _save_stage_student(self, k: int, student) -> None:
        from workbench.surgery import save_student

        _atomic_dir(self._stage_dir(k), lambda tmp: save_student(student, self.specs[k], tmp))

    def _load_stage_student(self, k: int):
        from diffusers import UNet2DConditionModel

        folder = self._stage_dir(k)
        if not (folder / "config.json").exists():
            raise WorkbenchError(
                f"stage {k + 1}'s student is missing from {folder}; cannot start stage {k + 2}"
            )
        return UNet2DConditionModel.from_pretrained(folder).to(self.accelerator.device)

    # 5. checkpoints: written to a temporary folder and renamed, last N kept
    def _checkpoint(self, k: int, s: int, g: int) -> None:
        acc = self.accelerator
        final = self.run_dir.checkpoints / f"step_{g + 1:07d}"
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.main:
            info = {
                "stage": k,
                "stage_step": s,
                "step": g,
                "data_position": {"step": g, "micro_batches": self.config.grad_accum},
            }
            write_json_atomic(tmp / "checkpoint.json", info)
            if final.exists():
                _remove(final)
            tmp.rename(final)
            for old in _checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                _remove(old)
            self._status("running", checkpoint=final.name)
        acc.wait_for_everyone()

    def _find_checkpoint(self) -> tuple[int, Path | None]:
        found = _checkpoints(self.run_dir)
        if not found:
            self._log("no checkpoint yet: starting from step 0")
            return 0, None
        info = _read_checkpoint_info(found[-1])
        finished = info["stage_step"] == self.config.steps - 1
        if finished and (self._stage_dir(info["stage"]) / "config.json").exists():
            return info["stage"] + 1, None
        return info["stage"], found[-1]  # a finished stage whose student wasn't saved re-saves it

    def _metrics_writer(self, last_logged: int) -> MetricsWriter:
        if not self.main:
            return _NullWriter()
        return MetricsWriter(self.run_dir, truncate_after_step=last_logged)

    # 6. samples and export
    def _samples(self, student, step: int) -> None:
        from workbench.sampling import generate

        cfg = self.config
        prompts = list(cfg.sample_prompts) or _default_prompts(self.config)
        seeds = list(range(len(prompts)))
        kw = {"steps": cfg.sample_steps, "guidance": cfg.sample_guidance}
        if getattr(self, "_teacher_row", None) is None:
            self._teacher_row = generate(self.pipe, prompts, seeds, **kw)
        was_training = student.training
        student.eval()
        try:
            row = generate(self.pipe, prompts, seeds, unet=student, **kw)
        finally:
            student.train(was_training)
        self.run_dir.samples.mkdir(parents=True, exist_ok=True)
        path = self.run_dir.samples / f"step_{step:07d}.png"
        _grid([self._teacher_row, row]).save(path.with_suffix(".tmp.png"))
        path.with_suffix(".tmp.png").replace(path)

    def _export(self) -> None:
        from workbench.surgery import save_student

        last = len(self.specs) - 1
        student = self._load_stage_student(last)
        if not (self.run_dir.samples / f"step_{self._total_steps():07d}.png").exists():
            self._samples(student, self._total_steps())
        spec = self.specs[last]

        def write(tmp: Path) -> None:
            save_student(student, spec, tmp)
            (tmp / "README.md").write_text(
                model_card(self.config, self.base, spec, self.run_dir), encoding="utf-8"
            )

        _atomic_dir(self.run_dir.student, write)
        self._log(f"student saved to {self.run_dir.student}")

    # helpers
    def _status(self, state: str, **fields: Any) -> dict[str, Any]:
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return {"state": state, "main": False}
        return self.run_dir.write_status(state=state, **fields)

    def _log(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def _progress_line(self, fraction: float, message: str) -> None:
        elapsed = time.time() - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else float("nan")
        self._log(f"{fraction:6.1%} {message} (elapsed {elapsed:.0f}s, eta {eta:.0f}s)")


class _NullWriter:
    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _pid() -> int:
    return os.getpid()


def _lr_lambda(cfg: DistillConfig):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, cfg.steps))
            return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def _noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Noisy latents and the training target the scheduler's prediction type asks for."""
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, t)
    raise WorkbenchError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


def _to(tree: Any, device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree


def _checkpoints(run: RunDir) -> list[Path]:
    if not run.checkpoints.is_dir():
        return []
    return sorted(p for p in run.checkpoints.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))


def _read_checkpoint_info(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "checkpoint.json").read_text(encoding="utf-8"))


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _atomic_dir(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    _remove(tmp)
    write(tmp)
    _remove(final)
    tmp.rename(final)


def _default_prompts(config: DistillConfig) -> list[str]:
    if config.base == "toy" or config.data == "toy":
        from workbench.toy import world

        return [s.caption for s in world.held_out_scenes()[:: max(1, len(world.held_out_scenes()) // 4)]][:4]
    return ["a photo of a cat", "a watercolor landscape", "a red sports car", "a bowl of fruit"]


def _grid(rows: list[list[Any]]):
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (c * w, r * h))
    return grid


def model_card(config: DistillConfig, base, spec, run: RunDir) -> str:
    """README.md for an exported student."""
    from workbench.runs import read_metrics

    rows, _ = read_metrics(run.metrics)
    last = rows[-1] if rows else {}
    losses = "\n".join(
        f"| `{k}` | {v:.5f} |" for k, v in last.items() if k.startswith("loss/") and k.count("/") == 1
    )
    guided = ""
    record = read_json(run.root / GUIDANCE_FILE) if config.needs_sensitivity else None
    if record:
        final = record["stages"][-1]
        if final["feature_weights"] is not None:
            guided += " Feature terms were weighted by the teacher's per-unit sensitivity (mean weight 1)."
        if final["frozen_modules"]:
            frozen = ", ".join(final["frozen_modules"])
            guided += f" Frozen while distilling (the most sensitive layers): {frozen}."
    return f"""---
library_name: diffusers
tags: [stable-diffusion-xl, distillation, pruning]
---
# Distilled student of `{base.name}`

A `UNet2DConditionModel` with {spec.student_params:,} parameters ({spec.student_params / spec.teacher_params:.1%}
of the teacher's {spec.teacher_params:,}), made by removing {len(spec.removed)} units (plan
`{spec.plan.name}`, in `plan.json`; `layer_map.json` says which teacher layer each student layer
came from) and distilling for {config.steps * len(config.stages)} steps with task, output and
`{config.feature_mode}` feature losses (weights {config.w_task}, {config.w_out}, {config.w_feat}).{guided}

```python
from diffusers import DiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("path/to/this/folder")
pipe = DiffusionPipeline.from_pretrained("{base.location}", unet=unet)
```

Final losses (step {last.get("step", "?")}):

| term | value |
|---|---|
{losses}
"""
