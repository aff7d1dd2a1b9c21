"""The package imports in one direction: no module of megatron_jp imports, directly or through
others, a module that imports it back, and the layers stack as docs/DESIGN.md §2 draws them."""

import ast
from pathlib import Path

import megatron_jp

PACKAGE = Path(megatron_jp.__file__).parent

# Lower layers first; a module may import its own layer and those below it, never above. "x.*" is a
# package with everything in it, "x" one module (or a package's __init__); an exact name beats a
# package, a longer package beats a shorter one.
LAYERS = [
    {"megatron_jp", "megatron_jp.models", "megatron_jp.files", "megatron_jp.config_fields",
     "megatron_jp.torch_compat", "megatron_jp.precision"},  # stdlib and torch only
    {"megatron_jp.models.config"},
    {"megatron_jp.config"},
    {"megatron_jp.ops.*", "megatron_jp.models.*"},
    {"megatron_jp.data.*"},
    {"megatron_jp.parallel.*"},
    {"megatron_jp.training.*"},
    {"megatron_jp.eval.*"},
    {"megatron_jp.train"},
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("megatron_jp",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every megatron_jp module that importing `name` runs, at any depth of its code (lazy imports
    inside functions included): the target and the packages above it, but not the importer's own
    packages (those are already being imported when it runs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "megatron_jp":
                found |= {t for t in [*ancestors(target), target] if t in modules}
    return found - {name, *ancestors(name)}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> int:
    matches = [(name == pattern, len(pattern), level) for level, layer in enumerate(LAYERS) for pattern in layer
               if name == pattern or (pattern.endswith(".*") and (name + ".").startswith(pattern[:-1]))]
    assert matches, f"{name} belongs to no layer: add it to LAYERS"
    return max(matches)[2]


def test_megatron_jp_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = [f"{name} -> {dep}" for name, deps in import_graph().items() for dep in deps
              if layer_of(dep) > layer_of(name)]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))
