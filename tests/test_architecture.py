"""Structure rules checked on the source: no import cycle among the package's modules; the pipeline
package's layout and that only its layout module spells run-directory paths.

Every import counts, at module level or inside a function (an import deferred into a function
still ties the two modules together); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "osrm_lora"


def module_files() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "osrm_lora.merge.types" in graph["osrm_lora.merge.methods.linear"]
    assert "osrm_lora.merge" in graph["osrm_lora.pipeline.merging"]  # imported inside merge_and_sweep only


def test_no_import_cycle_among_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


KEY_RULES = "osrm_lora.model.keys"
KEY_USERS = ("osrm_lora.adapters", "osrm_lora.backbone", "osrm_lora.merge.io", "osrm_lora.merge.stream",
             "osrm_lora.merge_inputs", "osrm_lora.osrm", "osrm_lora.stats", "osrm_lora.train", "osrm_lora.train_batched")


def test_the_key_rules_are_a_leaf_that_every_key_user_imports() -> None:
    """One module owns module-key rules (osrm_lora.model.keys): it depends on nothing of the package
    but its errors, and the modules that resolve, match or parse module keys import it."""
    graph = import_graph()
    assert "osrm_lora.model" in graph and KEY_RULES in graph
    assert graph[KEY_RULES] <= {"osrm_lora.errors"}
    for user in KEY_USERS:
        assert KEY_RULES in graph[user], user
    assert "osrm_lora.train" not in graph["osrm_lora.merge_inputs"]  # no borrowed key parser


def test_key_users_spell_no_key_rule_of_their_own() -> None:
    """The PEFT prefix and the dotted-suffix match are written only in osrm_lora.model.keys."""
    files = module_files()
    for user in KEY_USERS:
        text = files[user].read_text()
        for spelling in ('"base_model.model."', 'endswith("." +', "endswith(f\".{"):
            assert spelling not in text, f"{user} spells {spelling}"


PIPELINE = "osrm_lora.pipeline"
LAYOUT = "osrm_lora.pipeline.layout"
PIPELINE_MODULES = ("checks", "context", "jobs", "layout", "ledger", "manifest", "merging", "run", "stages")
RUN_DIR_NAMES = ("config.yaml", "manifest.json", "results.json", "report.md", "report.html", ".stages",
                 "stats", "adapters", "diagnostics", "merges")


def test_the_pipeline_is_a_package_of_one_module_per_concern() -> None:
    """layout (a leaf) <- ledger <- the stages <- run; no module of the pipeline imports its package."""
    graph = import_graph()
    for sub in PIPELINE_MODULES:
        assert f"{PIPELINE}.{sub}" in graph, sub
    assert graph[LAYOUT] == set()
    assert graph[f"{PIPELINE}.ledger"] & {f"{PIPELINE}.{m}" for m in PIPELINE_MODULES} == {LAYOUT}
    for sub in PIPELINE_MODULES:
        assert PIPELINE not in graph[f"{PIPELINE}.{sub}"], f"{sub} imports the package (a circle through __init__)"
    assert {f"{PIPELINE}.{m}" for m in PIPELINE_MODULES if m != "run"} >= {
        d for d in graph[f"{PIPELINE}.run"] if d.startswith(PIPELINE)}


def test_only_the_layout_spells_run_directory_paths() -> None:
    """Every path under a run directory is built by osrm_lora.pipeline.layout.RunLayout: no other
    module joins a run-directory name onto a path (``/ "results.json"``, ``/ "adapters"``) or spells
    the stage markers' folder."""
    files = module_files()
    for name, path in files.items():
        if name == LAYOUT:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                assert node.right.value not in RUN_DIR_NAMES, (
                    f"{name}:{node.lineno} joins {node.right.value!r}: use osrm_lora.pipeline.layout.RunLayout")
            if isinstance(node, ast.Constant) and node.value == ".stages":
                raise AssertionError(f"{name}:{node.lineno} spells '.stages': use osrm_lora.pipeline.layout")


def test_the_layout_rule_finds_a_planted_spelling() -> None:
    tree = ast.parse('p = run_dir / "results.json"\nq = out / "adapter_config.json"\n')
    joined = [n.right.value for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
              and isinstance(n.right, ast.Constant) and n.right.value in RUN_DIR_NAMES]
    assert joined == ["results.json"]


def test_stages_are_the_ledgers_stage_definitions() -> None:
    from osrm_lora.pipeline import LEDGER_STAGES, STAGE_DEFS, STAGES

    assert STAGES == LEDGER_STAGES == tuple(s.name for s in STAGE_DEFS)
    assert [s.id("a", "b") for s in STAGE_DEFS][1] == "train/a/b"
