"""A tiny name -> factory registry, the one way to look up backbones, losses, encoders, heads."""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return wrap

    def names(self) -> List[str]:
        return sorted(self._entries)

    def check(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")

    def get(self, name: str) -> Callable[..., T]:
        self.check(name)
        return self._entries[name]

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
