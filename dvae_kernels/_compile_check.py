"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without a GPU.

The interpreter accepts programs the GPU compiler rejects (ENVIRONMENT.md), so CI also runs
``python -m dvae_kernels._compile_check``: each kernel in :data:`KERNELS` goes through
``triton.compile`` to PTX and a cubin for each target. Run it without TRITON_INTERPRET.
Each entry: (kernel, signature {arg: type}, constexprs {arg: value}); constexpr arguments
appear in both, typed "constexpr". Cover each constexpr branch a launcher can take.
"""

from __future__ import annotations

import os
import sys
import time

TARGETS = ((80, "sm_80"), (90, "sm_90"))


def kernels():
    import importlib

    # The package namespace binds these names to the functions; the kernels live in modules.
    daps_weights, solve_eta, token_logprobs, weighted_token_nll = (
        importlib.import_module(f"dvae_kernels.{m}")
        for m in ("daps_weights", "solve_eta", "token_logprobs", "weighted_token_nll"))
    c = "constexpr"
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        for ti in ("i64", "i32"):
            for br, bv in ((4, 1024), (1, 4096)):
                out.append((token_logprobs._token_logprobs_fwd_kernel,
                            {"logits_ptr": f"*{dt}", "tokens_ptr": f"*{ti}",
                             "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                             "n_rows": "i32", "V": "i32", "stride_row": "i64",
                             "BLOCK_R": c, "BLOCK_V": c},
                            {"BLOCK_R": br, "BLOCK_V": bv}))
                for has_lp, has_h in ((True, True), (True, False), (False, True)):
                    out.append((token_logprobs._token_logprobs_bwd_kernel,
                                {"glogp_ptr": "*fp32", "gent_ptr": "*fp32",
                                 "logits_ptr": f"*{dt}", "tokens_ptr": f"*{ti}",
                                 "lse_ptr": "*fp32", "ent_ptr": "*fp32", "grad_ptr": f"*{dt}",
                                 "n_rows": "i32", "V": "i32", "stride_row": "i64",
                                 "stride_grad": "i64", "HAS_GLOGP": c, "HAS_GENT": c,
                                 "BLOCK_R": c, "BLOCK_V": c},
                                {"HAS_GLOGP": has_lp, "HAS_GENT": has_h,
                                 "BLOCK_R": br, "BLOCK_V": bv}))
                for grad in (True, False):
                    out.append((weighted_token_nll._weighted_token_nll_kernel,
                                {"logits_ptr": f"*{dt}", "tokens_ptr": f"*{ti}",
                                 "weights_ptr": "*fp32", "loss_ptr": "*fp32",
                                 "grad_ptr": f"*{dt}" if grad else "*fp32",
                                 "n_rows": "i32", "V": "i32", "stride_row": "i64",
                                 "stride_grad": "i64", "COMPUTE_GRAD": c, "BLOCK_R": c,
                                 "BLOCK_V": c, "ONE_TILE": c},
                                {"COMPUTE_GRAD": grad, "BLOCK_R": br, "BLOCK_V": bv,
                                 "ONE_TILE": br > 1}))
    for bn, bk in ((256, 8), (1, 2048)):
        out.append((daps_weights._daps_weights_kernel,
                    {"rewards_ptr": "*fp32", "logq_ptr": "*fp32", "beta_ptr": "*fp32",
                     "eta_ptr": "*fp32", "w_ptr": "*fp32", "ess_ptr": "*fp32", "N": "i32",
                     "K": "i32", "BLOCK_N": c, "BLOCK_K": c},
                    {"BLOCK_N": bn, "BLOCK_K": bk}))
        for resident in (True, False):
            out.append((solve_eta._solve_eta_kernel,
                        {"rewards_ptr": "*fp32", "logq_ptr": "*fp32", "beta_ptr": "*fp32",
                         "out_ptr": "*fp32", "N": "i32", "K": "i32", "target": "fp32",
                         "log_lo": "fp32", "log_hi": "fp32", "eta_max": "fp32", "ITERS": c,
                         "RESIDENT": c, "BLOCK_N": c, "BLOCK_K": c},
                        {"ITERS": solve_eta.ITERS, "RESIDENT": resident, "BLOCK_N": bn,
                         "BLOCK_K": bk}))
    out.extend(_extra_kernels())
    return out


def _extra_kernels():
    """Entries contributed by other op files: each may define ``COMPILE_CHECK`` (a list of
    entries in the same format) next to its kernels."""
    import importlib
    import pkgutil

    import dvae_kernels

    entries = []
    for mod in pkgutil.iter_modules(dvae_kernels.__path__):
        if mod.name.startswith("_") or mod.name in ("info",):
            continue
        module = importlib.import_module(f"dvae_kernels.{mod.name}")
        entries.extend(getattr(module, "COMPILE_CHECK", ()))
    return entries


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the compile check needs the real compiler",
              file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entries = kernels()
    failures = []
    t0 = time.perf_counter()
    for cap, arch in TARGETS:
        target = GPUTarget("cuda", cap, 32)
        for fn, sig, consts in entries:
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                          target=target)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as exc:  # report every failure, then fail
                failures.append(f"{fn.__name__} {consts} for {arch}: "
                                f"{type(exc).__name__}: {str(exc)[:2000]}")
    dt = time.perf_counter() - t0
    print(f"compiled {len(entries)} kernel variants for {', '.join(a for _, a in TARGETS)} in "
          f"{dt:.1f} s; {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
