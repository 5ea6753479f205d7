"""The registry of replacement modules: name -> class, and the JSON spec contract."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from torch import nn

__all__ = ["SurgeryModule", "build", "register_module", "registered"]

_REGISTRY: dict[str, type[SurgeryModule]] = {}

T = TypeVar("T", bound="type[SurgeryModule]")


class SurgeryModule(nn.Module):
    """Base class of every module a pass inserts.

    Subclasses take only JSON-serialisable constructor arguments and return them from
    :meth:`spec`, so that ``type(m)(**m.spec())`` builds a module with the same parameter
    and buffer names and shapes; the weights then come from the saved state dict.

    A module that *wraps* the module it replaces (e.g. a token-skipping wrapper around an
    encoder) names the attribute that holds it in ``wraps``: on reload the wrapper is built
    from its spec with that attribute left unset, and the module the rebuilt base architecture
    has at the same path is put there before the weights are loaded.
    """

    wraps: ClassVar[str | None] = None

    def spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def registry_name(cls) -> str:
        return cls.__name__


def register_module(cls: T) -> T:
    """Class decorator: make ``cls`` rebuildable by name from a saved surgered model."""
    name = cls.registry_name()
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"surgery module `{name}` registered twice")
    _REGISTRY[name] = cls
    return cls


def registered() -> dict[str, type[SurgeryModule]]:
    """A copy of the registry: class name -> class."""
    return dict(_REGISTRY)


def build(name: str, spec: dict[str, Any]) -> SurgeryModule:
    """Construct the registered module ``name`` from its saved ``spec``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown surgery module `{name}` (known: {known})") from None
    return cls(**spec)
