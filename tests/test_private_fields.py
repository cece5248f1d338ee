"""No module of relex_callback/trajectory/ reads or writes another object's private fields (read from the source with
ast, nothing imported): a store's file bookkeeping is ``store.files`` (``persist.StoreFiles``), and what persist and
layout need of the arena goes through the store's public properties and methods. Only ``self`` and ``cls`` reach
underscore names; a module-private name of another module (``os._exit``) would be listed in ``ALLOWED`` with why."""

import ast
import os

import pytest

TRAJECTORY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "relex_callback", "trajectory")
OWN = {"self", "cls"}
# "module.py:name._attr" -> why it is allowed
ALLOWED: dict = {}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, filename: str = "<source>") -> list:
    """``line: owner._attr`` for each underscore attribute reached on a name other than ``self``/``cls``, spelled out
    or through ``getattr``/``setattr``/``hasattr``/``delattr`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            if node.value.id not in OWN:
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id not in OWN
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append(f"{node.lineno}: {node.args[0].id}.{node.args[1].value}")
    return found


def _modules() -> list:
    return sorted(f for f in os.listdir(TRAJECTORY) if f.endswith(".py"))


@pytest.mark.parametrize("module", _modules())
def test_no_module_reaches_into_another_objects_private_fields(module):
    path = os.path.join(TRAJECTORY, module)
    with open(path, encoding="utf-8") as f:
        uses = private_uses(f.read(), path)
    bad = [u for u in uses if f"{module}:{u.split(': ', 1)[1]}" not in ALLOWED]
    assert not bad, (
        f"relex_callback/trajectory/{module} reaches private fields of another object: {bad}; read them through a "
        "public property or method of their class, change them through one of its methods (a store's file "
        "bookkeeping is store.files, persist.StoreFiles)"
    )


def test_the_checker_sees_a_private_field_and_lets_self_and_public_names_pass():
    src = (
        "def f(store, s):\n"
        "    store._theta0_file = None\n"
        "    x = s._last_sums\n"
        "    setattr(store, '_meta_warned', True)\n"
        "    y = store.files.ring_entries + store.rows_in_use() + store.__class__.__name__\n"
        "class A:\n"
        "    def g(self):\n"
        "        return self._scratch, type(self)._k\n"
        "    @classmethod\n"
        "    def h(cls):\n"
        "        return cls._k\n"
    )
    assert sorted(private_uses(src)) == ["2: store._theta0_file", "3: s._last_sums", "4: store._meta_warned"]
