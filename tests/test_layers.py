"""The language half imports no torch, and the support table has one home that every
executor reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from surgery.passes import PASSES
from surgery.support import PASS_VERBS, RUN_VERBS, SUPPORT
from surgery.targets import BACKENDS, TARGET_SUPPORT

ROOT = Path(__file__).resolve().parents[1]


def test_checking_a_recipe_imports_no_torch() -> None:
    code = (
        "import sys, glob\n"
        "import surgery, surgery.check, surgery.parse, surgery.fmt, surgery.cli\n"
        "from surgery.cli import main\n"
        "rc = main(['check', *sorted(glob.glob('recipes/*.surg'))])\n"
        "fmt = main(['fmt', '--check', *sorted(glob.glob('recipes/*.surg'))])\n"
        "surgery.parse('decompose Linear rank = 0.5')\n"
        "assert rc == 0 and fmt == 0, (rc, fmt)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def test_every_pass_reads_its_entry_of_the_one_support_table() -> None:
    assert set(PASSES) == set(PASS_VERBS)
    assert not set(PASS_VERBS) & set(RUN_VERBS)
    for verb, cls in PASSES.items():
        assert cls.implemented_options is SUPPORT[verb].options
        assert cls.supported_types is SUPPORT[verb].types


def test_implemented_targets_are_in_the_language() -> None:
    pairs = {f"{b} {d}" for b, ds in BACKENDS.items() for d in ds}
    assert (TARGET_SUPPORT["device"] or set()) < pairs
    assert TARGET_SUPPORT["backend"] == set(BACKENDS)


# --- layers call downward only ---------------------------------------------------------------

# Each layer and the modules it must never import, directly or inside a function or an
# `if TYPE_CHECKING:` block (a type-only import is still a dependency a reader follows).
_LANGUAGE = (
    "surgery.ast",
    "surgery.parse",
    "surgery.parse_lark",
    "surgery.parse_build",
    "surgery.parse_errors",
    "surgery.parse_fast",
    "surgery.check",
    "surgery.fmt",
    "surgery.diagnostics",
)
_LEAVES = (
    "surgery.support",
    "surgery.targets",
    "surgery.codes",
    "surgery.timing",
    "surgery.program",
)
_ABOVE_PASSES = ("surgery.manager", "surgery.heal", "surgery.save", "surgery.report", "surgery.cli")
FORBIDDEN: dict[tuple[str, ...], tuple[str, ...]] = {
    # The language needs no model: nothing that holds or changes one.
    _LANGUAGE + _LEAVES: (
        "surgery.passes",
        "surgery.backends",
        "surgery.graph",
        "surgery.load",
        "surgery.modules",
        *_ABOVE_PASSES,
    ),
    # Passes get what they need (analysis, layer timer) from their context.
    ("surgery.passes",): ("surgery.backends", *_ABOVE_PASSES),
    # Replacement modules are leaves every layer may build.
    ("surgery.modules",): ("surgery.passes", "surgery.backends", *_ABOVE_PASSES),
    # Backends lower and time models they are handed; they know nothing of a recipe.
    ("surgery.backends",): (
        "surgery.passes",
        *(m for m in _LANGUAGE if m not in ("surgery.ast", "surgery.diagnostics")),
        "surgery.graph",
        *_ABOVE_PASSES,
    ),
    ("surgery.manager",): ("surgery.cli", "surgery.report", "surgery.save"),
    # Contracts read what a run measured; the manager hands it to them.
    ("surgery.contracts",): ("surgery.passes", "surgery.backends", *_ABOVE_PASSES),
    # Quality metrics, media readers, graph patterns and the torchrun engine are leaves the
    # layers above call; they never reach up.
    (
        "surgery.quality",
        "surgery.media",
        "surgery.patterns",
        "surgery.distributed",
    ): ("surgery.passes", "surgery.backends", *_ABOVE_PASSES),
    # The trainer's parts (data, losses, checkpoints, configuration) serve `surgery.heal`.
    (
        "surgery.heal_config",
        "surgery.heal_data",
        "surgery.heal_losses",
        "surgery.heal_checkpoint",
    ): ("surgery.passes", "surgery.backends", *_ABOVE_PASSES),
    # Graph surgery for compilers embeds the passes; it is a library, not a run.
    ("surgery.fx_surgery",): ("surgery.backends", *_ABOVE_PASSES),
    # The report pages and the streamed run sit beside the CLI, never under it.
    ("surgery.report_html", "surgery.stream"): ("surgery.cli", "surgery.backends"),
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (``backends/`` is
    ``surgery.backends``)."""
    out: dict[str, Path] = {}
    for root, package in ((ROOT / "surgery", "surgery"), (ROOT / "backends", "surgery.backends")):
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dotted modules ``name`` imports anywhere in its source (relative ones resolved,
    ``from surgery import ast`` as ``surgery.ast``, the top-level ``backends`` as
    ``surgery.backends``)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return {"surgery.backends" + m[8:] if m.split(".")[0] == "backends" else m for m in found}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_layers_call_downward_only() -> None:
    modules = _modules()
    known = set(modules)
    violations = []
    for name, path in modules.items():
        imported = _imports(name, path, known)
        for layer, forbidden in FORBIDDEN.items():
            if not _within(name, layer):
                continue
            for module in sorted(imported):
                if _within(module, forbidden) and not _within(module, layer):
                    violations.append(f"{name} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_layer_check_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from surgery import ast\n"
        "if TYPE_CHECKING:\n"
        "    from surgery.manager import Run\n"
        "def f():\n"
        "    from .. import heal\n"
        "    import backends.latency\n"
    )
    path = tmp_path / "x.py"
    path.write_text(source)
    found = _imports("surgery.passes.x", path, {"surgery.ast", "surgery.heal"})
    assert {"surgery.ast", "surgery.manager", "surgery.heal", "surgery.backends.latency"} <= found


# --- one tuple of verbs ---------------------------------------------------------------------


def test_every_verb_has_its_grammar_rule_and_every_rule_its_verb() -> None:
    import re

    from surgery.parse import grammar_text
    from surgery.verbs import VERBS

    grammar = grammar_text()
    statement = re.search(r"\?statement:(.*?)\n\n", grammar, re.S)
    assert statement is not None
    alternatives = [a.strip() for a in statement.group(1).split("|")]
    assert alternatives == [v.keyword for v in VERBS]
    labels = set(re.findall(r"^(\w+):", grammar, re.M)) | set(re.findall(r"-> (\w+)", grammar))
    for verb in VERBS:
        assert re.search(rf'^{verb.keyword}: "{verb.keyword}"', grammar, re.M), verb.keyword
        # Every field of the node is filled by a positional child or an `opt_<field>` rule.
        fields = set(verb.node.model_fields) - {"span", "verb"}
        options = fields - set(verb.positional)
        missing = {f for f in options if f"opt_{f}" not in labels}
        assert not missing, (verb.keyword, missing)
        assert set(verb.positional) <= fields, verb.keyword


def test_the_ast_statement_union_is_the_verbs_nodes() -> None:
    from surgery import ast
    from surgery.verbs import VERBS

    schema = ast.recipe_json_schema()
    listed = {
        d["$ref"].rsplit("/", 1)[1] for d in schema["properties"]["statements"]["items"]["oneOf"]
    }
    assert listed == {v.node.__name__ for v in VERBS}
    for verb in VERBS:
        assert getattr(ast, verb.node.__name__) is verb.node
        assert verb.node.model_fields["verb"].default == verb.keyword
