"""The import rule (docs/architecture.md): imports go downward, and the domain knows nothing of HTTP."""

from __future__ import annotations

import ast

from tests.architecture import cycles, graph, modules

EDGE = ("gateway.api", "gateway.app", "gateway.serve", "gateway.workers")  # the HTTP edge and what runs it
HTTP_LIBRARIES = ("starlette", "uvicorn", "httptools", "websockets")


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_only_the_edge_imports_the_api_package() -> None:
    leaks = sorted(
        (module, target)
        for module, targets in graph().items()
        for target in targets
        if _inside(target, ("gateway.api", "gateway.app")) and not _inside(module, EDGE)
    )
    assert leaks == []


def test_the_domain_imports_no_http_library() -> None:
    leaks = []
    for module, path in modules().items():
        if _inside(module, EDGE) or not module.startswith("gateway"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            leaks += [(module, name) for name in names if name.split(".")[0] in HTTP_LIBRARIES]
    assert leaks == []


def test_the_store_imports_nothing_of_the_domain_above_it() -> None:
    above = sorted(
        (module, target)
        for module, targets in graph().items()
        if module.startswith("gateway.store")
        for target in targets
        if not _inside(target, ("gateway.store", "gateway.tasks"))
    )
    assert above == []


def test_the_graph_sees_imports_under_type_checking_and_inside_functions() -> None:
    edges = graph()
    assert "gateway.app" in edges["gateway.serve"]  # imported inside app_from_environment
    assert "gateway.runtime" in edges["gateway.app"]


def test_there_are_no_import_cycles() -> None:
    assert cycles(graph()) == []
