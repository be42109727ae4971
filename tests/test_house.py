"""The package's shape: every import of the project's own modules (function-level ones included) runs downward
through the layers below, and no modules import each other in a circle (docs/design.md, "The house")."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sts_export"
# bottom to top: a module may import its own layer (without a circle) and the layers below it, never above
LAYERS = [
    ("errors", "recipe"),
    ("tokenizer", "pruning", "families"),
    ("checkpoint", "graphs"),
    ("artifact",),  # the export directory's contract
    ("generate",),  # the one generation loop
    ("backends",),  # running: torch, onnxruntime, tensorrt runtime, aoti runtime
    ("pipeline", "export"),  # the entries for users (checkpoints, export directories); building: ONNX, engines, packages
    ("bench", "show", "serve"),  # tools
    ("cli", "run", "__init__"),  # command lines
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project's modules `path` imports anywhere in its body (a name imported from a package counts as its
    submodule when one exists)."""
    me = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            if not base.startswith("sts_export"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sts_export")}
    out.discard(me)
    return out


def layer_of(module: str) -> int:
    if module.endswith(".__main__"):  # `python -m sts_export.X` is a command line wherever it sits
        return LAYER["cli"]
    top = module.split(".")[1] if module.count(".") else "__init__"
    return LAYER[top]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_top_level_part_has_a_layer() -> None:
    tops = {module_name(p).split(".")[1] if module_name(p).count(".") else "__init__" for p in PACKAGE.rglob("*.py")}
    assert tops <= set(LAYER), f"parts without a layer (add them to LAYERS): {sorted(tops - set(LAYER))}"


def test_imports_run_downward() -> None:
    up = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                for a, bs in graph().items() for b in bs if b != "sts_export" and layer_of(b) > layer_of(a))
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_circles() -> None:
    full = graph()
    g = {a: {b for b in bs if b in full} for a, bs in full.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                cycles.append(path[path.index(m):] + [m] if m in path else [n, m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert full  # the package was read
