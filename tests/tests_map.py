"""Print the table of tests/README.md: each module of relex_callback/ and the test files that name it.

A test file names a module when it imports it (``import relex_callback.x``, ``from relex_callback.x import y``,
``from relex_callback.x import submodule``) or spells its dotted name (``python -m relex_callback.offline.cli``, a
``monkeypatch`` target). Helper scripts under tests/ (helpers.py, the child processes, dist_scripts/) count for the
test files that use them. Run ``python tests/tests_map.py`` and paste its output over the table when modules or tests
move; tests/test_tests_map.py checks that every module is in the table and every test file it lists exists.
"""

import ast
import os
import re

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
PKG = os.path.join(REPO, "relex_callback")


PUBLIC: dict = {}


def package_modules() -> list:
    """Dotted names of the package's modules (``relex_callback.x.y``; a package as its ``__init__``'s name)."""
    out = []
    for d, dirs, files in os.walk(PKG):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, ".")
                out.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(out)


def named_modules(path: str, modules: set) -> set:
    """The package modules the file at ``path`` imports or spells."""
    src = open(path, encoding="utf-8").read()
    found = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
            if node.module == "relex_callback":
                found.update(PUBLIC.get(a.name, "relex_callback") for a in node.names)
    found.update(re.findall(r"relex_callback(?:\.\w+)+", src))
    return {m for m in found if m in modules}


def public_names() -> dict:
    """Public name of ``relex_callback`` -> the module that defines it (``__init__``'s imports, lazy ones included)."""
    out = {}
    tree = ast.parse(open(os.path.join(PKG, "__init__.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                mod = "relex_callback" + (f".{node.module}" if node.module else "")
                if node.module is None:  # from . import config
                    out[a.asname or a.name] = f"{mod}.{a.name}"
                else:
                    out[a.asname or a.name] = mod
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            cmp = node.test.comparators[0]
            consts = cmp.elts if isinstance(cmp, ast.Tuple) else [cmp]
            names = [c.value for c in consts if isinstance(c, ast.Constant)]
            for st in node.body:
                if isinstance(st, ast.ImportFrom) and st.level == 1:
                    mod = "relex_callback" + (f".{st.module}" if st.module else "")
                    if len(st.names) == 1 and st.names[0].name not in names:  # from .offline import api
                        mod = f"{mod}.{st.names[0].name}"
                    for n in names:
                        out[n] = mod
    return out


def package_importers() -> dict:
    """module -> the package modules that import it (a relative or absolute import anywhere in their source)."""
    modules = set(package_modules())
    out = {m: set() for m in modules}
    for m in modules:
        is_pkg = os.path.exists(os.path.join(REPO, *m.split("."), "__init__.py"))
        path = os.path.join(REPO, *m.split("."), "__init__.py") if is_pkg else os.path.join(REPO, *m.split(".")) + ".py"
        here = m.split(".") if is_pkg else m.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                for t in [target] + [f"{target}.{a.name}" for a in node.names]:
                    if t in modules and t != m:
                        out[t].add(m)
    return out


def table() -> dict:
    """module -> sorted test files (``test_*.py`` under tests/) that name it, directly or through a helper."""
    modules = set(package_modules())
    scripts = {}
    for d, dirs, files in os.walk(TESTS):
        dirs[:] = [x for x in dirs if x not in ("__pycache__", "fixtures", "configs")]
        for f in files:
            if f.endswith(".py") and f != os.path.basename(__file__):
                scripts[os.path.relpath(os.path.join(d, f), TESTS)] = os.path.join(d, f)
    names = {rel: named_modules(p, modules) for rel, p in scripts.items()}
    helpers = {rel: ns for rel, ns in names.items() if not os.path.basename(rel).startswith("test_")}
    out = {m: set() for m in modules}
    for rel, ns in names.items():
        if not os.path.basename(rel).startswith("test_"):
            continue
        src = open(scripts[rel], encoding="utf-8").read()
        for h, hs in helpers.items():  # a helper the test file imports or runs
            stem = os.path.splitext(os.path.basename(h))[0]
            if re.search(rf"\b{re.escape(stem)}\b", src):
                ns = ns | hs
        for m in ns:
            out[m].add(rel)
    return {m: sorted(v) for m, v in sorted(out.items())}


def markdown() -> str:
    """The table: the test files naming each module; for a module none names, those naming its importers."""
    tab, importers = table(), package_importers()
    lines = ["| module | test files |", "| --- | --- |"]
    for m, tests in tab.items():
        if tests:
            cell = ", ".join(f"`{t}`" for t in tests)
        else:
            via = sorted(importers[m])
            through, todo, seen = set(), list(via), {m}
            while todo:  # the nearest importers some test names, however far up
                i = todo.pop()
                if i in seen:
                    continue
                seen.add(i)
                through.update(tab[i])
                if not tab[i]:
                    todo.extend(importers[i])
            through = sorted(through)
            cell = f"through {', '.join(f'`{i}`' for i in via)}: " + ", ".join(f"`{t}`" for t in through)
        lines.append(f"| `{m}` | {cell} |")
    return "\n".join(lines)


PUBLIC.update(public_names())

if __name__ == "__main__":
    print(markdown())
