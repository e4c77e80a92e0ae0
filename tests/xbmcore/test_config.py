"""The params schema: every bounded field's edges, every choice, unknown keys, `-S` overrides, structured errors.

The cases are read from the schema itself (each section's fields and their pydantic constraints), so a field added
with a bound or a Literal is tested without touching this file.
"""
from __future__ import annotations

import argparse
import math
import typing

import annotated_types as at
import pytest
from pydantic import BaseModel

from pipeline.cli import add_params_arguments, load_cli_params
from xbmcore.config import ParamError, Params, ParamsError, load_params, set_dotted, validate_params

# Fields whose edge value breaks a rule across fields at the defaults: the companions that make the edge valid.
COMPANIONS = {
    "train.batch_size": {"train.images_per_class": 1},
    "data.synthetic.images_per_class_max": {"data.synthetic.images_per_class_min": 2},
    "tune.heartbeat_s": {"tune.stale_after_s": 1e300},
}
# Fields whose bound lies beneath a rule's (stale_after_s > 2 x heartbeat_s > 0): at the edge, only the rule speaks.
BENEATH_A_RULE = {"tune.stale_after_s"}


def _fields(model: type[BaseModel] = Params, prefix: str = ""):
    """(dotted key, annotation, field info) of every leaf field of the schema, sections walked recursively."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ann, info


def _is_int(ann) -> bool:
    args = typing.get_args(ann) or (ann,)
    return int in args and float not in args


def _bounds():
    """(key, value just inside, value just outside, what) for each bound of each field."""
    for key, ann, info in _fields():
        integer = _is_int(ann)
        for c in info.metadata:
            if isinstance(c, at.Ge):
                a = c.ge
                yield key, a, (a - 1 if integer else math.nextafter(a, -math.inf)), f">= {a}"
            elif isinstance(c, at.Gt):
                a = c.gt
                yield key, (a + 1 if integer else math.nextafter(a, math.inf)), a, f"> {a}"
            elif isinstance(c, at.Le):
                b = c.le
                yield key, b, (b + 1 if integer else math.nextafter(b, math.inf)), f"<= {b}"
            elif isinstance(c, at.Lt):
                b = c.lt
                yield key, (b - 1 if integer else math.nextafter(b, -math.inf)), b, f"< {b}"


def _choices():
    for key, ann, _ in _fields():
        if typing.get_origin(ann) is typing.Literal:
            yield key, typing.get_args(ann)


BOUNDS = list(_bounds())
CHOICES = list(_choices())


def _raw(assign: dict[str, typing.Any]) -> dict:
    raw: dict = {}
    for key, value in assign.items():
        *sections, name = key.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return raw


def _flat(p: Params, key: str):
    node: typing.Any = p
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_the_schema_is_read():
    # every section holds bounded fields, and the walk found them (a walk that finds nothing would pass below)
    sections = {k.split(".")[0] for k, *_ in BOUNDS}
    assert sections >= {"data", "model", "pretrain", "loss", "memory", "train", "eval", "tune", "serve"}
    assert len(BOUNDS) >= 60 and len(CHOICES) >= 15
    assert ("train.lr", math.nextafter(0.0, 1.0), 0.0, "> 0.0") in BOUNDS
    assert ("data.synthetic.num_classes", 20000, 20001, "<= 20000") in BOUNDS


@pytest.mark.parametrize("key,inside,outside,what", BOUNDS, ids=[f"{b[0]} {b[3]}" for b in BOUNDS])
def test_each_bound_refuses_just_outside_and_accepts_just_inside(key, inside, outside, what):
    companions = COMPANIONS.get(key, {})
    if key in BENEATH_A_RULE:
        with pytest.raises(ParamsError) as exc:
            validate_params(_raw({key: inside}))
        assert [e.path for e in exc.value.errors] == [key.rsplit(".", 1)[0]] and key in exc.value.errors[0].keys()
    else:
        p = validate_params(_raw({key: inside, **companions}))
        assert _flat(p, key) == inside
    with pytest.raises(ParamsError) as exc:
        validate_params(_raw({key: outside, **companions}), "params.yaml")
    err = exc.value
    assert [e.path for e in err.errors] == [key]
    assert err.errors[0].value == outside
    assert f"  {key}: " in str(err) and str(err).startswith("params.yaml: invalid parameters")


@pytest.mark.parametrize("key,choices", CHOICES, ids=[c[0] for c in CHOICES])
def test_each_choice_accepted_and_others_refused(key, choices):
    for c in choices:
        companions = {"train.drift_probe": 8} if (key, c) == ("train.warmup_steps", "auto") else {}
        assert _flat(validate_params(_raw({key: c, **companions})), key) == c
    with pytest.raises(ParamsError) as exc:
        validate_params(_raw({key: "no-such-choice"}))
    assert {e.path for e in exc.value.errors} >= {key}


SECTIONS = [k for k, i in Params.model_fields.items()] + ["data.synthetic", "tune.space"]


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_keys_refused_with_their_path(section):
    with pytest.raises(ParamsError) as exc:
        validate_params(_raw({f"{section}.no_such_key": 1}), "params.yaml")
    (e,) = exc.value.errors
    assert e == ParamError(f"{section}.no_such_key", "unknown key (check its spelling and section)", 1)
    assert f"  {section}.no_such_key: unknown key" in str(exc.value)


def test_an_unknown_section_is_refused():
    with pytest.raises(ParamsError) as exc:
        validate_params({"trian": {"lr": 0.1}})
    assert [e.path for e in exc.value.errors] == ["trian"]


def test_a_rule_across_fields_names_its_fields_and_their_values():
    with pytest.raises(ParamsError) as exc:
        validate_params({"train": {"batch_size": 30, "images_per_class": 4}}, "form")
    (e,) = exc.value.errors
    assert e.path == "train" and e.fields == ("train.batch_size", "train.images_per_class")
    assert e.keys() == e.fields and e.value == {"batch_size": 30, "images_per_class": 4}
    assert e.message == "batch_size (30) must be a multiple of images_per_class (4)"
    assert str(exc.value) == ("form: invalid parameters\n  train: batch_size (30) must be a multiple of "
                              "images_per_class (4) (got {'batch_size': 30, 'images_per_class': 4})")
    # a nested section's rule carries its full path
    with pytest.raises(ParamsError) as exc:
        validate_params({"data": {"synthetic": {"images_per_class_min": 6, "images_per_class_max": 5}}})
    (e,) = exc.value.errors
    assert e.path == "data.synthetic"
    assert e.fields == ("data.synthetic.images_per_class_max", "data.synthetic.images_per_class_min")


def test_several_errors_are_all_reported_in_order():
    with pytest.raises(ParamsError) as exc:
        validate_params({"memory": {"ratio": 2.0}, "train": {"lr": "fast", "seed": 1.5}})
    assert [e.path for e in exc.value.errors] == ["memory.ratio", "train.seed", "train.lr"]  # schema order
    assert [e.value for e in exc.value.errors] == [2.0, 1.5, "fast"]
    assert isinstance(exc.value, ValueError)  # callers that only print it keep working
    assert len(str(exc.value).splitlines()) == 4


def _cli(tmp_path, *argv):
    path = tmp_path / "params.yaml"
    if not path.exists():
        path.write_text("train:\n  batch_size: 16\n  images_per_class: 4\n")
    ap = argparse.ArgumentParser()
    add_params_arguments(ap)
    return load_cli_params(ap.parse_args(["--params", str(path), *argv]))


def test_overrides_are_applied_and_typed(tmp_path):
    params, root = _cli(tmp_path, "-S", "memory.ratio=0.2", "-S", "memory.enabled=false", "-S",
                        "train.drift_dts=[5, 50]", "-S", "train.batch_size=32", "-S", "eval.recall_at=[1, 2]",
                        "-S", "model.pretrained=none", "-S", "train.num_threads=null")
    assert root == tmp_path
    assert params.memory.ratio == 0.2 and type(params.memory.ratio) is float
    assert params.memory.enabled is False
    assert params.train.drift_dts == [5, 50] and params.train.batch_size == 32
    assert params.train.images_per_class == 4  # from the file: an override changes only its key
    assert params.eval.recall_at == [1, 2] and params.model.pretrained == "none"
    assert params.train.num_threads is None
    # the last of two overrides of one key wins, as with dvc exp run -S
    params, _ = _cli(tmp_path, "-S", "train.lr=0.1", "-S", "train.lr=1e-4")
    assert params.train.lr == 1e-4
    # a nested key creates its section
    params, _ = _cli(tmp_path, "-S", "data.synthetic.num_classes=64")
    assert params.data.synthetic.num_classes == 64


def test_a_bad_override_is_refused_naming_the_key(tmp_path, capsys):
    assert _cli(tmp_path, "-S", "memory.ratoi=0.2") is None
    assert "memory.ratoi: unknown key" in capsys.readouterr().err
    assert _cli(tmp_path, "-S", "train.batch_size=30") is None
    assert "train: batch_size (30) must be a multiple of images_per_class (4)" in capsys.readouterr().err
    with pytest.raises(ParamsError, match=r"override 'memory.ratio': expected KEY=VALUE") as exc:
        load_params(tmp_path / "params.yaml", ["memory.ratio"])
    assert exc.value.errors == [ParamError("memory.ratio", "expected KEY=VALUE", "memory.ratio")]
    with pytest.raises(ParamsError, match=r"train.lr is not a section|lr is not a section") as exc:
        set_dotted({"train": {"lr": 0.1}}, "train.lr.x=1")
    assert exc.value.errors[0].path == "train.lr"


def test_file_problems_are_said(tmp_path):
    with pytest.raises(ValueError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of sections at the top level, got list"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_params(empty) == Params()  # an empty file: the schema's defaults


def test_mean_per_kind_reduction_is_for_the_contrastive_loss_only():
    assert validate_params({"loss": {"reduction": "mean_per_kind"}}).loss.reduction == "mean_per_kind"
    with pytest.raises(ParamsError) as exc:
        validate_params({"loss": {"name": "multi_similarity", "reduction": "mean_per_kind"}})
    (e,) = exc.value.errors
    assert e.fields == ("loss.name", "loss.reduction") and "only the contrastive" in e.message
