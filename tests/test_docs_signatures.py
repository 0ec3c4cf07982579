"""The call signatures the docs print are the code's.

Two kinds of code span are checked against ``inspect.signature`` of the object they name:

- *Signatures*: in docs/api.md, a span in a heading, a span that leads a list item
  (``- `name(...)`: ...``), a span with a return annotation (``-> ...``) and a span that only
  parses as a parameter list (a bare ``*``); in the README, the first column of "API at a
  glance". Their parameters must be the real ones in the real order, keyword-only after ``*``,
  with the real defaults where a default is written; a signature that leaves parameters out ends
  in ``...``. A default written as ``...`` is not checked.
- *Calls*: every other span in either file that parses as a call of a public name, and every such
  call in their ``python`` blocks, must bind (no unknown keyword, not too many positionals).

A bare name in docs/api.md (``calibrate(...)``) is looked up on the object of the heading above
it; a name outside ``gradual_sd`` (``torch.compile``, ``model.to``) is not checked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradual_sd

ROOT = Path(__file__).resolve().parents[1]
API_GUIDE = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
PUBLIC = {name: getattr(gradual_sd, name) for name in gradual_sd.__all__}
SUBPACKAGE_NAMES = {
    name: getattr(package, name)
    for package in (
        importlib.import_module("gradual_sd.early_exit"),
        importlib.import_module("gradual_sd.runtime"),
    )
    for name in package.__all__
}
DEFAULTS_NAMESPACE = {**PUBLIC, "nn": nn, "torch": torch, "math": math}
SUBMODULES = [
    importlib.import_module(info.name)
    for info in pkgutil.walk_packages(gradual_sd.__path__, prefix="gradual_sd.")
]


@dataclass(frozen=True)
class Span:
    text: str  # the code span, whitespace collapsed
    where: str  # file and line, for the failure message
    context: Any  # the object named by the heading above it, or None
    declared: bool  # a signature (checked strictly) rather than a call


# ---------------------------------------------------------------------------------------------
# Reading the markdown


def spans_of(path: Path, *, table_section: str | None = None) -> list[Span]:
    """Every inline code span of ``path`` outside fenced blocks, with its context. With
    ``table_section``, the spans in that section's table's first column are the declared ones;
    otherwise docs/api.md's rules apply (headings, list-item leads, ``->``)."""
    text = path.read_text()
    spans: list[Span] = []
    context: Any = None
    section = ""
    in_fence = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        if in_fence:
            i += 1
            continue
        # A paragraph's spans may wrap lines: join the line with the next while a backtick is open.
        joined, start = line, i
        while joined.count("`") % 2 and i + 1 < len(lines):
            i += 1
            joined += " " + lines[i].strip()
        heading = re.match(r"^(#+)\s+(.*)$", joined)
        if heading:
            section = heading.group(2).strip()
            if len(heading.group(1)) <= 2:
                context = None
            else:
                first = re.match(r"`([^`]+)`", heading.group(2))
                name = call_name(first.group(1)) or first.group(1) if first else None
                context = resolve(name, None, search_submodules=True) if name else None
        for number, match in enumerate(re.finditer(r"`([^`]+)`", joined)):
            span = " ".join(match.group(1).split())
            if table_section is not None:
                cells = joined.split("|")
                declared = (
                    section == table_section
                    and joined.startswith("|")
                    and len(cells) > 2
                    and match.group(0) in cells[1]
                )
            else:
                lead = re.match(r"^\s*[-*]\s+`[^`]+`\s*:", joined) is not None and number == 0
                declared = bool(heading) or lead or "->" in span or only_parameters(span)
            spans.append(Span(span, f"{path.name}:{start + 1}", context, declared))
        i += 1
    return spans


def python_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    return [
        (m.group(1), f"{path.name}:{text[: m.start()].count(chr(10)) + 2}")
        for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


def split_signature(span: str) -> tuple[str, str] | None:
    """``(name, parameters)`` for ``name(parameters)`` with an optional ``-> annotation``."""
    match = re.match(r"^([A-Za-z_][\w.]*)\(", span)
    if not match:
        return None
    depth, quote = 0, None
    for pos in range(match.end() - 1, len(span)):
        char = span[pos]
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                rest = span[pos + 1 :].strip()
                if rest and not rest.startswith("->"):
                    return None
                return match.group(1), span[match.end() : pos]
    return None


def call_name(span: str) -> str | None:
    parts = split_signature(span)
    return parts[0] if parts else None


def top_level_items(parameters: str) -> list[str]:
    items, depth, current, quote = [], 0, "", None
    for char in parameters:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0 and not quote:
            items.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current.strip())
    return items


def parse_parameters(parameters: str) -> tuple[ast.arguments, bool] | None:
    """The documented parameters as ``ast.arguments``, and whether the list ends in ``...``
    (parameters left out); ``None`` when it is no parameter list (a call with literals)."""
    items = top_level_items(parameters)
    partial = bool(items) and items[-1] == "..."
    items = [item for item in items if item != "..."]
    try:
        tree = ast.parse(f"def _({', '.join(items)}): pass")
    except SyntaxError:
        return None
    return tree.body[0].args, partial


def only_parameters(span: str) -> bool:
    """A span that is a parameter list and no call expression (``f(a, *, b=1)``)."""
    parts = split_signature(span)
    if not parts or parse_parameters(parts[1]) is None:
        return False
    try:
        ast.parse(span.split("->")[0], mode="eval")
    except SyntaxError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Resolving names


def resolve(name: str, context: Any, *, search_submodules: bool = False) -> Any:
    """The object ``name`` documents: a public name of ``gradual_sd`` (or an attribute of one), a
    dotted path from ``gradual_sd``, an attribute of the heading's object, or, for headings and
    signatures, a name defined in one of ``gradual_sd``'s modules; ``None`` if none."""
    parts = name.split(".")
    if parts[0] == "gradual_sd":
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            return attribute_chain(obj, parts[cut:])
        return None
    if parts[0] in PUBLIC:
        return attribute_chain(PUBLIC[parts[0]], parts[1:])
    if context is not None and hasattr(context, parts[0]):
        return attribute_chain(context, parts)
    if search_submodules:
        found = {id(getattr(m, parts[0])): getattr(m, parts[0]) for m in SUBMODULES if hasattr(m, parts[0])}
        if len(found) == 1:
            return attribute_chain(next(iter(found.values())), parts[1:])
    return None


def attribute_chain(obj: Any, names: list[str]) -> Any:
    for attr in names:
        obj = getattr(obj, attr, None)
    return obj


def real_parameters(obj: Any) -> list[inspect.Parameter]:
    if getattr(obj, "_is_protocol", False):  # a protocol of callables: its call's signature
        obj = obj.__call__
    parameters = list(inspect.signature(obj).parameters.values())
    if parameters and parameters[0].name == "self":  # a method looked up on its class
        parameters = parameters[1:]
    return parameters


# ---------------------------------------------------------------------------------------------
# Checking


def signature_problems(span: str, obj: Any) -> list[str]:
    """What differs between a documented signature and ``obj``'s; empty when they agree."""
    name, text = split_signature(span)
    parsed = parse_parameters(text)
    if parsed is None:
        return [f"{span!r} is not a parameter list"]
    args, partial = parsed
    positional = args.posonlyargs + args.args
    pos_defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    documented = [(a.arg, "positional", d) for a, d in zip(positional, pos_defaults)]
    if args.vararg:
        documented.append((args.vararg.arg, "*args", None))
    documented += [(a.arg, "keyword-only", d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        documented.append((args.kwarg.arg, "**kwargs", None))

    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.VAR_POSITIONAL: "*args",
        inspect.Parameter.KEYWORD_ONLY: "keyword-only",
        inspect.Parameter.VAR_KEYWORD: "**kwargs",
    }
    real = [(p.name, kinds[p.kind], p.default) for p in real_parameters(obj)]
    problems = []
    real_names = [r[0] for r in real]
    doc_names = [d[0] for d in documented]
    if partial:
        unknown = [n for n in doc_names if n not in real_names]
        order = [n for n in real_names if n in doc_names]
        if unknown:
            problems.append(f"documents parameters the code does not have: {unknown}")
        elif order != doc_names:
            problems.append(f"parameter order {doc_names}, the code's {order}")
    elif doc_names != real_names:
        problems.append(f"parameters {doc_names}, the code's {real_names} (end with '...' to leave some out)")
    real_by_name = {r[0]: r for r in real}
    for doc_name, doc_kind, doc_default in documented:
        if doc_name not in real_by_name:
            continue
        _, real_kind, real_default = real_by_name[doc_name]
        if doc_kind != real_kind:
            problems.append(f"{doc_name} documented {doc_kind}, the code's is {real_kind}")
        if doc_default is None or any(
            isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(doc_default)
        ):
            continue
        written = ast.unparse(doc_default)
        if real_default is inspect.Parameter.empty:
            problems.append(f"{doc_name}={written} documented, the code has no default")
            continue
        try:
            value = eval(compile(ast.Expression(doc_default), "<docs>", "eval"), dict(DEFAULTS_NAMESPACE))
        except Exception as error:  # noqa: BLE001 - any failure is a doc that does not evaluate
            problems.append(f"{doc_name}={written} does not evaluate ({error})")
            continue
        if not defaults_equal(value, real_default):
            problems.append(f"{doc_name}={written} documented, the code's default is {real_default!r}")
    return problems


def defaults_equal(documented: Any, real: Any) -> bool:
    if isinstance(documented, float) or isinstance(real, float):
        return (
            isinstance(documented, (int, float))
            and isinstance(real, (int, float))
            and math.isclose(documented, real, rel_tol=1e-12)
        )
    return documented is real or (type(documented) is type(real) and documented == real)


def calls_in(source: str) -> list[ast.Call]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def call_problems(call: ast.Call) -> tuple[str, Any, list[str]] | None:
    """``(name, object, problems)`` for a call of a public name, else ``None``."""
    name = dotted(call.func)
    obj = resolve(name, None) if name else None
    if obj is None or not callable(obj):
        return None
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    signature = inspect.signature(obj)
    signature = signature.replace(parameters=real_parameters(obj))
    try:
        signature.bind_partial(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError as error:
        return name, obj, [str(error)]
    return name, obj, []


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# ---------------------------------------------------------------------------------------------
# The docs' spans, collected once

API_SPANS = spans_of(API_GUIDE)
README_SPANS = spans_of(README, table_section="API at a glance")
DECLARED = [s for s in API_SPANS + README_SPANS if s.declared and split_signature(s.text)]
CALLS = [s for s in API_SPANS + README_SPANS if not s.declared and split_signature(s.text)]
BLOCKS = python_blocks(API_GUIDE) + python_blocks(README)


def declared_object(span: Span) -> Any:
    return resolve(split_signature(span.text)[0], span.context, search_submodules=True)


@pytest.mark.parametrize("span", DECLARED, ids=[f"{s.where} {s.text[:60]}" for s in DECLARED])
def test_documented_signature_is_the_codes(span):
    obj = declared_object(span)
    assert obj is not None, f"{span.where}: {span.text!r} names nothing in gradual_sd"
    problems = signature_problems(span.text, obj)
    assert not problems, f"{span.where}: `{span.text}`:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("span", CALLS, ids=[f"{s.where} {s.text[:60]}" for s in CALLS])
def test_documented_call_binds(span):
    for call in calls_in(span.text):
        checked = call_problems(call)
        if checked:
            name, _, problems = checked
            assert not problems, f"{span.where}: `{span.text}` does not bind to {name}: {problems}"


@pytest.mark.parametrize("block", BLOCKS, ids=[where for _, where in BLOCKS])
def test_calls_in_python_blocks_bind(block):
    source, where = block
    ast.parse(source)  # a python block that does not parse is a broken example
    for call in calls_in(source):
        checked = call_problems(call)
        if checked:
            name, _, problems = checked
            assert not problems, f"{where}: a call of {name} does not bind: {problems}"


def test_every_public_function_and_class_has_a_documented_signature():
    """Modules, named tuples, protocols and plain classes alike (errors are raised, not built), of
    ``gradual_sd`` and its public subpackages."""
    documented = {id(declared_object(s)) for s in DECLARED if s.where.startswith("api.md")}
    missing = [
        name
        for name, obj in {**PUBLIC, **SUBPACKAGE_NAMES}.items()
        if (inspect.isfunction(obj) or inspect.isclass(obj) and not issubclass(obj, Exception))
        and id(obj) not in documented
    ]
    assert not missing, f"docs/api.md gives no signature for {missing}"


def test_the_api_guide_names_every_public_name():
    text = API_GUIDE.read_text()
    unnamed = [name for name in [*PUBLIC, *SUBPACKAGE_NAMES] if not re.search(rf"\b{name}\b", text)]
    assert not unnamed, f"docs/api.md does not name {unnamed}"


def test_the_readme_table_gives_signatures():
    readme = [s for s in DECLARED if s.where.startswith("README")]
    assert len(readme) >= 8, [s.text for s in readme]


# ---------------------------------------------------------------------------------------------
# The checker itself: it must reject what the docs once got wrong, and accept what is right.


@pytest.mark.parametrize(
    "span, complaint",
    [
        # The BottleneckHead heading before pool_size was documented (issue 25).
        (
            "BottleneckHead(in_channels, hidden_size, num_classes, feature_dim=128, attn_layer=ACAM, "
            "norm_layer=nn.BatchNorm2d)",
            "pool_size",
        ),
        ("BottleneckHead(in_channels, hidden_size, num_classes, feature_dim=64, ...)", "feature_dim=64"),
        ("BottleneckHead(hidden_size, in_channels, ...)", "order"),
        ("BottleneckHead(in_channels, hidden_size, *, num_classes, ...)", "keyword-only"),
        ("BottleneckHead(in_channels, pool=2, ...)", "does not have"),
        ("soft_cross_entropy(student, teacher, T)", "student_logits"),
        ("GradualDistillationLoss(temperature=3.0, kl_weight=0.3)", "'...'"),
        ("insert_after(model, names, attn_layer=PooledHead, ...)", "attn_layer=PooledHead"),
    ],
)
def test_the_checker_finds_a_wrong_signature(span, complaint):
    obj = resolve(split_signature(span)[0], None)
    problems = signature_problems(span, obj)
    assert any(complaint in p for p in problems), problems


def test_the_checker_accepts_right_and_elided_signatures():
    for span in (
        "BottleneckHead(in_channels, hidden_size, num_classes, feature_dim=128, attn_layer=ACAM, "
        "norm_layer=nn.BatchNorm2d, pool_size=None)",
        "ACAM(channels, rd_ratio=1/16, ...)",
        "GradualSelfDistiller(model, stage_names=None, *, loss, head_factory, ...)",
        "EarlyExitModel.profile(data, *, batch_sizes=(1, 64), repeats=5, latency_images=64, levels=..., "
        "progress=None) -> dict",
    ):
        assert signature_problems(span, resolve(split_signature(span)[0], None)) == [], span


def test_the_checker_finds_a_call_that_does_not_bind():
    (call,) = calls_in("BottleneckHead(pool=2)")
    assert call_problems(call)[2], "an unknown keyword must not bind"
    (call,) = calls_in("BottleneckHead(pool_size=2)")
    assert call_problems(call)[2] == []
