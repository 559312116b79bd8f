"""The time_to_target part: time to the target per norm and configuration, every run a fresh process with empty
compile caches (a cold compile) after an untimed warm-up there; with --cpu-smoke, gn eager on a toy subset."""
import os
import shutil

from ..common import atomic_write_json, dataset_record, set_all_threads
from .processes import crash_note, fresh_caches, run_child

# configuration -> the execution settings of its runs (CUDA graphs capture the compiled step, so there is no
# graphs-without-compile configuration). Fused is "on", not "auto": a kernel that fails its check must fail
# the run, not time the torch path.
CONFIGS = {
    "eager": dict(compile="off", fused_norm="off", cuda_graphs=False),
    "compile": dict(compile="on", fused_norm="off", cuda_graphs=False),
    "compile-graphs": dict(compile="on", fused_norm="off", cuda_graphs=True),
    "fused": dict(compile="off", fused_norm="on", cuda_graphs=False),
    "compile-fused": dict(compile="on", fused_norm="on", cuda_graphs=False),
    "compile-fused-graphs": dict(compile="on", fused_norm="on", cuda_graphs=True),
}
FUSED_NORMS = ("gn", "ln")  # bn has no GroupNorm to fuse
SMOKE = {"norms": ["gn"], "seeds": 1, "epochs": 1, "limit": 256}


def configs_for(norm, names):
    return [c for c in names if norm in FUSED_NORMS or CONFIGS[c]["fused_norm"] == "off"]


def describe(name):
    """The configuration's settings as they are spelled in a TrainConfig."""
    return " ".join(f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in CONFIGS[name].items())


def run_config(args, norm, name, seed, data, out, device):
    """The TrainConfig of one timed run on the converted data in folder `data` (ConfigError when a setting is
    refused)."""
    from fastcifar import TrainConfig
    chosen = {"preset": args.preset, "epochs": args.epochs, "limit": args.limit}
    return TrainConfig.resolve(norm=norm, seed=seed, target_acc=args.target, device=device, data=data,
                               out=os.path.join(out, f"s{seed}"), amp=args.amp, quiet=True, plots=False,
                               **{k: v for k, v in chosen.items() if v is not None}, **args.fixed, **CONFIGS[name])


def plan(args, ctx):
    """(device, configuration names, seeds, norms) for this machine, or None when the part does not run here."""
    if ctx.smoke:  # no compile (minutes on a CPU), no graphs (CUDA only), fused only under the interpreter
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        names = [c for c, s in CONFIGS.items() if c in args.configs and s["compile"] == "off"
                 and (interpret or s["fused_norm"] == "off")]
        args.epochs, args.limit = args.epochs or SMOKE["epochs"], args.limit or SMOKE["limit"]
        return "cpu", names, args.seeds or SMOKE["seeds"], args.norm or SMOKE["norms"]
    if ctx.cuda:
        from fastcifar.models import NORMS
        return "cuda", args.configs, args.seeds or 3, args.norm or list(NORMS)
    return None


def run(args, ctx):
    from fastcifar.data import prepare_data, resolve_source
    from fastcifar.device import ConfigError

    from ..time_to_accuracy import summarize_norm, warmup_config
    planned = plan(args, ctx)
    if planned is None:
        return {"status": "skipped", "reason": "no CUDA device (--cpu-smoke runs a tiny eager run on the CPU)"}
    device, names, n_seeds, norms = planned
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    # a smoke run reads plain arrays: its runs then never import ffcv, whose start-up is most of a toy run's time
    prep = prepare_data(resolve_source(args.data), args.beton_dir, kind="arrays" if ctx.smoke else None)
    ctx.report["dataset"] = dataset_record(prep.manifest, args.limit)
    rec = {"device": device, "seeds": seeds, "target": args.target, "epochs": args.epochs, "limit": args.limit,
           "smoke": ctx.smoke, "configs": []}
    for norm in norms:
        for name in configs_for(norm, names):
            out = os.path.join(ctx.out, "time_to_target", f"{norm}-{name}")
            shutil.rmtree(out, ignore_errors=True)
            cfg = {"norm": norm, "config": name, "settings": describe(name), "runs": []}
            rec["configs"].append(cfg)
            try:
                configs = {s: run_config(args, norm, name, s, prep.folder, out, device) for s in seeds}
            except ConfigError as e:
                cfg.update(status="failed", reason=f"fastcifar refuses the settings: {e}")
                continue
            for seed, c in configs.items():
                print(f"  {norm} {name} seed {seed} ...", flush=True)
                warm = warmup_config(c, os.path.join(out, f"warmup-s{seed}"))
                spec = {"config": c.to_dict(), "warmup": warm.to_dict()}
                caches = os.path.join(ctx.out, "caches", f"{norm}-{name}-s{seed}")
                res, rc, secs, log = run_child("time_to_target", spec, ctx.out, f"time_to_target-{norm}-{name}-s{seed}",
                                               args.timeout, fresh_caches(caches))
                shutil.rmtree(caches, ignore_errors=True)
                run_rec = (res or {}).get("run") or {"norm": norm, "seed": seed, "status": "failed",
                                                     "error": crash_note(rc, log, args.timeout),
                                                     "time_to_target_s": None}
                cfg["runs"].append(dict(run_rec, warmup=(res or {}).get("warmup"), log=log, returncode=rc, wall_s=secs))
                cfg["summary"] = summarize_norm(cfg["runs"])
                ctx.progress("time_to_target", dict(rec, status="running"))
            # a smoke run's toy subset cannot reach a real target: that it trained is what it checks
            bad = [f"seed {e['seed']}: {e['error']}" for e in cfg["summary"]["errors"]
                   if e["status"] == "failed" or not ctx.smoke]
            bad += [f"seed {r['seed']}: the warm-up failed ({r['warmup'].get('error')})" for r in cfg["runs"]
                    if (r.get("warmup") or {}).get("status") == "failed"]
            cfg.update(status="failed" if bad else "ok", reason="; ".join(bad))
            print(f"  {norm} {name}: {cfg['status']} {cfg['reason']}", flush=True)
            ctx.progress("time_to_target", dict(rec, status="running"))
    bad = [f"{c['norm']} {c['config']}" for c in rec["configs"] if c["status"] != "ok"]
    if bad:
        return dict(rec, status="failed", reason=f"{len(bad)} of {len(rec['configs'])} configurations failed: "
                                                 f"{', '.join(bad)}")
    n, runs = len(rec["configs"]), sum(len(c["runs"]) for c in rec["configs"])
    return dict(rec, status="ok", reason=f"{n} configuration{'s' * (n != 1)}, {runs} run{'s' * (runs != 1)}: every "
                "run " +
                ("trained (--cpu-smoke: a toy subset, no target claimed)" if ctx.smoke else
                 f"reached {100 * args.target:g}%"))


def child(spec):
    """In a fresh process: the untimed warm-up, then the timed run; writes {warmup, run} to spec["result"]."""
    from ..time_to_accuracy import run_one
    set_all_threads()
    w = run_one(spec["warmup"])
    warm = {k: w.get(k) for k in ("status", "error", "wall_s")}
    print(f"warm-up: {warm}", flush=True)
    rec = run_one(spec["config"])
    if rec.get("traceback"):
        print(rec["traceback"], flush=True)
    print(f"run: {rec['status']} {rec.get('time_to_target_s')} {rec.get('error') or ''}", flush=True)
    atomic_write_json(spec["result"], {"warmup": warm, "run": {k: v for k, v in rec.items()
                                                               if k not in ("traceback", "history")}})
    return 0
