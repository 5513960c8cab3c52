"""The up-front scan for unreadable images, remembered: decoded once per set of files.

``launch/prepare_data.py`` (or the first rank that loads the data) decodes every image and writes
what it found to ``<cache>/image_checks/<key>.json``; later loads of the same files (the other ranks
of a launch, the next run) read that instead of decoding them again. The key is the list of files in
order with each file's size and modification time, so a changed, added or replaced image is decoded
again.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

from cssfe.data.images import ImageSource, find_unreadable, source_files
from cssfe.data.split_files import atomic_write

VERSION = 1


def record_path(sources: Sequence[ImageSource], cache_dir: str) -> str:
    digest = hashlib.sha256(f"image-check v{VERSION}\n".encode())
    for i, source in enumerate(sources):
        for path in source_files(source):
            try:
                st = os.stat(path)
                digest.update(f"{i}\t{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{i}\t{os.path.abspath(path)}\tmissing\n".encode())
    return os.path.join(cache_dir, "image_checks", digest.hexdigest() + ".json")


def unreadable_images(sources: Sequence[ImageSource], cache_dir: Optional[str], desc: str = "checking images",
                      progress: bool = True) -> List[Tuple[int, str, str]]:
    """:func:`cssfe.data.images.find_unreadable` of ``sources``, read from the record of an earlier
    scan of the same files when there is one (``cache_dir`` None: always decoded, nothing kept)."""
    if cache_dir is None:
        return find_unreadable(sources, desc, progress)
    path = record_path(sources, cache_dir)
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("images") == len(sources):
            return [(int(i), str(p), str(r)) for i, p, r in record["unreadable"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record yet (or an unreadable one): decode
    bad = find_unreadable(sources, desc, progress)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, json.dumps({"images": len(sources), "unreadable": bad}))
    except OSError:  # a read-only cache: the scan still counts for this run
        pass
    return bad
