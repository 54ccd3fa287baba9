"""Benchmarks of dvae_kernels and of the DAPS training step (docs/conventions.md#performance).

* ``python -m bench`` - kernel microbenchmarks (:mod:`bench.harness`).
* ``python -m bench.e2e`` - the training step, fused ops against the ``torch`` backend.
* ``python -m bench.gpu_report`` - everything a GPU machine should produce, in one command.

See bench/README.md for the rules every figure follows.
"""
