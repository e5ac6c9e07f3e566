"""docs/architecture.md against the code: it lists every product module once, and each module imports
only modules listed above it (so there is no import circle, and nothing reaches back up the data path)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nanochat_fast"


def module_name(path: str) -> str:
    """The import name of a product file: kernels/ installs as nanochat_fast.kernels."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = [PACKAGE, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def documented_order() -> list[str]:
    """The files of the architecture table, top to bottom."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `([^`]+\.py)` \|", text, flags=re.MULTILINE)


def product_files() -> set[str]:
    files = {"train.py"} | {str(path.relative_to(ROOT)) for folder in (PACKAGE, "kernels")
                            for path in (ROOT / folder).rglob("*.py")}
    return {file.replace("\\", "/") for file in files}


def internal_imports(path: Path, modules: set[str]) -> set[str]:
    """The product modules a file imports, anywhere in it (function-level imports too). `from a import b`
    counts as module a.b when that is a module, else as a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")} | (
        {"train"} & found)


def test_the_architecture_lists_every_product_module_once():
    order = documented_order()
    assert len(order) == len(set(order)), "a module is listed twice"
    assert set(order) == product_files()


def test_each_module_imports_only_modules_above_it():
    order = documented_order()
    position = {module_name(file): index for index, file in enumerate(order)}
    wrong = []
    for index, file in enumerate(order):
        for imported in sorted(internal_imports(ROOT / file, set(position))):
            assert imported in position, f"{file} imports {imported}, which the architecture does not list"
            if position[imported] >= index:
                wrong.append(f"{file} imports {imported}, listed below it")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def later():\n    from nanochat_fast import lstm, LSTM\n    import nanochat_fast.web.app\n")
    modules = {"nanochat_fast", "nanochat_fast.lstm", "nanochat_fast.web.app"}
    assert internal_imports(source, modules) == modules
