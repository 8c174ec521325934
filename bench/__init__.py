"""Benchmarks of the PACE fused linear ops and of ViT-B/16 training steps.

Run explicitly (``testpaths`` keeps them out of a plain ``pytest``)::

    pytest bench --benchmark-only --benchmark-json=out.json
    python -m bench.report out.json -o out.md

On a CUDA machine, ``bash bench/run_gpu.sh`` runs the CUDA test suite and the full set. Which set
runs is decided by :func:`bench.specs.full_set`: ``PACE_BENCH_FULL=1`` full, ``PACE_BENCH_FULL=0``
reduced, unset: full when CUDA is available, reduced otherwise.
"""
