import json

import numpy as np
import pytest

from cssfe.report import bar_chart, load_runs, markdown_table


def test_table_mean_and_sample_std(tmp_path):
    dirs = []
    for i, total in enumerate([50.0, 60.0, 70.0]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        block = {"total": total, "head": 80.0, "medium": None, "tail": 40.0 + i}
        (d / "metrics.json").write_text(json.dumps({"final": {"mAP": block}}))
        dirs.append(str(d))
    values = load_runs(dirs)
    assert values.shape == (3, 4) and np.isnan(values[:, 2]).all()
    table = markdown_table({"cssfe": values})
    assert "| cssfe | 60.00 ± 10.00 | 80.00 ± 0.00 | n/a | 41.00 ± 1.00 | 3 |" in table
    with pytest.raises(FileNotFoundError):
        load_runs([str(tmp_path / "missing")])

    bar_chart({"cssfe": values, "other": values - 5}, str(tmp_path / "chart.png"))
    from PIL import Image

    with Image.open(tmp_path / "chart.png") as img:
        assert img.size == (800, 400)
