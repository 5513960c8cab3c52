"""One-shot GPU check of the cssfe kernels: environment, CUDA extension build, parity, benchmarks,
training steps. The GPU acceptance run::

    bash benchmarks/run_gpu_check.sh OUT_DIR            # on the GPU machine (sets MAX_JOBS, caches, timeout)
    python benchmarks/gpu_goals.py OUT_DIR/gpu_check.json
    python -m benchmarks.gpu_check --out DIR --cpu-dry-run   # the same code on CPU, tiny sizes

Modules: ``cli`` (options, ``main``), ``orchestrate`` (the process that owns the run: worker
processes, watchdogs, the time budget, the JSON), ``plan`` (which tasks run, from the suite's cases
and providers), ``worker`` (runs tasks in a subprocess), ``training`` (the training-step benchmark
and the DeepSpeed run), ``report`` (derived numbers and the Markdown summary).
"""
