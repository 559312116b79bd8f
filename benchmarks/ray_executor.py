"""Run benchmark jobs as Ray tasks: an embedded local Ray by default, or a running cluster (--ray-address).

Each job is one call fn(*args) in a Ray worker process; the driver gets back its record with where it ran
(Ray node id, host, worker pid). A task that raises, or whose worker or node dies, comes back as a failed
record, never as a missing one.

Two scheduling rules:
- timed (default): at most one job in flight per machine, pinned to it, with whole GPUs. Runs that share a
  device, or a machine's CPUs and memory bandwidth, slow each other, and their times-to-target would say so.
  An embedded Ray started for timed jobs runs its workers at normal priority: Ray's default, nice 15, would let
  any other load on the machine slow the timed runs. Every record says the niceness its job ran at.
- accuracy-only: every job is submitted at once with its (possibly fractional) resources, and Ray packs
  as many onto each machine as fit.

The benchmarks package is shipped to the workers by value (cloudpickle), so a cluster needs fastcifar and
fastcifar-kernels installed, and the data on storage it can read, but not this checkout.
"""
import os
import socket
import sys

# embedded Ray on a small machine: no dashboard, a small object store (records are a few KB each)
EMBEDDED = {"include_dashboard": False, "object_store_memory": 100 * 1024 ** 2}
_WARM_ENV = "FASTCIFAR_RAY_WARM_PID"
NICENESS_ENV = "RAY_worker_niceness"  # Ray's worker_niceness setting, read by the raylet when it starts


def import_ray():
    try:
        import ray
    except ImportError:
        sys.exit("error: --executor ray needs Ray: pip install 'ray==2.60.*' (the 'sweeps' extra of fastcifar)")
    return ray


def start(address=None, timed=True):
    """Connect to ADDRESS (or $RAY_ADDRESS), else start an embedded Ray, its workers at nice 0 when timed;
    returns (a function that undoes it, the worker niceness asked for or None when Ray's own applies)."""
    ray = import_ray()
    import benchmarks
    ray.cloudpickle.register_pickle_by_value(benchmarks)
    if ray.is_initialized():  # the caller's own Ray session: use it, leave it running
        return (lambda: None), None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster's workers run at the niceness its raylets were started with
        ray.init(address=address)
        return ray.shutdown, None
    saved = os.environ.get(NICENESS_ENV)
    if timed:
        os.environ[NICENESS_ENV] = "0"
    try:
        ray.init(num_cpus=os.cpu_count(), **EMBEDDED)
    finally:  # the raylet has read it; this process keeps its own environment
        if saved is None:
            os.environ.pop(NICENESS_ENV, None)
        else:
            os.environ[NICENESS_ENV] = saved
    return ray.shutdown, 0 if timed else None


def _where(ray):
    return {"executor": "ray", "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "niceness": os.nice(0)}


def _call(fn, args, warmup=None):
    """In the worker. warmup=(fn, args): run once per worker process before its first job, untimed, so that
    process-wide one-time costs (CUDA context, library initialization, JIT) do not land on a timed run."""
    import ray
    if warmup is not None and os.environ.get(_WARM_ENV) != str(os.getpid()):
        wfn, wargs = warmup
        wfn(*wargs)
        os.environ[_WARM_ENV] = str(os.getpid())
    return fn(*args), _where(ray)


def machines(nodes, cpus, gpus):
    """One node id per machine (by IP) among the alive nodes that can hold one job's resources."""
    out = {}
    for n in nodes:
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("CPU", 0) >= cpus and res.get("GPU", 0) >= gpus:
            out.setdefault(n["NodeManagerAddress"], n["NodeID"])
    return sorted(out.values())


def failure(job, error):
    return dict(job["record"], status="failed", error=error, time_to_target_s=None,
                where={"executor": "ray", "node_id": None, "host": None, "pid": None, "niceness": None})


def run(jobs, fn, *, cpus, gpus, timed, warmup=None, on_result=None, poll_s=1.0):
    """Run every job (a dict: "args" for fn, "record" to report it by on failure); returns their records in
    job order. on_result(i, record) is called as each finishes. fn(*args) returns the record dict."""
    ray = import_ray()
    remote = ray.remote(_call)
    resources = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
    results = [None] * len(jobs)

    def finish(i, ref):
        try:
            rec, where = ray.get(ref)
            rec = dict(rec, where=where)
        except ray.exceptions.RayTaskError as e:  # fn raised (it records its own failures; this is a bug)
            rec = failure(jobs[i], f"{type(e.cause).__name__}: {e.cause}")
        except ray.exceptions.RayError as e:  # worker or node died, task cancelled, out of memory
            rec = failure(jobs[i], f"killed: {type(e).__name__}: {str(e).splitlines()[0]}")
        results[i] = rec
        if on_result:
            on_result(i, rec)

    pending = {}  # ref -> (job index, node id it is pinned to, or None)
    todo = list(range(len(jobs)))
    free = []
    if timed:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        free = machines(ray.nodes(), cpus, gpus)
        if not free:
            sys.exit(f"error: no Ray node has {cpus} CPU(s) and {gpus} GPU(s) for one run")
    else:
        pending = {remote.options(**resources).remote(fn, jobs[i]["args"], warmup): (i, None) for i in todo}
        todo = []
    try:
        while todo or pending:
            while todo and free:
                node = free.pop(0)
                strategy = NodeAffinitySchedulingStrategy(node, soft=False)
                ref = remote.options(**resources, scheduling_strategy=strategy).remote(fn, jobs[todo[0]]["args"], warmup)
                pending[ref] = (todo.pop(0), node)
            if todo and not pending:  # every machine that could hold a run is gone
                for i in todo:
                    results[i] = failure(jobs[i], "not run: no Ray node left that can hold a run")
                    if on_result:
                        on_result(i, results[i])
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in done:
                i, node = pending.pop(ref)
                finish(i, ref)
                if node is not None and (results[i]["where"]["pid"] is not None
                                         or node in machines(ray.nodes(), cpus, gpus)):
                    free.append(node)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results
