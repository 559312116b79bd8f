"""The kernels part: every norm shape of the gn and ln models, each configuration checked, then timed (one child
process, fresh compile caches); with --cpu-smoke one shape under TRITON_INTERPRET=1 with a one-call timer."""
import importlib
import os

import torch

from ..common import atomic_write_json
from .processes import crash_note, fresh_caches, run_child

SMOKE = {"batch": [2], "dtypes": ["fp32"], "formats": ["cl"]}  # the interpreter has no bf16
REPEATS, WARMUP = 100, 10  # timed calls (median reported) and untimed ones per row


def run(args, ctx):
    if not (ctx.cuda or ctx.smoke):
        return {"status": "skipped", "reason": "no CUDA device: the fused kernel is timed only on a GPU "
                                               "(--cpu-smoke runs this part's code on the CPU)"}
    spec = {"smoke": ctx.smoke, "modes": ["fwd", "fwdbwd"], "impls": ["eager", "compile", "fused"],
            **(SMOKE if ctx.smoke else {"batch": args.kernel_batch, "dtypes": args.kernel_dtypes,
                                        "formats": args.kernel_formats})}
    env = fresh_caches(os.path.join(ctx.out, "caches", "kernels"))
    if ctx.smoke:
        env["TRITON_INTERPRET"] = "1"
    res, rc, secs, log = run_child("kernels", spec, ctx.out, "kernels", args.timeout, env)
    rec = dict(spec, log=log, returncode=rc, wall_s=secs, **(res or {}))
    if res is None:
        return dict(rec, status="failed", reason=crash_note(rc, log, args.timeout))
    from ..kernels import failures
    failed = failures(res["configs"])
    problems = [f"{len(failed)} of {len(res['configs'])} configurations failed" if failed else "",
                f"{res['planned'] - len(res['configs'])} configurations never ran" if len(res["configs"]) <
                res["planned"] else "", f"the process {crash_note(rc, log, args.timeout)}" if rc != 0 else ""]
    problems = [p for p in problems if p]
    if problems:
        return dict(rec, status="failed", reason="; ".join(problems))
    n, shapes = len(res["configs"]), res["shapes"]
    return dict(rec, status="ok", reason=f"{n} configuration{'s' * (n != 1)} ({shapes} shape{'s' * (shapes != 1)}) "
                "checked against fp32 eager, then timed" + (" (--cpu-smoke: one call each, not a result)"
                                                            if ctx.smoke else ""))


def child(spec):
    from .. import kernels as K
    import fastcifar_kernels as fk
    impl = importlib.import_module("fastcifar_kernels.group_norm_relu")
    if impl.triton is None:
        raise RuntimeError("triton cannot be imported here: the kernels part times the Triton kernels")
    if impl._INTERPRETED != spec["smoke"]:
        raise RuntimeError("the kernels were imported " + ("without" if spec["smoke"] else "under") +
                           " TRITON_INTERPRET: " + ("set" if spec["smoke"] else "unset") + " it")
    shapes = K.model_norm_shapes()
    if spec["smoke"]:  # the smallest shape: the interpreter runs every program in Python
        shapes = [min(shapes, key=lambda s: s[0] * s[1] * s[2])]
        device, timers, l2, backend = "cpu", {"us": K.time_once}, 0, "eager"
    else:
        device, timers, backend = "cuda", K.gpu_timers(REPEATS, WARMUP), "inductor"
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    res = {"shapes": len(shapes), "planned": len(shapes) * len(spec["batch"]) * len(spec["formats"]) *
           len(spec["dtypes"]), "timers": sorted(timers), "configs": []}
    save = lambda records: atomic_write_json(spec["result"], dict(res, configs=records))  # noqa: E731
    save(K.time_configs(fk, shapes, spec["batch"], spec["formats"], spec["dtypes"], spec["modes"], spec["impls"],
                        device, timers, l2, backend, on_config=save))
    return 0
