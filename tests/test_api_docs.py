"""The API reference is enough to call the library: every public class, function and method of xbmcore has a
docstring (mkdocstrings hides what has none), every parameter of each is described in its Google-style `Args:`
section (a class documents its constructor's, a dataclass may use `Attributes:`), no section names a parameter the
signature lacks, and `XBMObjective.forward` documents every key of the dict it returns.

The docstrings are read as the API pages read them: by griffe (mkdocstrings' loader), statically, with the Google
parser mkdocs.yml configures. Nothing is built here; tests/test_docs.py builds the site with --strict.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[1]
# Parameters no caller passes: the bound instance or class.
BOUND = {"self", "cls"}


@pytest.fixture(scope="module")
def package():
    # griffe logs each docstring it cannot parse cleanly; the assertions below say what matters here.
    logging.getLogger("griffe").setLevel(logging.ERROR)
    return griffe.load("xbmcore", search_paths=[str(ROOT)], docstring_parser="google",
                       resolve_aliases=False)


def _modules(module):
    yield module
    for sub in module.modules.values():
        if not sub.name.startswith("_"):
            yield from _modules(sub)


def _public(container):
    """Members defined in `container` itself (not imported) whose names do not start with an underscore."""
    for name, member in container.members.items():
        if not name.startswith("_") and not member.is_alias:
            yield member


def _documented(obj, *kinds) -> list[str]:
    """Names in the `kinds` sections (e.g. parameters, attributes) of obj's parsed Google docstring."""
    if obj.docstring is None:
        return []
    names = []
    for section in obj.docstring.parse("google"):
        if section.kind.value in kinds:
            names += [item.name.lstrip("*") for item in section.value]
    return names


def _api(package):
    """(dotted path, object) of every public class, function and method, properties included."""
    for module in _modules(package):
        for obj in _public(module):
            if obj.is_class or obj.is_function:
                yield obj.path, obj
            if obj.is_class:
                for member in _public(obj):
                    if member.is_function or "property" in member.labels:
                        yield member.path, member


def _signature(obj) -> list[str]:
    """The parameters a caller passes: a function's, or a class's constructor's (griffe reads __init__, and
    synthesises a dataclass's from its fields)."""
    try:
        params = obj.parameters
    except Exception:  # a class whose constructor lives outside the package (a pydantic model)
        return []
    return [p.name for p in params if p.name not in BOUND and not p.name.startswith("_")]


def test_every_public_object_has_a_docstring(package):
    missing = [path for path, obj in _api(package) if obj.docstring is None or not obj.docstring.value.strip()]
    assert not missing, "public API without a docstring (hidden from the API pages):\n  " + "\n  ".join(missing)


def test_every_parameter_is_documented(package):
    problems = []
    for path, obj in _api(package):
        if "property" in obj.labels:
            continue
        wanted = _signature(obj)
        if not wanted:
            continue
        given = _documented(obj, "parameters", "other parameters")
        if obj.is_class:
            init = obj.members.get("__init__")
            if init is not None and not init.is_alias:
                given += _documented(init, "parameters", "other parameters")
            if "dataclass" in obj.labels:  # fields may be described as attributes
                given += _documented(obj, "attributes")
        for name in wanted:
            if name not in given:
                problems.append(f"{path}: parameter {name!r} is not described in its Args section")
        for name in _documented(obj, "parameters", "other parameters"):
            if name not in wanted:
                problems.append(f"{path}: Args names {name!r}, which is not a parameter")
    assert not problems, "\n".join(problems)


def test_objective_documents_every_key_it_returns(package):
    import torch

    from xbmcore.losses import ContrastiveLoss, MultiSimilarityLoss, XBMObjective
    from xbmcore.memory import CrossBatchMemory

    documented = set(_documented(package["losses.XBMObjective.forward"], "returns"))
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    labels, indices = torch.arange(8) // 2, torch.arange(8)
    memory = CrossBatchMemory(6, 4, num_items=20)
    memory.enqueue(torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1), torch.arange(6) % 3,
                   torch.arange(10, 16), step=0)
    for loss in (ContrastiveLoss(), MultiSimilarityLoss()):
        objective = XBMObjective(loss, weight=1.0)
        for out in (objective(emb, labels, indices, memory), objective(emb, labels, indices),
                    objective(emb, labels, indices, memory, entries=memory.get()[0].clone())):
            assert set(out) == documented, (f"XBMObjective.forward returns {sorted(out)}, its docstring's Returns "
                                            f"section names {sorted(documented)}")
