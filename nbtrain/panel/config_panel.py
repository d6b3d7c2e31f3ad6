"""`ConfigPanel`: an ipywidgets form over the `%%bigtrain` config tree.

The panel edits config and nothing else. Every change renders and validates the settings
the way `%%bigtrain` does (`plan_run`), recomputes the memory estimate and the LR curve
(with DeepSpeed's own scheduler classes), and keeps the last valid settings as its value:
`panel.config`, `panel.to_deepspeed()` and `%%bigtrain --config panel` never see an
invalid config.

>>> panel = ConfigPanel(model=make_model())          # doctest: +SKIP
>>> panel                                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w
from traitlets import TraitError

from nbtrain.config.arguments import to_line
from nbtrain.config.keys import SCHEDULER_TYPES
from nbtrain.config.machine import MachineFacts, detect_machine
from nbtrain.config.plan import RunPlan, default_nproc, load_base, plan_run
from nbtrain.config.render import get_path, render_collecting, resolve_batch
from nbtrain.config.schedules import LrCurve, ScheduleError, lr_curve
from nbtrain.config.tree import TrainConfig
from nbtrain.errors import ConfigError, Problem
from nbtrain.panel import form, views
from nbtrain.panel.fields import SECTIONS, STAGE_HELP, all_fields, fields_of, scheduler_param_fields
from nbtrain.panel.inputs import FieldInput

DEFAULT_PREVIEW_STEPS = 100
# Rows shown only where the other choices make them apply (fp16 loss scaling, Adam's betas, ...).
OPTIONAL_ROWS = {f.name for f in all_fields() if f.name.startswith(("fp16.", "optimizer.params."))
                 or f.name.endswith("pin_memory")}
_FOLLOWS = {name: f"follows {source} (set it there)" for name, source in form.DERIVED.items()}


class ConfigPanel:
    """Configure a DeepSpeed run in a form; use it with `%%bigtrain --config panel`.

    `model` (a torch module, or a parameter count) sizes the memory estimate; `config`
    (a DeepSpeed JSON file or dict) is the starting point; `nproc` and `steps` set the
    process count (global batch, memory) and the run length (LR schedule) to plan for
    (without `nproc`, a config that gives all three batch sizes says its world size).

    `panel.config` (= `panel.to_deepspeed()`) is the DeepSpeed dict, as `RunResult.config`
    and `bigtrain.config` are: a loaded config comes back exactly as loaded, plus exactly
    the keys changed in the form; without `config=` it is complete (nbtrain's defaults
    written out). `panel.train_config` is the `TrainConfig` of the same settings (the
    `%%bigtrain` line `panel.flags`). A loaded setting the form cannot offer or that
    DeepSpeed would refuse (an NVMe path that does not exist) is shown next to its field,
    and the panel has no valid value until it is fixed.
    """

    def __init__(self, model: Any = None, config: str | Path | Mapping[str, Any] | None = None, *,
                 nproc: int | None = None, steps: int | None = None, machine: MachineFacts | None = None):
        self.machine = machine or detect_machine()
        self.model = model
        self.param_count = views.count_parameters(model)
        self._source: str | None = None
        self._loaded = config is not None
        if isinstance(config, (str, Path)):
            self._source = str(config)
            self._base = load_base(self._source)
        else:
            self._base = copy.deepcopy(dict(config or {}))
        self._pinned: set[str] = set()
        self._quiet = False
        self._valid: tuple[form.FormResult, RunPlan, LrCurve, dict[str, Any]] | None = None
        self._plotted: LrCurve | None = None
        self.problems: tuple[Problem, ...] = ()
        self.notes: tuple[str, ...] = ()
        values = self._loaded_values(nproc, steps)
        self.inputs = {f.name: FieldInput(f) for f in all_fields()}
        self._build()
        unshown = []
        # Loaded values the form would not offer stay shown, for the validator to judge.
        self._keep = form.unoffered(values, form.allowed_choices(values, self.machine))
        with self._quietly():
            self._apply_choices(values, form.allowed_choices(values, self.machine, self._keep))
            for name, item in self.inputs.items():
                try:
                    item.value = values[name]
                except TraitError:  # e.g. a stage 5 in the file: the validator says what is wrong
                    unshown.append(f"{name} = {values[name]!r} from the config cannot be shown in the form")
        self._load_notes = tuple(unshown)
        # What the form shows as loaded: a key is written only where the form changes it from this.
        self._initial = self.values()
        initial = form.to_config(self._initial, self._base)
        self._initial_config = initial.config
        self._before = render_collecting(initial.config, initial.base)[0].deepspeed
        for name, item in self.inputs.items():
            item.observe(self._observer(name))
        self._update()

    def _loaded_values(self, nproc: int | None, steps: int | None) -> dict[str, Any]:
        """Return the field values the loaded config gives (DeepSpeed's or nbtrain's defaults elsewhere)."""
        nproc = nproc or form.world_size_of(self._base) or default_nproc(self.machine)[0]
        total = get_path(self._base, "scheduler.params.total_num_steps")
        shown = resolve_batch(render_collecting(TrainConfig(), self._base)[0].deepspeed, nproc)
        return form.display_defaults(form.values_from(shown), nproc,
                                     steps or (total if isinstance(total, int) else DEFAULT_PREVIEW_STEPS))

    # -- public API ---------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Return the DeepSpeed dict of the last valid settings (the same as `to_deepspeed()`)."""
        return self.to_deepspeed()

    @property
    def train_config(self) -> TrainConfig:
        """Return the TrainConfig of the last valid settings: it runs what `--config panel` runs."""
        result = self._require_valid()[0]
        if self._loaded:  # only what the form changed: the rest comes from the loaded config
            result = form.changed_only(self._initial_config, result)
        return form.standalone(result, self._source, self._base)

    @property
    def flags(self) -> str:
        """Return the `%%bigtrain` flags of the last valid settings."""
        return to_line(self.train_config)

    @property
    def lr_curve(self) -> LrCurve:
        """Return the LR of each step of the planned run, from DeepSpeed's own scheduler."""
        return self._require_valid()[2]

    def to_deepspeed(self) -> dict[str, Any]:
        """Return the DeepSpeed dict of the last valid settings (what `--config panel` uses).

        A loaded config comes back equal to itself, plus exactly the keys the form changed.
        """
        return copy.deepcopy(self._require_valid()[3])

    def set(self, **values: Any) -> None:
        """Set fields by name, as a user would (`panel.set(zero=3, lr=0.01)`); dotted keys via a dict."""
        for name, value in values.items():
            if name not in self.inputs:
                raise KeyError(f"the panel has no field {name!r}; its fields: {', '.join(self.inputs)}")
            self.inputs[name].value = value

    def save_json(self, path: str | Path | None = None) -> Path:
        """Write the DeepSpeed JSON of the last valid settings; return the file."""
        target = Path(path if path is not None else self._save_path.value).expanduser()
        target.write_text(json.dumps(self.to_deepspeed(), indent=2) + "\n")
        self._save_status.value = f"saved {target.resolve()}"
        return target

    def copy_line(self) -> str:
        """Show (and return) the `%%bigtrain` cell line of the last valid settings."""
        line = f"%%bigtrain {self.flags}"
        self._line.value = line
        self._line.layout.display = None
        return line

    def summary(self) -> str:
        """Return a plain-text summary of the settings and their problems."""
        if self._valid is None:
            return "ConfigPanel: no valid settings yet\n" + "\n".join(f"  - {p}" for p in self.problems)
        result, plan, _, _ = self._valid
        text = views.summary(plan.deepspeed, plan.nproc, self.inputs["steps"].value, self.flags)
        text += "\n" + views.memory_text(plan.deepspeed, plan.nproc, self.param_count)
        if self.problems:
            text += f"\n{len(self.problems)} problem(s) in the form; these are the last valid settings"
        return text

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # The widget view, plus text that a saved notebook (no widget state) still shows.
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/plain"] = self.summary()
        return bundle

    # -- layout -------------------------------------------------------------------------
    def _build(self) -> None:
        self._stage_help = w.HTML()
        self._global_batch = w.HTML()
        self._problems_box = w.HTML()
        self._notes_box = w.HTML()
        self._memory = w.HTML()
        self._plot = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self._json = w.HTML()
        self._line = w.Textarea(layout=w.Layout(width="100%", display="none"), rows=3)
        self._save_path = w.Text(value="ds_config.json", layout=w.Layout(width="14em"))
        self._save_status = w.HTML()
        copy_button = w.Button(description="Copy as %%bigtrain", icon="copy", layout=w.Layout(width="auto"))
        copy_button.on_click(lambda _: self._safely(self.copy_line))
        save_button = w.Button(description="Save JSON", icon="save", layout=w.Layout(width="auto"))
        save_button.on_click(lambda _: self._safely(self.save_json))
        sections = []
        for section in SECTIONS:
            rows: list[w.Widget] = [item.row for item in self.inputs.values() if item.field.section == section]
            if section == "ZeRO":
                rows.insert(1, self._stage_help)
            if section == "Batch":
                rows.insert(2, self._global_batch)
            box = w.VBox(rows)
            if section == "Advanced":
                sections.append(w.Accordion([box], titles=("Advanced (ZeRO communication and stage 3)",),
                                            selected_index=None))
            else:
                sections.append(w.VBox([w.HTML(f"<b>{section}</b>"), box]))
        json_box = w.Accordion([self._json], titles=("DeepSpeed JSON",), selected_index=None)
        outputs = w.VBox([self._memory, self._plot, json_box,
                          w.HBox([copy_button, save_button, self._save_path],
                                 layout=w.Layout(flex_flow="row wrap")),
                          self._line, self._save_status],
                         layout=w.Layout(flex="1 1 22em", min_width="0"))
        form_box = w.VBox(sections, layout=w.Layout(flex="1 1 28em", min_width="0"))
        self.widget = w.VBox([self._problems_box, self._notes_box,
                              w.Box([form_box, outputs], layout=w.Layout(flex_flow="row wrap"))])

    # -- live updates -------------------------------------------------------------------
    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        self._quiet, before = True, self._quiet
        try:
            yield
        finally:
            self._quiet = before

    def _observer(self, name: str) -> Any:
        return lambda _change: self._on_change(name)

    def _on_change(self, name: str) -> None:
        if self._quiet:
            return
        self._keep.pop(name, None)  # the user chose it: a loaded value is no longer kept on offer
        if not self.inputs[name].field.is_flag:
            self._pinned.add(name)  # the user chose it: it no longer follows derived values
        self._update()

    def values(self) -> dict[str, Any]:
        """Return every field's current value by name."""
        return {name: item.value for name, item in self.inputs.items()}

    def _update(self) -> None:
        values = self.values()
        allowed = form.allowed_choices(values, self.machine, self._keep)
        notes = form.coerce(values, allowed, self._keep)
        with self._quietly():
            self._apply_choices(values, allowed)
        result = form.to_config(values, self._base, self._pinned, self._initial if self._loaded else None)
        problems: tuple[Problem, ...] = ()
        try:
            ds, plan = self._plan(result, values)
            curve = lr_curve(plan.deepspeed, values["steps"])
        except ConfigError as e:
            problems = e.problems
        except ScheduleError as e:
            problems = (e.problem,)
        else:
            self._valid = (result, plan, curve, ds)
            self._show_derived(plan.deepspeed)
        self.problems = problems
        if values["qat"] != "none":
            notes.append(f"QAT is a %%bigtrain flag, not a DeepSpeed key: `--config panel` does not carry it; "
                         f"add --qat {values['qat']} to the cell line (Copy as %%bigtrain includes it)")
        self.notes = self._load_notes + tuple(notes) + result.notes
        self._show(values, allowed)

    def _plan(self, result: form.FormResult, values: Mapping[str, Any]) -> tuple[dict[str, Any], RunPlan]:
        """Return the panel's DeepSpeed dict and the plan `%%bigtrain --config panel` makes of it; raise ConfigError."""
        if not self._loaded:  # a fresh panel's dict is complete: what the form shows, defaults written out
            plan = plan_run(result.config, self.machine, result.base)
            return plan.deepspeed, plan
        after, problems = render_collecting(result.config, result.base)
        if problems:
            raise ConfigError(problems)
        ds = form.changed_dict(self._before, after.deepspeed, self._base)
        # Checked as the cell will run it: the same dict under the panel's process count and length.
        return ds, plan_run(TrainConfig(nproc=values["nproc"], steps=values["steps"]), self.machine, ds)

    def _apply_choices(self, values: dict[str, Any], allowed: dict[str, form.Choice]) -> None:
        for name in ("offload_optimizer", "offload_param", "precision", "optimizer", "qat"):
            self.inputs[name].set_options(allowed[name].options)
        for name in ("qwz", "qgz"):
            self.inputs[name].value = values[name]
            self.inputs[name].set_disabled(len(allowed[name].options) < 2)
        self.inputs["hpz"].value = values["hpz"]
        self.inputs["hpz"].set_disabled(bool(allowed["hpz"].reason))
        for name, item in self.inputs.items():
            if name.startswith("zero_optimization.stage3_"):
                item.set_disabled(values["zero"] != 3)
        for name in form.DERIVED:
            self.inputs[name].set_disabled(True)
        active = set(form.active_set_fields(values))
        kind = SCHEDULER_TYPES.get(values["scheduler"])
        current = {f.name for f in scheduler_param_fields().get(kind or "", [])}
        for name, item in self.inputs.items():
            if name.startswith("scheduler.params."):
                item.show(name in current)
            elif name in OPTIONAL_ROWS:
                item.show(name in active)
        self.inputs["nvme_path"].show("nvme" in (values["offload_optimizer"], values["offload_param"]))

    def _show_derived(self, ds: Mapping[str, Any]) -> None:
        """Show what render() derived (e.g. the scheduler's peak from the LR) in fields the user did not set."""
        shown = form.values_from(ds)
        with self._quietly():
            for name, item in self.inputs.items():
                if item.field.is_flag or name in self._pinned or shown.get(name) is None:
                    continue
                if item.value != shown[name]:
                    with contextlib.suppress(TraitError):  # e.g. accelerate's "auto": the dict keeps it
                        item.value = shown[name]

    def _show(self, values: dict[str, Any], allowed: dict[str, form.Choice]) -> None:
        self._stage_help.value = f"<i>{views.escape(STAGE_HELP[values['zero']])}</i>"
        micro, accum, nproc = values["micro_batch"], values["grad_accum"], values["nproc"]
        self._global_batch.value = (f"global batch = {micro} x {accum} x {nproc} processes = "
                                    f"<b>{micro * accum * nproc}</b> samples per optimizer step")
        by_field: dict[str, list[Problem]] = {}
        for problem in self.problems:  # next to each field it is about; every problem is listed above the form too
            for name in fields_of(problem):
                by_field.setdefault(name, []).append(problem)
        for name, item in self.inputs.items():
            reason = allowed[name].reason if name in allowed else _FOLLOWS.get(name, "")
            note = f"<span style='color:#666'>{views.escape(reason)}</span>" if reason else ""
            item.message.value = " ".join(filter(None, [note, views.field_message_html(by_field.get(name, []))]))
        self._problems_box.value = views.problems_html(self.problems)
        self._notes_box.value = "".join(f"<div style='color:#666'>note: {views.escape(n)}</div>" for n in self.notes)
        if self._valid is not None:
            _, plan, curve, ds = self._valid
            self._memory.value = views.memory_html(plan.deepspeed, plan.nproc, self.param_count, self.model)
            if curve != self._plotted:  # drawing costs more than the rest of an update together
                self._plot.value = views.curve_png(curve)
                self._plotted = curve
            self._json.value = f"<pre>{views.escape(json.dumps(ds, indent=2))}</pre>"

    def _require_valid(self) -> tuple[form.FormResult, RunPlan, LrCurve, dict[str, Any]]:
        if self._valid is None:
            raise ConfigError(self.problems)
        return self._valid

    def _safely(self, action: Any) -> None:
        try:
            action()
        except (ConfigError, OSError) as e:
            self._save_status.value = f"<span style='color:#b00020'>{views.escape(str(e))}</span>"
