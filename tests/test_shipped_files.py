"""Every file under configs/ is loaded by a named test, so a new one cannot ship untested; the
DeepSpeed and study files that no end-to-end test runs are loaded here."""
import os
import re

import pytest

from cssfe.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# config file (relative to configs/) -> the test that loads it (relative to tests/)
CONFIG_TESTS = {
    "default.yaml": "test_config.py::test_default_yaml_equals_builtin_defaults",
    "baseline.yaml": "engine/test_shipped_configs.py::test_readme_training_commands",
    "lt_voc.yaml": "engine/test_shipped_configs.py::test_recipe_config_trains_on_its_dataset_layout",
    "lt_coco.yaml": "engine/test_shipped_configs.py::test_recipe_config_trains_on_its_dataset_layout",
    "odir5k.yaml": "engine/test_shipped_configs.py::test_recipe_config_trains_on_its_dataset_layout",
    "deepspeed/zero1.yaml": "test_shipped_files.py::test_deepspeed_configs_give_their_stage",
    "deepspeed/zero2.yaml": "test_shipped_files.py::test_deepspeed_configs_give_their_stage",
    "deepspeed/zero3.yaml": "test_shipped_files.py::test_deepspeed_configs_give_their_stage",
    "sweeps/backbones.yaml": "test_shipped_files.py::test_every_study_file_loads",
    "sweeps/custom_example.yaml": "test_shipped_files.py::test_every_study_file_loads",
    "sweeps/embeddings.yaml": "test_shipped_files.py::test_every_study_file_loads",
    "sweeps/embeddings_coco.yaml": "sweep/test_studies.py::test_the_bundled_coco_studies_remeasure_mask_embeddings_and_losses",
    "sweeps/enhancement.yaml": "sweep/test_studies.py::test_the_enhancement_studies_pair_every_form_with_enhancement_off",
    "sweeps/enhancement_coco.yaml": "sweep/test_studies.py::test_the_enhancement_studies_pair_every_form_with_enhancement_off",
    "sweeps/losses_coco.yaml": "sweep/test_studies.py::test_the_bundled_coco_studies_remeasure_mask_embeddings_and_losses",
    "sweeps/losses.yaml": "test_shipped_files.py::test_every_study_file_loads",
    "sweeps/mask.yaml": "test_shipped_files.py::test_every_study_file_loads",
    "sweeps/mask_coco.yaml": "sweep/test_studies.py::test_the_bundled_coco_studies_remeasure_mask_embeddings_and_losses",
    "sweeps/methods.yaml": "models/test_cprfl.py::test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1",
    "sweeps/methods_coco.yaml": "models/test_cprfl.py::test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1",
    "sweeps/methods_lt_coco.yaml": "models/test_cprfl.py::test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1",
    "sweeps/methods_lt_voc.yaml": "models/test_cprfl.py::test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1",
    "sweeps/methods_odir5k.yaml": "models/test_cprfl.py::test_methods_studies_compare_the_heads_on_one_recipe_and_report_f1",
}


def _shipped():
    return sorted(os.path.relpath(os.path.join(d, f), CONFIGS).replace(os.sep, "/")
                  for d, _, files in os.walk(CONFIGS) for f in files)


def test_every_config_file_is_loaded_by_a_named_test():
    """A file added under configs/ fails here until CONFIG_TESTS names the test that loads it; each
    named test exists and its file names the config (by stem, as the parametrized tests do)."""
    assert _shipped() == sorted(CONFIG_TESTS), "configs/ and CONFIG_TESTS differ: name the test of each new file"
    for config, test in CONFIG_TESTS.items():
        path, name = test.split("::")
        text = open(os.path.join(ROOT, "tests", path), encoding="utf-8").read()
        assert re.search(rf"^def {name}\(", text, re.M), f"{config}: no test {test}"
        stem = os.path.splitext(os.path.basename(config))[0]
        assert stem in text or config.startswith(("deepspeed/", "sweeps/")), f"{config}: {path} never names {stem}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_give_their_stage(stage):
    """Each shipped ZeRO file, read as a run reads it, gives its stage, with the batch arithmetic and
    precision filled in from the cssfe config."""
    from cssfe.engine.distributed import deepspeed_config

    path = os.path.join(CONFIGS, "deepspeed", f"zero{stage}.yaml")
    cfg = load_config(None, [f"distributed.deepspeed_config={path}", "data.batch_size=8", "distributed.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4 and ds["bf16"]["enabled"]


def test_every_study_file_loads():
    """Every study under configs/sweeps parses into variants that are valid training configs."""
    from cssfe.sweep.studies import load_study

    folder = os.path.join(CONFIGS, "sweeps")
    for name in sorted(os.listdir(folder)):
        study = load_study(os.path.join(folder, name))
        assert study.variants, name
