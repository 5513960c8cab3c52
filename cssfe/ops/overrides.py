"""Module-level settings changed for the duration of a ``with`` block: the strategy, block and
scratch overrides that tests and the GPU benchmark use to compare a kernel's variants."""
import contextlib


@contextlib.contextmanager
def overriding(namespace: dict, name: str, value):
    """Set the module global ``name`` (in ``namespace``, a module's globals()) inside the block only."""
    previous = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = previous
