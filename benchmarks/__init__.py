"""The benchmark suite: each op's cases and providers defined once (``cases``, ``providers``), one
timing harness (``harness``), one row schema for every result file (``rows``), and the entry points
that use them: ``kernels`` (CPU), ``gpu_check`` (the GPU acceptance run), ``train_step``,
``profile_ops``, ``distributed``, ``compare``, ``plot`` and ``gpu_goals``. Run them as
``python -m benchmarks.<name>`` from the repository root.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
