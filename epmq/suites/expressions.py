"""Suite YAMLs hold data, not code: a small evaluator for their arithmetic, and a checker for snippets.

mini-llm3's word problems state their answers as arithmetic over drawn integers (``answer: "a + b"``,
``where: "b < a"``, ``derived: {n: "a * b"}``). :func:`evaluate` reads such an expression with
Python's ``ast`` and computes it from a whitelist of nodes (numbers, the drawn names, + - * // %,
unary minus, comparisons, and/or/not, if-else): no calls, no attributes, no subscripts, so an edited
YAML cannot run anything. The code task's snippets are programs by design (the model predicts what
they print); :func:`check_snippet` admits only plain statements, a few builtins and
string/list/dict methods, no names or attributes starting with ``_`` and no integer literal above
:data:`MAX_LITERAL`, before the snippet runs.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
            ast.NotEq: operator.ne}


class ExpressionError(ValueError):
    """An expression of a suite YAML uses something the evaluator does not admit."""


def evaluate(expression: str, names: Mapping[str, object]) -> object:
    """The value of an arithmetic ``expression`` over ``names`` (see the module docstring)."""
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"expression {expression!r}: {error.msg}") from error
    return _value(tree.body, names, expression)


def _value(node: ast.AST, names: Mapping[str, object], expression: str) -> object:
    def value(child):
        return _value(child, names, expression)

    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ExpressionError(f"expression {expression!r}: unknown name {node.id!r} (known: {sorted(names)})")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](value(node.operand))
    if isinstance(node, ast.BoolOp):
        values = [value(item) for item in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = value(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = value(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return value(node.body) if value(node.test) else value(node.orelse)
    raise ExpressionError(f"expression {expression!r}: {type(node).__name__} is not allowed (arithmetic over names only)")


#: the largest integer literal a snippet may hold (loop bounds, repetitions)
MAX_LITERAL = 1000
SNIPPET_BUILTINS = ("print", "len", "sorted", "max", "min", "sum", "range", "str", "int", "list", "abs")
SNIPPET_METHODS = ("upper", "lower", "title", "join", "split", "strip", "replace", "count", "index", "find",
                   "startswith", "endswith", "append", "pop", "get", "keys", "values", "items", "reverse", "sort")
_SNIPPET_NODES = (
    ast.Module, ast.Expr, ast.Assign, ast.AugAssign, ast.For, ast.If, ast.Pass, ast.Break, ast.Continue,
    ast.Name, ast.Load, ast.Store, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Subscript, ast.Slice,
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Attribute, ast.keyword,
    ast.JoinedStr, ast.FormattedValue,
    *(_BINARY), ast.Div, *(_UNARY), *(_COMPARE), ast.In, ast.NotIn, ast.And, ast.Or,
)


def check_snippet(code: str) -> str:
    """``code`` if it is a plain snippet (see the module docstring); otherwise ExpressionError."""
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError as error:
        raise ExpressionError(f"snippet {code!r}: {error.msg}") from error
    for node in ast.walk(tree):
        if not isinstance(node, _SNIPPET_NODES):
            raise ExpressionError(f"snippet {code!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ExpressionError(f"snippet {code!r}: name {node.id!r} is not allowed")
        if isinstance(node, ast.Attribute) and node.attr not in SNIPPET_METHODS:
            raise ExpressionError(f"snippet {code!r}: attribute {node.attr!r} is not allowed")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in SNIPPET_BUILTINS:
            raise ExpressionError(f"snippet {code!r}: call of {node.func.id!r} is not allowed")
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) > MAX_LITERAL:
            raise ExpressionError(f"snippet {code!r}: integer {node.value} is above {MAX_LITERAL}")
    return code
