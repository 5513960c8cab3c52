"""Ablation sweeps with Ray Tune: studies as data (configs/sweeps/*.yaml), one trial per
(variant, seed), and the supplement-style table and chart of the results."""
from cssfe.sweep.runner import SweepOptions, run_sweep
from cssfe.sweep.studies import Study, available_studies, load_study, trial_key
from cssfe.sweep.summary import summary_markdown, write_summary

__all__ = ["Study", "SweepOptions", "available_studies", "load_study", "run_sweep", "summary_markdown", "trial_key", "write_summary"]
