"""``launch/prepare_data.py``: check a dataset before training and write or verify its split files.

Reads the dataset exactly as training will (every image decoded once), compares image, class and
group counts with the published ones (LT-VOC, LT-COCO), writes the split files that are missing,
prints a short report, and exits with 1 and the reason when anything is missing or wrong. The image
scan is recorded in the cache (``cache_dir``, default ``$CSSFE_CACHE``): training on the same files,
every rank of a multi-GPU launch included, reads it instead of decoding the images again, so run
this before launching (once per node when the cache is node-local).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from cssfe.config import ConfigError, load_config
from cssfe.data.annotated import read_annotated, save_split_files
from cssfe.data.datasets import LAYOUTS
from cssfe.data.image_checks import unreadable_images
from cssfe.data.published import EXPECTED
from cssfe.data.split_files import SplitFormatError


@dataclass
class DatasetReport:
    name: str
    root: str
    train: int
    test: int
    classes: int
    groups: Tuple[int, int, int]
    split_dir: str
    written: List[str]
    unreadable: List[Tuple[str, str]]
    generated: Dict[str, str]  # split -> where its list came from when not from a file
    found_split: bool = False  # the split folder already held class_split.pkl (read and checked)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(data_cfg, write_split_files: bool = True, progress: bool = False,
                  cache_dir: Optional[str] = None) -> DatasetReport:
    """Read ``data_cfg`` (a DataConfig) as training would, decode every image, and collect what
    disagrees with the published counts. Structural problems raise :class:`SplitFormatError`
    naming the file. With ``cache_dir`` the image scan is recorded there, and training on the same
    files (every rank of a launch) reads the record instead of decoding the images again."""
    if data_cfg.name not in LAYOUTS:
        raise SplitFormatError(f"prepare_data checks annotated datasets ({', '.join(sorted(LAYOUTS))}), not {data_cfg.name!r}")
    layout = LAYOUTS[data_cfg.name]
    parts = read_annotated(data_cfg, layout, write_split_files=False)
    unreadable = [(path, reason) for split in (parts.train, parts.test)
                  for _, path, reason in unreadable_images(split.sources, cache_dir, "checking images", progress)]
    groups = tuple(int((parts.groups == g).sum()) for g in range(3))
    report = DatasetReport(data_cfg.name, data_cfg.root, len(parts.train.ids), len(parts.test.ids), len(parts.class_names),
                           groups, parts.split_dir, [], unreadable, dict(parts.generated), parts.found_split)
    expected = EXPECTED.get(data_cfg.name)
    if expected is not None:
        for what, got, want in (("training images", report.train, expected.train), ("test images", report.test, expected.test),
                                ("classes", report.classes, expected.classes), ("head/medium/tail classes", groups, expected.groups)):
            if got != want:
                report.problems.append(f"{what}: {_fmt(got)}, expected {_fmt(want)}")
    if unreadable:
        report.problems.append(f"{len(unreadable)} unreadable image file(s): " + "; ".join(f"{p} ({r})" for p, r in unreadable[:5])
                               + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""))
    if report.ok and write_split_files and not parts.found_split:
        report.written = save_split_files(data_cfg, layout, parts)  # only for a dataset that passed
    return report


def _fmt(value) -> str:
    return "/".join(str(v) for v in value) if isinstance(value, tuple) else f"{value:,}"


def format_report(report: DatasetReport) -> str:
    expected = EXPECTED.get(report.name)

    def row(label: str, value, published) -> str:
        return f"  {label:<20}{_fmt(value):>9}" + (f"   (published: {_fmt(published)})" if expected else "")

    lines = [
        f"dataset {report.name} in {report.root}",
        row("training images", report.train, expected and expected.train),
        row("test images", report.test, expected and expected.test),
        row("classes", report.classes, expected and expected.classes),
        row("head/medium/tail", report.groups, expected and expected.groups),
        f"  {'unreadable files':<20}{len(report.unreadable):>9}",
    ]
    lines += [f"  {split} list: {source}" for split, source in report.generated.items()]
    if report.written:
        lines += [f"  wrote {path}" for path in report.written]
    elif report.found_split:
        lines.append(f"  split files in {report.split_dir}: read and checked against the labels")
    else:
        lines.append(f"  split files: none written to {report.split_dir}" + (" (the check failed)" if report.problems else " (--no-write)"))
    lines += [f"PROBLEM: {p}" for p in report.problems]
    lines.append("OK: ready to train" if report.ok else "FAILED: see the problems above")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(n.replace('_', '-') for n in sorted(LAYOUTS))}")
    parser.add_argument("--root", required=True, help="the dataset folder (docs/datasets.md shows the layouts)")
    parser.add_argument("--config", help="a YAML config whose data section is used (e.g. configs/lt_voc.yaml)")
    parser.add_argument("--no-write", action="store_true", help="only check; write no split files")
    parser.add_argument("overrides", nargs="*", help="data.key=value overrides (e.g. data.train_list=lists/train.txt); "
                        "cache_dir=DIR: where the image scan is recorded for training (default $CSSFE_CACHE)")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere among the options
    name = args.dataset.replace("-", "_")
    try:
        cfg = load_config(args.config, [f"data.name={name}", f"data.root={args.root}", *args.overrides])
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from cssfe.cache import default_cache_dir

        report = check_dataset(cfg.data, write_split_files=not args.no_write, progress=sys.stderr.isatty(),
                               cache_dir=cfg.cache_dir or default_cache_dir())
    except SplitFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0 if report.ok else 1
