"""Fixtures of the data tests (the dataset builders are in format_builders.py)."""
import pytest


@pytest.fixture
def data_cfg():
    """A DataConfig for tiny images; call with the dataset name, root and key=value overrides."""
    from cssfe.config import load_config

    def build(name: str, root, *overrides: str):
        return load_config(None, [f"data.name={name}", f"data.root={root}", "data.image_size=32", "data.augment=none", *overrides]).data

    return build
