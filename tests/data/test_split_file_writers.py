"""Split files written by several processes at once (the ranks of one node preparing a node-local
data root): every reader sees a whole file, no writer fails, no temporary file is left behind."""
import os
import threading

import numpy as np

from cssfe.data.split_files import read_pickle, write_class_files

WRITES = 150


def test_concurrent_writers_never_leave_a_torn_file_or_collide(tmp_path):
    folder = str(tmp_path)
    # distinct contents per writer, large enough that a write takes several system calls
    labels = {w: np.full((4000, 20), w % 2, dtype=np.uint8) for w in (0, 1, 2)}
    labels[2][::2] = 1
    start = threading.Barrier(4)
    errors, seen = [], []
    done = threading.Event()

    def writer(w):
        start.wait()
        try:
            for _ in range(WRITES):
                write_class_files(folder, labels[w], head_min=3, tail_max=1)
        except Exception as exc:  # noqa: BLE001 (any failure of a writer is the finding)
            errors.append(f"writer {w}: {type(exc).__name__}: {exc}")

    def reader():
        start.wait()
        path = os.path.join(folder, "class_freq.pkl")
        while not done.is_set():
            if not os.path.exists(path):
                continue
            try:
                stats = read_pickle(path)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"reader: {type(exc).__name__}: {exc}")
                continue
            gt = stats["gt_labels"]
            if not any(np.array_equal(gt, v) for v in labels.values()):
                errors.append("reader: a file mixing two writers' contents")
            seen.append(int(gt.sum()))

    writers = [threading.Thread(target=writer, args=(w,)) for w in labels]
    read = threading.Thread(target=reader)
    for t in (*writers, read):
        t.start()
    for t in writers:
        t.join()
    done.set()
    read.join()
    assert not errors, errors[:5]
    assert seen  # the reader did read files while they were being replaced
    assert sorted(os.listdir(folder)) == ["class_freq.pkl", "class_split.pkl"]  # no temporary file left
