"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without a GPU, as launches run it.

The interpreter accepts programs the GPU compiler rejects (a ``tl.dot`` with K < 16, say), so CI
also runs ``python -m dvae_kernels._compile_check``. The variants compiled are not written by
hand: the op launchers run on ``meta`` tensors at shapes chosen to reach every constexpr branch
(:func:`dvae_kernels._specialize.compile_check_workloads`), and each launch is compiled with the
signature, constexprs, 16-byte divisibility attributes and options Triton's own binder derives
from its arguments (:mod:`dvae_kernels._specialize`; ``bench.static`` compiles the same way). So
what passes here is what a GPU launch compiles. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import sys
import time

TARGETS = ((80, "sm_80"), (90, "sm_90"))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the compile check needs the real compiler",
              file=sys.stderr)
        return 2
    from dvae_kernels import _specialize as S

    failures = []
    count = 0
    t0 = time.perf_counter()
    workloads = S.compile_check_workloads()
    for cap, arch in TARGETS:
        launches = S.unique_launches(S.launches_of(workloads, cap))
        count = max(count, len(launches))
        for launch in launches:
            try:
                compiled = S.compile_launch(launch, cap)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as exc:  # report every failure, then fail
                failures.append(f"{launch.describe()} for {arch}: "
                                f"{type(exc).__name__}: {str(exc)[:2000]}")
    dt = time.perf_counter() - t0
    print(f"compiled {count} launch variants for {', '.join(a for _, a in TARGETS)} in "
          f"{dt:.1f} s; {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
