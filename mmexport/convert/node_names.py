"""ONNX node names back to the torchvision module names a user knows (``node_Conv_330`` -> ``layer4.1.conv2``).

torch 2.x's dynamo exporter names nodes after the FX op (``node_Conv_292``,
``node_linear``) and records where each came from in the node's ``metadata_props``
(``pkg.torch.onnx.name_scopes``: ``['', 'layer4', 'layer4.1', 'layer4.1.bn2', '<op>']``).
After the exporter's own rewrites that record can name the wrong module: a
convolution with its BatchNorm folded in keeps the *BatchNorm's* scopes
(``layer4.1.bn2``). Its weight initializer keeps the parameter's name
(``layer4.1.conv2.weight``), so that is read first:

1. a ``<module>.weight`` initializer among the node's inputs -> ``<module>``;
2. the last module scope of ``pkg.torch.onnx.name_scopes``;
3. a TorchScript-exporter node name ``/layer4/layer4.1/conv2/Conv`` -> ``layer4.1.conv2``;

and a node none of them names keeps its ONNX name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from typing import Any

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _from_weight(node: Any, initializers: set[str]) -> str | None:
    for name in node.input:
        if name in initializers and name.endswith(".weight") and len(name) > len(".weight"):
            return name[: -len(".weight")]
    return None


def _from_scopes(node: Any) -> str | None:
    for prop in node.metadata_props:
        if prop.key != NAME_SCOPES_KEY:
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return None
        if not isinstance(scopes, list) or len(scopes) < 2:
            return None
        modules = [s for s in scopes[:-1] if isinstance(s, str) and s]  # the last entry is the op itself
        return modules[-1] if modules else None
    return None


def _from_path(name: str) -> str | None:
    """``/layer4/layer4.1/conv2/Conv`` -> ``layer4.1.conv2`` (the TorchScript exporter's scope path)."""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p][:-1]  # the last part is the op type
    full = ""
    for part in parts:
        full = part if not full or part.startswith(full + ".") else f"{full}.{part}"
    return full or None


def module_names(model: Any, nodes: Iterable[str] | None = None) -> dict[str, str]:
    """ONNX node name -> torch module name, for ``nodes`` (default: every node) that can be mapped."""
    wanted = None if nodes is None else set(nodes)
    initializers = {init.name for init in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if not node.name or (wanted is not None and node.name not in wanted):
            continue
        module = _from_weight(node, initializers) or _from_scopes(node) or _from_path(node.name)
        if module:
            found[node.name] = module
    return found


def shown(node: str, modules: dict[str, str]) -> str:
    """``layer4.1.conv2 (node_Conv_330)``; the bare node name where no module is known."""
    module = modules.get(node)
    return f"{module} ({node})" if module and module != node else node


__all__ = ["NAME_SCOPES_KEY", "module_names", "shown"]
