"""`bigtrain`, the run context bound inside a `%%bigtrain` cell on every rank."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nbtrain.config import tree as defaults
from nbtrain.config.render import FROM_DATALOADER, finalize, get_path
from nbtrain.config.tree import TrainConfig
from nbtrain.rundir import MetricWriter, RunDirectory, write_json_atomic
from nbtrain.rundir.checkpoints import published
from nbtrain.worker import checkpoint, qat
from nbtrain.worker.batches import input_dtype, precision_dtype, to_device
from nbtrain.worker.data import MicroBatchLoader, batches_per_epoch, is_supported
from nbtrain.worker.timeline import Timeline


class BigTrain:
    """The run as the cell sees it: rank facts, `prepare`, `fit`, `log`, checkpoints.

    >>> engine, loader = bigtrain.prepare(model, dataset)          # doctest: +SKIP
    >>> for batch in loader:                                       # doctest: +SKIP
    ...     loss = engine(**batch).loss
    ...     engine.backward(loss); engine.step()
    ...     bigtrain.log(loss=loss.item())
    """

    def __init__(self, run: RunDirectory, cfg: TrainConfig, deepspeed_config: dict[str, Any],
                 timeline: Timeline | None = None):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.is_main = self.rank == 0
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.config: dict[str, Any] = deepspeed_config
        self.max_steps: int | None = cfg.steps
        self.seed = cfg.seed if cfg.seed is not None else defaults.DEFAULT_SEED
        self._cfg, self._run = cfg, run
        self._metrics = MetricWriter(run.metrics_file(self.rank), self.rank)
        self.engine: Any = None
        self.accelerator: Any = None
        self._skeletons: dict[int, torch.nn.Module] = {}
        self._prepared_model: torch.nn.Module | None = None
        self._loader: MicroBatchLoader | None = None
        self._saved_step: int | None = None  # the step of the last checkpoint saved or loaded
        self._last_step_time = 0.0
        self.samples_per_step = 0
        self.tokens_in_step = 0
        # When each start-up phase began (unix s); rank 0 publishes it at each change (worker/timeline.py).
        self.timeline = timeline if timeline is not None else Timeline()

    # -- the cell's API ------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, data: Any, collate_fn: Callable[[list[Any]], Any] | None = None,
                device_placement: bool = True) -> tuple[Any, MicroBatchLoader]:
        """Return the DeepSpeed engine for `model` and this rank's loader of micro-batches.

        The loader's batches come on `bigtrain.device` with floating-point tensors in the
        engine's dtype (bf16/fp16; integer tensors as they are). With `device_placement=False`
        they come as collated, on the CPU: move them yourself, e.g. with `bigtrain.to_device`.
        """
        if self.engine is not None:
            raise RuntimeError("bigtrain.prepare was already called in this run; call it once per cell")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"bigtrain.prepare needs a torch.nn.Module, got {type(model).__name__}")
        if not is_supported(data):
            raise TypeError(f"bigtrain.prepare needs a map-style Dataset or a DataLoader, got {type(data).__name__}")
        micro_batch, grad_accum, total_steps, per_epoch = self._plan_length(data)
        self.config = finalize(self.config, micro_batch=micro_batch, total_steps=total_steps)
        self.max_steps = total_steps
        self.timeline.mark("prepare_called")
        if qat.is_on(self._cfg):  # fake-quantize before DeepSpeed wraps (and may partition) the weights
            qat.prepare(model, str(self._cfg.qat))
        self._skeletons[id(model)] = meta_copy(model)
        self.engine = self._build_engine(model, grad_accum)
        self.timeline.mark("engine_built")
        resumed = self._load_resume_checkpoint()
        self._prepared_model = model
        self.samples_per_step = micro_batch * grad_accum * self.world_size
        if self.is_main:
            self._write_effective_config(per_epoch)
        self._watch_optimizer_steps(self.engine)
        loader = MicroBatchLoader(
            data, rank=self.rank, world_size=self.world_size, micro_batch=micro_batch,
            grad_accum=grad_accum, max_steps=total_steps, seed=self.seed, collate_fn=collate_fn,
            device=self.device if device_placement else None, dtype=input_dtype(self.engine),
            start=resumed.get("micro_batches", 0), epoch_rng=resumed.get("epoch_rng"))
        self._loader = loader
        if resumed:
            # Last, so that the RNG continues exactly where the checkpointed run's was.
            checkpoint.restore_rng(resumed["rng"])
        self._last_step_time = time.time()
        return self.engine, loader

    def fit(self, model: torch.nn.Module, data: Any, loss_fn: Callable[..., Any] | None = None,
            eval_data: Any = None) -> Any:
        """Train `model` on `data` with the managed loop; see `nbtrain.worker.fit`."""
        from nbtrain.worker.fit import fit

        return fit(self, model, data, loss_fn=loss_fn, eval_data=eval_data)

    def to_device(self, batch: Any) -> Any:
        """Return `batch` as the loader gives it: tensors on `bigtrain.device`, floats in the engine's dtype.

        For a loop that takes batches from elsewhere, or `prepare(..., device_placement=False)`.
        """
        dtype = input_dtype(self.engine) if self.engine is not None else _config_dtype(self.config)
        return to_device(batch, self.device, dtype)

    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Record scalars at the current optimizer step (tensors are read with `.item()`)."""
        if step is None:
            step = int(self.engine.global_steps) if self.engine is not None else 0
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in scalars.items()}
        self._metrics.write(step, **values)

    def save_checkpoint(self, tag: str | None = None) -> str:
        """Save a DeepSpeed checkpoint into the run's checkpoints folder; every rank must call it.

        It is published (`checkpoints/latest.json`) only once every rank has written it, so a
        crash during the save leaves the previous checkpoint as the one `--resume` uses.
        """
        if self.engine is None:
            raise RuntimeError("call bigtrain.prepare (or fit) before save_checkpoint")
        step = int(self.engine.global_steps)
        tag = tag or f"step-{step}"
        if tag.startswith(".") or "/" in tag:
            raise ValueError(f"checkpoint tag {tag!r}: use a plain folder name (no '/', not starting with '.')")
        loader = self._loader
        state = {"rng": checkpoint.capture_rng(), "step": step,
                 "micro_batches": loader.position if loader is not None else 0,
                 "epoch_rng": loader.epoch_rng if loader is not None else None}
        path = checkpoint.save(self.engine, self._run.checkpoints, tag, self.rank, state)
        self._saved_step = step
        return str(path)

    def final_checkpoint(self) -> None:
        """Save the last step with --checkpoint-every, unless it was just saved (all ranks call it)."""
        if self._cfg.checkpoint_every and self.engine is not None \
                and self._saved_step != int(self.engine.global_steps):
            self.save_checkpoint()

    def __repr__(self) -> str:
        return (f"<bigtrain rank {self.rank}/{self.world_size} on {self.device}, "
                f"max_steps={self.max_steps}, run {self._run.run_id}>")

    # -- internals -------------------------------------------------------------------------
    def _load_resume_checkpoint(self) -> dict[str, Any]:
        """Load the `--resume` checkpoint into the new engine; return this rank's saved state."""
        target = self._run.run_info().get("resume_from")
        if not target:
            return {}
        found = published(Path(target["run"]))
        if found is None or found.tag != target["tag"]:
            raise RuntimeError(f"the checkpoint to resume from is gone: {target['run']}/checkpoints/{target['tag']}")
        state = checkpoint.load(self.engine, found, self.rank)
        self._saved_step = int(self.engine.global_steps)
        return state

    def _checkpoint_due(self) -> None:
        every = self._cfg.checkpoint_every
        if every and int(self.engine.global_steps) % every == 0:
            self.save_checkpoint()

    def _plan_length(self, data: Any) -> tuple[int, int, int, int]:
        micro: Any = self.config.get("train_micro_batch_size_per_gpu")
        if micro == FROM_DATALOADER:
            micro = getattr(data, "batch_size", None) or defaults.DEFAULT_MICRO_BATCH
        elif isinstance(data, torch.utils.data.DataLoader) and data.batch_size not in (None, micro):
            raise ValueError(f"the DataLoader's batch_size is {data.batch_size} but the micro-batch is {micro} "
                             "(--micro-batch or the config file); drop one of them")
        grad_accum = int(self.config.get("gradient_accumulation_steps") or 1)
        per_epoch = batches_per_epoch(data, micro, self.world_size)
        if self._cfg.steps is not None:
            total = self._cfg.steps
        else:
            epochs = self._cfg.epochs or defaults.DEFAULT_EPOCHS
            total = per_epoch * epochs // grad_accum
            if total == 0:
                raise ValueError(f"{epochs} epoch(s) of {per_epoch} micro-batches per rank make no complete "
                                 f"optimizer step with --grad-accum {grad_accum}; use more data or --steps")
        return int(micro), grad_accum, int(total), per_epoch

    def _build_engine(self, model: torch.nn.Module, grad_accum: int) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs

        # Without an explicit backend, accelerate leaves it unset on CPU and reports one
        # process per rank (so data is not sharded); gloo is the CPU backend.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(self.config), zero3_init_flag=False)
        # accelerate overwrites steps_per_print with inf; a value the user set must hold.
        if "steps_per_print" in self.config:
            plugin.deepspeed_config["steps_per_print"] = self.config["steps_per_print"]
        # The worker joined the process group before the cell (with the collective timeout
        # that backs up --hang-timeout); accelerate finds it up and keeps it.
        self.accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=grad_accum,
                                       kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])
        self.timeline.mark("accelerator_ready")
        optimizer = DummyOptim(model.parameters())
        if "scheduler" in self.config:
            scheduler = DummyScheduler(optimizer, total_num_steps=self.max_steps)
            engine, _, _ = self.accelerator.prepare(model, optimizer, scheduler)
        else:
            engine, _ = self.accelerator.prepare(model, optimizer)
        return engine

    def _write_effective_config(self, per_epoch: int) -> None:
        engine = self.engine
        facts = {
            "zero_stage": engine.zero_optimization_stage(),
            "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "grad_accum": engine.gradient_accumulation_steps(),
            "train_batch_size": engine.train_batch_size(),
            "world_size": self.world_size, "max_steps": self.max_steps, "micro_batches_per_epoch": per_epoch,
            "parameters": sum(p.numel() for p in self._skeletons[id(self._prepared_model)].parameters()),
            "optimizer": type(engine.optimizer).__name__, "scheduler": type(engine.lr_scheduler).__name__,
        }
        write_json_atomic(self._run.effective_deepspeed_file,
                          {"config": json.loads(json.dumps(engine.config, default=str)), "engine": facts})

    def _watch_optimizer_steps(self, engine: Any) -> None:
        """Record step, LR and throughput (rank 0) each time the optimizer steps."""
        original_step = engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0] if boundary else None  # the LR this step uses
            result = original_step(*args, **kwargs)
            if boundary and self.is_main:
                now = time.time()
                seconds, self._last_step_time = now - self._last_step_time, now
                record: dict[str, Any] = {"lr": lr, "step_time_s": seconds,
                                          "samples_per_s": self.samples_per_step / max(seconds, 1e-9)}
                if self.tokens_in_step:
                    record["tokens_per_s"] = self.tokens_in_step * self.world_size / max(seconds, 1e-9)
                    self.tokens_in_step = 0
                self._metrics.write(int(engine.global_steps), **record)
                if "first_step" not in self.timeline:
                    self.timeline.mark("first_step", now)
            if boundary:
                self._checkpoint_due()
            return result

        engine.step = step

    def consolidated_out(self, value: Any) -> Any:
        """Return `value` ready to send to the kernel: a prepared model comes with full fp32 weights."""
        from nbtrain.worker.fit import consolidated_model

        if isinstance(value, torch.nn.Module) and (value is self._prepared_model or value is self.engine):
            return consolidated_model(self, self._prepared_model)
        return value

    def close(self) -> None:
        self._metrics.close()


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """Return the inputs' dtype the DeepSpeed config asks for (before there is an engine)."""
    return precision_dtype(bf16=get_path(config, "bf16.enabled") is True, fp16=get_path(config, "fp16.enabled") is True)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of `model` whose parameters are on the meta device (no memory).

    Buffers are copied for real (they are small and may not be in the state dict). The copy
    is taken before DeepSpeed changes the model in place, and receives the consolidated
    weights at the end.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                 requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)
