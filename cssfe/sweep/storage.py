"""Where a sweep keeps its experiment: a local or shared folder, or a cloud URI (``s3://``,
``gs://``, ...) that Ray Tune writes through pyarrow. On a cluster every node must reach it: a
relative path, or a folder some node does not see, is refused before anything is scheduled.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import List, Optional

from cssfe.config import ConfigError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    """``s3://bucket/x``, ``gs://...``, ``file:///...``: a storage location Ray reaches through pyarrow."""
    return bool(_URI.match(path))


def resolve(storage: str) -> str:
    """A folder made absolute (the driver's working directory is not the trials'); a URI kept as given."""
    return storage.rstrip("/") if is_uri(storage) else os.path.abspath(storage)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if is_uri(path) else (pyarrow.fs.LocalFileSystem(), path)


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when there is none."""
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def upload_dir(local: str, destination: str) -> None:
    """Copy a local folder's files to ``destination`` (a folder or a URI)."""
    import pyarrow.fs

    fs, inner = _fs(destination)
    fs.create_dir(inner, recursive=True)
    pyarrow.fs.copy_files(local, inner, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def remove_tree(path: str) -> None:
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)


def check_cluster_storage(storage: str, address: Optional[str]) -> None:
    """With ``address`` (a cluster) the storage must be one every node reaches: a URI, or an
    absolute folder (a relative one names a different folder on each node). Runs before Ray starts."""
    if not address or is_uri(storage):
        return
    if not os.path.isabs(storage):
        raise ConfigError(
            f"--storage {storage!r} is a relative path; with --address every node of the cluster writes trial "
            "results and checkpoints there and would resolve it in its own working directory: give an absolute "
            "path of a folder shared by all nodes (NFS, Lustre, ...) or a cloud URI (s3://..., gs://...)")


def nodes_not_seeing(storage: str) -> List[str]:
    """Addresses of the alive cluster nodes that do not see a file the driver writes in ``storage``
    (a node-local folder): each node is asked by a zero-CPU task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if is_uri(storage):
        return []
    os.makedirs(storage, exist_ok=True)
    marker = os.path.join(storage, f".storage-check-{uuid.uuid4().hex}")
    open(marker, "w").close()
    try:
        probe = ray.remote(num_cpus=0)(os.path.exists)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(marker) for n in nodes])
        return [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen) if not ok]
    finally:
        os.remove(marker)
