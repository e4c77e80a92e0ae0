"""The launch form: the tunable params, prefilled from params.yaml, checked with the stages' own schema.

What the form changes becomes `dvc exp run -S key=value` overrides; on each edit, the overrides are applied to
params.yaml's content and validated by `xbmcore.config.validate_params`, and each of the schema's error records
is shown under the fields it names (a rule across fields at each of them). Nothing is launched while there is one.
params.yaml itself is read and validated once per change of the file (`load_base`).
"""
from __future__ import annotations

import copy
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QGridLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSizePolicy, QVBoxLayout,
    QWidget,
)

from xbmcore.config import ParamError, Params, ParamsError, set_dotted, validate_params

# The margin each loss actually uses (the form shows one "margin" field and edits the right key).
MARGIN_KEY = {"contrastive": "loss.margin", "triplet": "loss.triplet_margin", "multi_similarity": "loss.ms_epsilon"}


@dataclass(frozen=True)
class Field:
    key: str          # dotted params key ("margin" is resolved through MARGIN_KEY)
    label: str
    help: str


FIELDS = (
    Field("data.name", "Dataset", "Benchmark to train on; `synthetic` is generated from a seed and needs no download."),
    Field("loss.name", "Loss", "Pair-based loss applied to the batch and to the memory."),
    Field("margin", "Margin", "Margin of the chosen loss (contrastive: negative-similarity margin; triplet: "
          "distance margin; multi-similarity: pair-mining epsilon)."),
    Field("memory.enabled", "Memory (XBM)", "Off trains the batch-only baseline with the same schedule."),
    Field("memory.ratio", "Memory ratio", "Share of the training set kept in the memory, K = ratio x N. Larger "
          "gives more negatives per anchor; it is valid because embeddings drift slowly after the warm-up."),
    Field("memory.mode", "Memory mode", "queue: the paper's FIFO of recent batches; index: one slot per image, "
          "updated in place (drift measured exactly)."),
    Field("memory.momentum", "Memory momentum", "0: the model writes the entries; 0.99-0.999: a moving average of "
          "the model does (MoCo's key encoder), which keeps them consistent as the model moves."),
    Field("memory.store", "Memory stores", "embedding: the paper's; features: the backbone's features, embedded by "
          "the current head at every step, so the entries follow the head."),
    Field("train.batch_size", "Batch size", "B images per step; a multiple of the images per class."),
    Field("train.images_per_class", "Images per class", "M images of each sampled class in a batch (P x M = B)."),
    Field("train.lr", "Learning rate", "Optimiser learning rate."),
    Field("train.warmup_steps", "Warm-up steps", "Steps without memory, until embeddings drift slowly."),
    Field("train.xbm_steps", "XBM steps", "Steps with the memory after the warm-up."),
    Field("train.device", "Device", "auto picks CUDA when available."),
    Field("train.seed", "Seed", "Seed of sampling, initialisation and augmentation."),
)

EXTRA = "_extra"  # key of the other-overrides text in state()


def _annotation(key: str) -> Any:
    model: Any = Params
    *sections, name = key.split(".")
    for s in sections:
        model = model.model_fields[s].annotation
    return model.model_fields[name].annotation


def choices(key: str) -> tuple | None:
    """Allowed values of a Literal (or bool) field, read from the schema so the form never drifts from it."""
    ann = _annotation(key)
    if ann is bool:
        return (True, False)
    if typing.get_origin(ann) is typing.Literal:
        return typing.get_args(ann)
    return None


def dotted_get(d: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        d = d[p]
    return d


def format_value(v: Any) -> str:
    """A value as an override writes it (`true`, `0.001`, `1e-05`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _read_base(path: Path) -> tuple[dict[str, Any], Params, str | None]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        return raw, validate_params(raw, str(path)), None
    except FileNotFoundError:
        return {}, Params(), f"{path} not found: showing the schema defaults"
    except (ValueError, yaml.YAMLError) as err:
        return {}, Params(), str(err)


_bases: dict[Path, tuple[tuple[int, int, int] | None, tuple[dict[str, Any], Params, str | None]]] = {}


def load_base(path: Path) -> tuple[dict[str, Any], Params, str | None]:
    """params.yaml as raw mapping and validated; on a bad file, the schema defaults and the error.

    Read and validated once per change of the file: each call costs one stat (modification time, size, inode),
    so the panels and the form may ask on every refresh. The raw mapping is shared: copy it before changing it."""
    path = Path(path)
    try:
        st = path.stat()
        stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None
    cached = _bases.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    base = _read_base(path)
    _bases[path] = (stamp, base)
    return base


def check(base_raw: dict[str, Any], assignments: list[str]) -> tuple[Params | None, dict[str, ParamError]]:
    """Apply `key=value` assignments to a copy of params.yaml's content and validate with the stages' schema.

    Returns (params, {}) or (None, {dotted path: the schema's error record}); a rule across fields is keyed by
    its section and names the fields in the record's `fields`.
    """
    raw = copy.deepcopy(base_raw)
    for a in assignments:
        try:
            set_dotted(raw, a)
        except ValueError as err:  # no "=", or a key through a non-section: keyed by what was assigned
            key = a.split("=", 1)[0].strip()
            return None, {key: ParamError(key, str(err), a)}
    try:
        return validate_params(raw, "form"), {}
    except ParamsError as err:
        return None, {e.path: e for e in err.errors}


def _error_label() -> QLabel:
    label = QLabel()
    label.setObjectName("fieldError")  # styled red by the theme
    label.setWordWrap(True)
    label.hide()
    return label


def _mark(editor: QWidget, label: QLabel, message: str | None) -> None:
    """Show a message under a field and outline the field (the theme styles [invalid="true"])."""
    label.setText(message or "")
    label.setVisible(bool(message))
    editor.setProperty("invalid", bool(message))
    editor.style().unpolish(editor)
    editor.style().polish(editor)


class LaunchForm(QWidget):
    """Tunable params with per-field errors, a preview of the command, and Run / Tune / Stop."""

    run_requested = Signal(list)    # overrides, validated
    tune_requested = Signal(list)
    stop_requested = Signal()

    def __init__(self, params_path: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.params_path = params_path
        self.editors: dict[str, QWidget] = {}
        self.errors: dict[str, QLabel] = {}
        self.labels: dict[str, QLabel] = {}
        self._margin_key = "loss.margin"
        self._values: dict[str, str] = {}   # text per resolved key, so switching loss keeps each margin

        self.file_error = _error_label()

        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        grid.setVerticalSpacing(2)
        row = 0
        for f in FIELDS:
            label = QLabel(f.label)
            self.labels[f.key] = label
            label.setToolTip(f.help)
            opts = choices(MARGIN_KEY["contrastive"] if f.key == "margin" else f.key)
            if opts == (True, False):
                ed: QWidget = QCheckBox()
                ed.toggled.connect(self._changed)
            elif opts is not None:
                ed = QComboBox()
                ed.addItems([str(o) for o in opts])
                # the loss combo re-validates through _loss_changed, after the margin field follows it
                ed.currentTextChanged.connect(self._loss_changed if f.key == "loss.name" else self._changed)
            else:
                ed = QLineEdit()
                ed.textEdited.connect(self._changed)
            ed.setToolTip(f.help)
            ed.setObjectName(f.key)
            err = _error_label()
            grid.addWidget(label, row, 0)
            grid.addWidget(ed, row, 1)
            grid.addWidget(err, row + 1, 1)
            self.editors[f.key], self.errors[f.key] = ed, err
            row += 2
        # any other key of the schema, e.g. the best params of a study that the fields above do not cover
        self.extra = QLineEdit()
        self.extra.setObjectName("extra")
        self.extra.setPlaceholderText("key=value …  e.g. memory.weight=0.5")
        self.extra.setToolTip("More `-S key=value` overrides, space-separated; checked by the same schema")
        self.extra.textEdited.connect(self._changed)
        self.extra_error = _error_label()
        grid.addWidget(QLabel("Other overrides"), row, 0)
        grid.addWidget(self.extra, row, 1)
        grid.addWidget(self.extra_error, row + 1, 1)

        self.section_error = _error_label()

        self.command = QLabel()
        self.command.setObjectName("commandPreview")
        self.command.setWordWrap(True)
        self.command.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("runButton")
        self.run_button.setToolTip("Start the pipeline: dvc exp run -S <changed params>")
        self.tune_button = QPushButton("Tune")
        self.tune_button.setToolTip("Start an Optuna study (python -m pipeline.tune) with these params fixed")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop the child cleanly: it finishes its step and keeps its checkpoint")
        self.stop_button.setEnabled(False)
        self.reset_button = QPushButton("Reload params.yaml")
        self.run_button.clicked.connect(lambda: self._launch(self.run_requested))
        self.tune_button.clicked.connect(lambda: self._launch(self.tune_requested))
        self.stop_button.clicked.connect(self.stop_requested)
        self.reset_button.clicked.connect(self.reload)

        buttons = QHBoxLayout()
        for b in (self.run_button, self.tune_button, self.stop_button):
            b.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            buttons.addWidget(b)

        title = QLabel(f"<b>params.yaml</b> <span style='color:gray'>{params_path}</span>")
        title.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addWidget(self.file_error)
        lay.addLayout(grid)
        lay.addWidget(self.section_error)
        lay.addWidget(self.reset_button)
        lay.addStretch(1)
        lay.addWidget(QLabel("Command"))
        lay.addWidget(self.command)
        lay.addLayout(buttons)
        self.reload()

    # --- values -------------------------------------------------------------------------------------------

    def resolved_key(self, key: str) -> str:
        return self._margin_key if key == "margin" else key

    def _text(self, key: str) -> str:
        ed = self.editors[key]
        if isinstance(ed, QCheckBox):
            return "true" if ed.isChecked() else "false"
        if isinstance(ed, QComboBox):
            return ed.currentText()
        return ed.text().strip()

    def _set_text(self, key: str, text: str) -> None:
        ed = self.editors[key]
        ed.blockSignals(True)
        if isinstance(ed, QCheckBox):
            ed.setChecked(text == "true")
        elif isinstance(ed, QComboBox):
            i = ed.findText(text)
            if i >= 0:
                ed.setCurrentIndex(i)
        else:
            ed.setText(text)
        ed.blockSignals(False)

    def values(self) -> dict[str, str]:
        """The fields' text per resolved dotted key."""
        return {self.resolved_key(f.key): self._text(f.key) for f in FIELDS}

    def extra_assignments(self) -> list[str]:
        return shlex.split(self.extra.text())

    def state(self) -> dict[str, str]:
        """Everything typed, for QSettings: the fields and the other overrides."""
        return {**self.values(), EXTRA: self.extra.text()}

    def set_values(self, values: dict[str, str]) -> None:
        """Set texts by dotted key (the last session's, a trial's best params): keys without a field go to the
        other overrides; impossible choices are ignored."""
        values = dict(values)
        extra = values.pop(EXTRA, None)
        if "loss.name" in values:
            self._set_text("loss.name", values["loss.name"])
            self._loss_changed(self._text("loss.name"), keep_text=False)
        for f in FIELDS:
            key = self.resolved_key(f.key)
            if key in values:
                self._set_text(f.key, values.pop(key))
        values.pop("loss.name", None)
        if extra is not None:
            self.extra.setText(extra)
        if values:  # keep what was typed for other keys, replacing the ones given here
            kept = [a for a in self.extra_assignments() if a.split("=", 1)[0] not in values]
            self.extra.setText(" ".join(kept + [f"{k}={v}" for k, v in values.items()]))
        self._changed()

    def _read_base(self) -> None:
        """params.yaml as it is now: `dvc exp run -S` writes its overrides into it, so a value is "changed" only
        against the file's current content."""
        self.base_raw, self.base, problem = load_base(self.params_path)
        self.file_error.setText(problem or "")
        self.file_error.setVisible(bool(problem))
        self._base_flat = self.base.flat()

    def reload(self) -> None:
        self._read_base()
        self._values.clear()
        self.extra.clear()
        for f in FIELDS:
            if f.key != "margin":
                self._set_text(f.key, format_value(self._base_flat[f.key]))
        self._loss_changed(self._text("loss.name"), keep_text=False)
        self._changed()

    def _loss_changed(self, loss: str, keep_text: bool = True) -> None:
        if keep_text:  # remember the margin typed for the previous loss
            self._values[self._margin_key] = self._text("margin")
        self._margin_key = MARGIN_KEY.get(loss, "loss.margin")
        text = self._values.get(self._margin_key, format_value(self._base_flat[self._margin_key]))
        self._set_text("margin", text)
        name = self._margin_key.split(".")[1]  # say which key when it is not plain loss.margin
        self.labels["margin"].setText("Margin" if name == "margin" else f"Margin <span style='color:gray'>({name})</span>")
        if keep_text:
            self._changed()

    # --- validation ---------------------------------------------------------------------------------------

    def overrides(self) -> tuple[list[str], dict[str, ParamError]]:
        """(overrides, errors by key): the fields that differ from params.yaml, then the other overrides as
        typed; [] and the errors when the schema rejects the result."""
        self._read_base()
        values = self.values()
        try:
            extra = self.extra_assignments()
        except ValueError as err:  # unbalanced quotes
            return [], {EXTRA: ParamError(EXTRA, str(err), self.extra.text())}
        bad = [a for a in extra if "=" not in a]
        if bad:
            return [], {EXTRA: ParamError(EXTRA, f"expected key=value, got {' '.join(bad)}", bad)}
        params, errors = check(self.base_raw, [f"{k}={v}" for k, v in values.items()] + extra)
        if params is None:
            return [], errors
        flat = params.flat()
        extra_keys = {a.split("=", 1)[0].strip() for a in extra}
        changed = [f"{k}={format_value(flat[k])}" for k in values
                   if k not in extra_keys and flat[k] != self._base_flat[k]]
        return changed + extra, {}

    def _show_errors(self, errors: dict[str, ParamError]) -> None:
        """Each error at the fields it names (a rule across fields at each of them), those about keys typed in
        the other overrides under that line, the rest under the form."""
        shown = set()
        for f in FIELDS:
            key = self.resolved_key(f.key)
            hit = next((e for e in errors.values() if key in e.keys()), None)
            if hit is not None:
                shown.add(hit.path)
            _mark(self.editors[f.key], self.errors[f.key], hit.message if hit else None)
        try:
            typed = tuple(a.split("=", 1)[0].strip() for a in self.extra_assignments())
        except ValueError:
            typed = ()
        at_extra, rest = [], []
        for path, e in errors.items():
            if path == EXTRA:
                at_extra.append(e.message)
            elif any(k in typed or k.startswith(tuple(t + "." for t in typed)) for k in e.keys()):
                at_extra.append(f"{path}: {e.message}")
            elif path not in shown:
                rest.append(f"{path}: {e.message}")
        _mark(self.extra, self.extra_error, "\n".join(at_extra))
        self.section_error.setText("\n".join(rest))
        self.section_error.setVisible(bool(rest))

    def _changed(self, *_: Any) -> None:
        overrides, errors = self.overrides()
        self._show_errors(errors)
        if errors:
            self.command.setText("<i>fix the highlighted fields</i>")
        else:
            args = " ".join(f"-S {o}" for o in overrides)
            self.command.setText(f"<code>dvc exp run {args}</code>")

    def has_errors(self) -> bool:
        return any(not e.isHidden() for e in (*self.errors.values(), self.extra_error, self.section_error))

    def _launch(self, signal: Any) -> None:
        overrides, errors = self.overrides()
        self._show_errors(errors)
        if not errors:
            signal.emit(overrides)

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.tune_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
