"""The shape of the code: the import graph of src/ has no cycle, and no function takes more than seven parameters
(past that, what travels together wants a small dataclass)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def imports_of(path: Path) -> set[str]:
    """The src modules a module imports, at any depth of its body (a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src"):
            found.add(node.module.split(".")[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("src."))
    modules = {p.stem for p in SRC.glob("*.py")}
    return found & modules


def test_the_import_graph_of_src_has_no_cycle():
    graph = {p.stem: imports_of(p) for p in SRC.glob("*.py")}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_function_takes_more_than_seven_parameters():
    too_many = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                n -= bool(a.args) and a.args[0].arg in ("self", "cls")
                if n > 7:
                    too_many.append(f"{path.name}:{node.lineno} {node.name} ({n})")
    assert not too_many, "functions with more than 7 parameters: " + ", ".join(too_many)


def test_the_reports_and_the_registry_load_without_torch():
    """The registry is an explicit list (no registration by importing a module), and the reports (JSON in,
    markdown out) read it and the result files without torch, transformers or accelerate."""
    import subprocess
    import sys

    code = ("import sys, src.reporting, src.registry\n"
            "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
            "print(len(src.registry.METHODS), heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC.parent).stdout
    from src import registry

    assert out.split()[0] == str(len(registry.METHODS)) and out.strip().endswith("[]"), out


def test_every_registered_method_names_a_function_that_exists():
    from src import registry

    for name, method in registry.METHODS.items():
        assert callable(method.function), name
        assert method.space in ("factors", "core", "dense", "data"), name
