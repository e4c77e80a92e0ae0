"""The launch form: prefilled from params.yaml, validated by the stages' schema, nothing launched on error."""
import pytest
from PySide6.QtCore import Qt

from gui.launch import LaunchForm, check
from xbmcore.config import validate_params


@pytest.fixture
def form(qtbot, project):
    f = LaunchForm(project / "params.yaml")
    qtbot.addWidget(f)
    return f


def _type(qtbot, form, key, text):
    ed = form.editors[key]
    ed.clear()
    qtbot.keyClicks(ed, text)


def test_prefilled_from_params_yaml(form):
    assert form.editors["train.batch_size"].text() == "16"
    assert form.editors["train.device"].currentText() == "cpu"
    assert form.editors["margin"].text() == "0.5"
    assert form.editors["memory.enabled"].isChecked()
    assert form.overrides() == ([], {})
    # choices come from the schema's Literal types
    combo = form.editors["data.name"]
    assert [combo.itemText(i) for i in range(combo.count())] == ["synthetic", "sop", "inshop", "cub", "cars",
                                                                 "vehicleid", "folder", "csv"]


def test_bad_value_shown_at_the_field_and_nothing_launched(qtbot, form):
    _type(qtbot, form, "train.lr", "fast")
    with qtbot.assertNotEmitted(form.run_requested), qtbot.assertNotEmitted(form.tune_requested):
        qtbot.mouseClick(form.run_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(form.tune_button, Qt.MouseButton.LeftButton)
    err = form.errors["train.lr"]
    assert not err.isHidden() and "number" in err.text()
    assert form.editors["train.lr"].property("invalid") is True
    assert all(form.errors[k].isHidden() for k in form.errors if k != "train.lr")
    assert "fix the highlighted fields" in form.command.text()


def test_out_of_range_and_cross_field_rules(qtbot, form):
    _type(qtbot, form, "memory.ratio", "1.5")
    assert "less than or equal to 1" in form.errors["memory.ratio"].text()
    _type(qtbot, form, "memory.ratio", "0.2")
    assert form.errors["memory.ratio"].isHidden()
    # batch_size must be a multiple of images_per_class: a rule on the section, shown at both fields
    _type(qtbot, form, "train.batch_size", "30")
    assert "multiple of images_per_class" in form.errors["train.batch_size"].text()
    assert not form.errors["train.images_per_class"].isHidden()
    with qtbot.assertNotEmitted(form.run_requested):
        qtbot.mouseClick(form.run_button, Qt.MouseButton.LeftButton)
    _type(qtbot, form, "train.images_per_class", "5")
    assert not form.has_errors()


def test_overrides_are_the_changed_values_and_validate(qtbot, form, project):
    _type(qtbot, form, "train.lr", "3e-4")
    form.editors["memory.mode"].setCurrentText("index")
    with qtbot.waitSignal(form.run_requested) as sig:
        qtbot.mouseClick(form.run_button, Qt.MouseButton.LeftButton)
    overrides = sig.args[0]
    assert overrides == ["memory.mode=index", "train.lr=0.0003"]
    params, errors = check({}, overrides)
    assert errors == {} and params.train.lr == 3e-4 and params.memory.mode == "index"
    assert "-S memory.mode=index -S train.lr=0.0003" in form.command.text()


def test_margin_follows_the_loss(qtbot, form):
    form.editors["loss.name"].setCurrentText("triplet")
    assert form.resolved_key("margin") == "loss.triplet_margin"
    assert form.editors["margin"].text() == "0.1"  # the schema default of triplet_margin
    _type(qtbot, form, "margin", "0.2")
    assert form.overrides()[0] == ["loss.name=triplet", "loss.triplet_margin=0.2"]
    _type(qtbot, form, "margin", "-1")  # triplet_margin >= 0
    assert "greater than or equal to 0" in form.errors["margin"].text()
    form.editors["loss.name"].setCurrentText("contrastive")  # back: the contrastive margin as it was
    assert form.editors["margin"].text() == "0.5" and not form.has_errors()


def test_other_overrides_checked_by_the_schema(qtbot, form):
    qtbot.keyClicks(form.extra, "memory.weight=0.25 model.embedding_dim=64")
    assert form.overrides() == (["memory.weight=0.25", "model.embedding_dim=64"], {})
    form.extra.clear()
    qtbot.keyClicks(form.extra, "memory.wieght=0.25")
    assert "unknown key" in form.extra_error.text() and form.section_error.isHidden()
    form.extra.clear()
    qtbot.keyClicks(form.extra, "memory.weight")
    assert "expected key=value" in form.extra_error.text()


def test_set_values_routes_unknown_keys_to_other_overrides(form):
    form.set_values({"memory.ratio": "0.3", "loss.ms_beta": "40.0"})
    assert form.editors["memory.ratio"].text() == "0.3"
    assert form.extra.text() == "loss.ms_beta=40.0"
    overrides, errors = form.overrides()
    assert errors == {} and overrides == ["memory.ratio=0.3", "loss.ms_beta=40.0"]


def test_bad_params_yaml_is_said_and_defaults_shown(qtbot, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  batch_sise: 8\n")
    f = LaunchForm(path)
    qtbot.addWidget(f)
    assert "batch_sise" in f.file_error.text() and not f.file_error.isHidden()
    assert f.editors["train.batch_size"].text() == str(validate_params({}).train.batch_size)


def test_changes_are_judged_against_params_yaml_as_it_is_now(form, project):
    # `dvc exp run -S train.lr=0.0003` writes the value into params.yaml; the form still says 0.001,
    # so the next launch must pass train.lr=0.001 explicitly
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 0.0003"))
    assert form.editors["train.lr"].text() == "0.001"
    assert form.overrides() == (["train.lr=0.001"], {})


def test_params_yaml_is_read_once_per_change_of_the_file(form, project, monkeypatch):
    from gui import launch

    reads = []
    real = launch._read_base
    monkeypatch.setattr(launch, "_read_base", lambda path: (reads.append(path), real(path))[1])
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 0.002"))
    for _ in range(5):  # keystrokes and panel refreshes: one read for the changed file, then none
        form._changed()
        first = launch.load_base(path)
    assert len(reads) == 1 and first[1].train.lr == 0.002 and launch.load_base(path) is first
    path.write_text(path.read_text().replace("lr: 0.002", "lr: 0.0005"))
    assert launch.load_base(path)[1].train.lr == 0.0005 and len(reads) == 2
    path.unlink()
    assert launch.load_base(path)[2].endswith("not found: showing the schema defaults") and len(reads) == 3
