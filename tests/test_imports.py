"""The package map of docs/design.md, enforced: no import circle between modules (imports inside functions
included), and at module level each package imports only the packages below it in LAYERS."""
import ast
import os

from conftest import ROOT

# Lowest first; the root holds cli.py and outputs.py (standard library only).
LAYERS = ["", "inference", "model", "checkpoint", "parallel", "run", "tools", "commands"]


def _modules():
    """{module: [(imported module, at module level?)]} for every module of mixtral_ms."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "mixtral_ms")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            tree = ast.parse(open(path, encoding="utf-8").read())
            top = {id(node) for node in tree.body}
            edges = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixtral_ms"):
                    assert node.level == 0, f"{module}: relative import"
                    for alias in node.names:
                        edges.append((f"{node.module}.{alias.name}", id(node) in top))
                elif isinstance(node, ast.Import):
                    edges += [(a.name, id(node) in top) for a in node.names if a.name.startswith("mixtral_ms")]
            out[module] = edges
    for module, edges in out.items():  # `from package import name`: the module `name`, else the package
        out[module] = [(m if m in out else m.rsplit(".", 1)[0], top) for m, top in edges]
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def test_no_import_circle():
    graph = {m: {t for t, _ in edges if t != m} for m, edges in _modules().items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_packages_import_downwards_at_module_level():
    wrong = []
    for module, edges in _modules().items():
        if module == "mixtral_ms":  # the public API (MixtralConfig, MixtralForCausalLM, ConfigError, ROOT)
            continue
        here = LAYERS.index(_package(module))
        for target, top in edges:
            if top and LAYERS.index(_package(target)) > here:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_nothing_puts_the_checkout_on_sys_path():
    offenders = []
    for top in ("mixtral_ms", "scripts", "tests", "bench"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".sh")):
                    path = os.path.join(folder, name)
                    if "sys.path.insert" in open(path, encoding="utf-8").read() and path != __file__:
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
