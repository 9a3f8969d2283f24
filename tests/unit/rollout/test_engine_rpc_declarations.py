"""The engine RPC methods are generated from one table (`_FORWARDS`) and declared for type checkers in
each mixin's `TYPE_CHECKING` block: the declarations must name exactly the generated methods."""

from __future__ import annotations

import ast
import inspect

from rlstack.rollout.sync import engine_rpc


def _declared(class_name: str) -> set[str]:
    tree = ast.parse(inspect.getsource(engine_rpc))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    blocks = [n for n in cls.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return {f.name for b in blocks for f in b.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_declarations_match_the_forward_table() -> None:
    generated = set(engine_rpc._FORWARDS)
    assert _declared("EngineRPC") == generated
    assert _declared("AsyncEngineRPC") == generated


def test_generated_methods_have_the_right_flavour() -> None:
    for name in engine_rpc._FORWARDS:
        assert not inspect.iscoroutinefunction(getattr(engine_rpc.EngineRPC, name)), name
        assert inspect.iscoroutinefunction(getattr(engine_rpc.AsyncEngineRPC, name)), name
