"""`fit`: one training run, the same code path for the CLI, notebooks and the benchmarks.

Reads top to bottom: configure (settings, and the checkpoint of a resumed run, loaded once), the run folder,
set-up, compile warm-up, one epoch, evaluation, checkpoint, artefacts, and fit(), which strings them together.
"""
import contextlib
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from .config import EPOCH_BUDGET, TrainConfig, load_config_file
from .data import CLASSES, prepare_data, resolve_source
from .data.loaders import LOADERS
from .device import ConfigError, default_threads, device_name, pick_device, sync
from .evaluate import evaluate, per_class_accuracy, tta_logits
from .execution import Execution, check_fused, configure_backends, describe_device, plan
from .io import atomic_write_json
from .models import PARAM_BUDGET, count_params, make_model
from .optim import make_optimizer
from .plots import plot_curves, plot_misclassified
from .rundir import claim, new_run_dir, point_latest

WHITEN_IMAGES = 5_000  # 1.3M patches for the stem's 12x12 covariance: plenty, and a fraction of a second
RUNS_ROOT = "runs"
NEW_RUN_FOLDER = "new run folder"


@dataclass
class Result:
    """What fit returns: the trained model, what OUT/metrics.json holds, and the run folder."""
    model: torch.nn.Module
    metrics: dict
    out: str
    config: TrainConfig


# ---------------------------------------------------------------- configure

def configure(config=None, *, resume=None, config_file=None, explicit_source="argument", **settings):
    """(TrainConfig, the resumed run's checkpoint or None). Layers: preset -> device -> the resumed run ->
    a config file or object -> `settings`."""
    saved = None
    if resume:
        saved = load_checkpoint(os.path.join(resume, "model.pt"))
        if not isinstance(saved.get("config"), dict):
            raise CheckpointError(f"{resume}/model.pt: holds no training config to resume from")
        settings["out"] = resume
    file = load_config_file(config_file) if config_file else (config.to_dict() if config is not None else None)
    file_sources = dict(config.sources) if config is not None and not config_file else {}
    if saved is not None:  # the saved settings alone, through the same checks as the command line
        try:
            TrainConfig.resolve(resumed=saved["config"])
        except ConfigError as e:
            raise CheckpointError(f"{resume}/model.pt: its saved settings are not valid ({e})") from None
    cfg = TrainConfig.resolve(file=file, resumed=saved and saved["config"], explicit_source=explicit_source,
                              **settings)
    if file_sources:  # a TrainConfig passed in keeps the sources it was built with
        srcs = {k: (file_sources.get(k, v) if v == "config file" else v) for k, v in cfg.sources.items()}
        cfg = dataclasses.replace(cfg, sources=srcs)
    return cfg, saved


def assign_out(cfg):
    """A run without --out gets a folder of its own, runs/<norm>-<preset>-<time>, never a previous run's."""
    if cfg.out is not None:
        return cfg
    out = new_run_dir(RUNS_ROOT, f"{cfg.norm}-{cfg.preset}")
    return dataclasses.replace(cfg, out=out, sources={**cfg.sources, "out": NEW_RUN_FOLDER})


# ---------------------------------------------------------------- set-up

def lr_at(step, total, warmup):
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def default_model(cfg, fused):
    return make_model(cfg.norm, cfg.arch, fused=fused)


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(ckpt, path, device, model, opt, sched, loader):
    """Hand each piece of a checkpoint (loaded to the CPU) to its owner; a piece that does not fit is a
    one-line CheckpointError. RNG states must stay CPU ByteTensors."""
    for what, obj in (("model", model), ("optimizer", opt), ("scheduler", sched), ("loader", loader)):
        load_state(obj, ckpt[what], what, path)
    try:
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its RNG state does not fit ({type(e).__name__})") from None


@dataclass
class Run:
    """The state a run's steps share: built once by setup, then only its history and clocks change."""
    cfg: TrainConfig
    device: torch.device
    execution: Execution
    manifest: dict
    train_loader: Any
    test_loader: Any
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Optional[torch.amp.GradScaler]
    train_net: Callable
    eval_net: Callable
    ckpt_path: str
    fused: bool
    fused_fallback: Optional[str]
    history: list = field(default_factory=list)
    start_epoch: int = 0
    compile_time: float = 0.0
    fit_time: float = 0.0
    preds: Optional[torch.Tensor] = None

    def autocast(self):
        if self.execution.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.execution.dtype)


def setup(cfg, saved, model_factory=None, optimizer_factory=None):
    """Device, execution plan, data, model, optimizer and schedule; on resume, the run's own state."""
    device = pick_device(cfg.device)
    if saved and saved["device"] != device.type:  # a CPU and a CUDA generator do not share a state format
        raise ConfigError(f"--resume {cfg.out}: the run trained on {saved['device']}, this process would use "
                          f"{device.type}; resume it with --device {saved['device']}")
    if cfg.limit is not None and cfg.limit < cfg.batch_size:  # the last partial batch is dropped: no steps
        raise ConfigError(f"--limit {cfg.limit} is smaller than the batch size {cfg.batch_size}, so an epoch "
                          f"would have no training step; raise --limit or lower --batch-size")
    execution = plan(cfg, describe_device(device.type))
    for note in execution.notes:
        warnings.warn(note, stacklevel=3)
    configure_backends(device)
    torch.manual_seed(cfg.seed)
    fused, fused_fallback = False, None
    if execution.fused_norm == "triton":
        fused, fused_fallback = check_fused(cfg.fused_norm, device, execution.dtype)

    # data: converted once (betons where ffcv is installed), then batches live on the device
    data = prepare_data(resolve_source(cfg.data), cfg.beton_dir)
    train_loader = LOADERS[cfg.loader](data.paths["train"], cfg.batch_size, device, train=True, seed=cfg.seed,
                                       cutout=cfg.cutout, limit=cfg.limit)
    test_loader = LOADERS["resident"](data.paths["test"], 1000, device, train=False, limit=cfg.limit)
    # after the loaders: ffcv sets torch's thread count when it is imported and when a Loader starts
    torch.set_num_threads(cfg.threads or default_threads())

    model = (model_factory or default_model)(cfg, fused).to(device)
    fit_time = 0.0
    if not saved and hasattr(model, "stem"):  # a resumed run loads the fitted stem from its checkpoint
        t0 = time.perf_counter()
        model.stem.fit(train_loader.sample(WHITEN_IMAGES))
        sync(device)
        fit_time = time.perf_counter() - t0
    opt = (optimizer_factory or make_optimizer)(model, cfg, **({"fused": True} if execution.grad_scaler else {}))
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, steps_per_epoch // 2 + 1))
    # CUDA graphs for the training step only; evaluation sums several views' outputs, which a replay overwrites
    train_net = torch.compile(model, mode=execution.compile_mode, dynamic=False) if execution.compile else model
    eval_net = torch.compile(model, dynamic=False) if execution.compile_mode else train_net
    run = Run(cfg, device, execution, data.manifest, train_loader, test_loader, model, opt, sched,
              torch.amp.GradScaler(device.type) if execution.grad_scaler else None, train_net, eval_net,
              os.path.join(cfg.out, "model.pt"), fused, fused_fallback, fit_time=fit_time)
    if saved:
        restore(saved, run.ckpt_path, device, model, opt, sched, train_loader)
        if run.scaler is not None and "scaler" in saved:
            load_state(run.scaler, saved["scaler"], "scaler", run.ckpt_path)
        run.history, run.start_epoch, run.compile_time = saved["history"], saved["epoch"], saved["compile_time_s"]
        print(f"resuming {cfg.out} after epoch {run.start_epoch}")
    return run


# ---------------------------------------------------------------- compile warm-up

def warm_up(run):
    """Compile every graph the run will use before the clock starts: a training step at the training batch
    shape, and evaluation with its test-time views at each test batch shape. The model and optimizer are
    left as they were."""
    cfg, model = run.cfg, run.model
    t0 = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = run.train_loader.sample(cfg.batch_size)
    y = torch.zeros(len(x), dtype=torch.long, device=run.device)
    run.train_net.train()
    with run.autocast():
        F.cross_entropy(run.train_net(x).float(), y, label_smoothing=cfg.label_smoothing).backward()
    run.eval_net.eval()
    sizes = set()
    with torch.no_grad():
        for xb, _ in run.test_loader:  # a full test batch, and the last, shorter one
            if len(xb) not in sizes:
                sizes.add(len(xb))
                with run.autocast():
                    tta_logits(run.eval_net, xb, cfg.tta)
    model.load_state_dict(saved)
    run.opt.zero_grad(set_to_none=True)
    sync(run.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- one epoch

def train_epoch(run, epoch):
    """One pass over the training data. Returns (loss sum, correct, images seen, first non-finite step or -1),
    kept on the device: no host sync inside the step loop."""
    cfg, net, opt, sched, scaler = run.cfg, run.train_net, run.opt, run.sched, run.scaler
    device, steps_per_epoch = run.device, len(run.train_loader)
    net.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(progress(run.train_loader, f"epoch {epoch + 1}/{cfg.epochs}", cfg.quiet)):
        if run.execution.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with run.autocast():
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bad_now = ~torch.isfinite(loss.detach()) & (first_bad < 0)
        first_bad = torch.where(bad_now, epoch * steps_per_epoch + i, first_bad)
        seen += len(y)
    return loss_sum, correct, seen, first_bad


def progress(iterable, desc, quiet):
    if quiet:
        return iterable
    from tqdm.auto import tqdm  # a widget in a notebook, a bar on stderr in a terminal
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------- evaluation and checkpoint

def score(run):
    """(test loss, test accuracy, seconds); keeps the predictions for the artefacts."""
    t0 = time.perf_counter()
    test_loss, test_acc, run.preds = evaluate(run.eval_net, run.test_loader, run.autocast, tta=run.cfg.tta)
    return test_loss, test_acc, time.perf_counter() - t0


def report(h):
    test = (f"test loss {h['test_loss']:.3f} acc {100 * h['test_acc']:.2f}%" if h["test_acc"] is not None
            else "test: not evaluated")
    print(f"epoch {h['epoch']:2d}  train loss {h['train_loss']:.3f} acc {100 * h['train_acc']:.2f}%  {test}  "
          f"train time {h['train_time_s']:.1f}s", flush=True)


def save(run, epoch):
    state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
             "scheduler": run.sched.state_dict(), "loader": run.train_loader.state_dict(),
             "rng": rng_state(run.device), "device": run.device.type, "epoch": epoch, "history": run.history,
             "compile_time_s": run.compile_time, "config": run.cfg.to_dict(),
             "model_config": {"norm": run.cfg.norm, "arch": run.cfg.arch}}
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    save_checkpoint(run.ckpt_path, state)


def summarize(metrics, history, target, steps_per_epoch):
    scored = [h for h in history if h["test_acc"] is not None]
    hit = next((h for h in scored if h["test_acc"] >= target), None)
    metrics.update(
        epochs_run=len(history), eval_time_s=sum(h["eval_time_s"] for h in history),
        time_to_target_s=hit["train_time_s"] if hit else None, epochs_to_target=hit["epoch"] if hit else None,
        steps_to_target=hit["epoch"] * steps_per_epoch if hit else None,
        final_test_acc=history[-1]["test_acc"] if history else None,
        best_test_acc=max((h["test_acc"] for h in scored), default=None))


# ---------------------------------------------------------------- artefacts

def write_plots(run, metrics):
    cfg = run.cfg
    plot_curves([h for h in run.history if h["test_acc"] is not None], os.path.join(cfg.out, "curves.png"),
                cfg.target_acc, f"{cfg.norm}, {metrics['params']} params, {device_name(run.device)}")
    images = run.test_loader.images.permute(0, 2, 3, 1).cpu().numpy()
    plot_misclassified(images, run.test_loader.labels.cpu().numpy(), run.preds.cpu().numpy(), CLASSES,
                       os.path.join(cfg.out, "misclassified.png"))


# ---------------------------------------------------------------- the run

def start_metrics(run, params, within_budget):
    cfg, ex = run.cfg, run.execution
    return {
        "norm": cfg.norm, "arch": cfg.arch, "params": params, "epochs_run": len(run.history),
        "epochs_planned": cfg.epochs, "within_budget": within_budget, "device": device_name(run.device),
        "dataset": run.manifest["description"],
        "dataset_images": {s: v["images"] for s, v in run.manifest["splits"].items()},
        "loader": cfg.loader, "amp": ex.precision != "fp32", "precision": ex.precision, "grad_scaler": ex.grad_scaler,
        "amp_requested": cfg.amp, "compile": ex.compile, "compile_requested": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs, "fused_norm": run.fused, "fused_norm_fallback": run.fused_fallback,
        "preset": cfg.preset, "batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
        "muon_lr": cfg.muon_lr, "muon_ns_steps": cfg.muon_ns_steps, "seed": cfg.seed,
        "target_acc": cfg.target_acc, "stop_at_target": cfg.stop_at_target, "tta": cfg.tta,
        "steps_per_epoch": len(run.train_loader), "torch_threads": torch.get_num_threads(),
        "compile_time_s": run.compile_time, "whiten_fit_time_s": run.fit_time, "status": "running",
        "config": cfg.to_dict(), "settings_from": dict(cfg.sources), "execution": ex.to_dict(),
        "history": run.history,
    }


def fit(config=None, *, resume=None, checkpoint=None, model_factory=None, optimizer_factory=None,
        eval_epochs=None, callbacks=(), **settings):
    """Train one run and return a Result; writes OUT/metrics.json, model.pt (every epoch) and the plots.

    fit(norm="gn", preset="best") | fit(TrainConfig.resolve(...)) | fit(cfg, seed=3) | fit(resume="runs/x").
    Extension points for research: model_factory(cfg, fused) -> nn.Module, optimizer_factory(model, cfg) ->
    optimizer, eval_epochs (the 1-based epochs to score; the last is always scored), and callbacks, each
    called as cb(run, history_entry) after every epoch. `checkpoint`: a resumed run's state that configure()
    already loaded, with the config it gave.
    """
    if isinstance(config, TrainConfig) and not settings and resume is None:
        cfg, saved = config, checkpoint
    else:
        cfg, saved = configure(config, resume=resume, **settings)
    cfg = assign_out(cfg)
    with claim(cfg.out, resume=saved is not None, overwrite=cfg.overwrite):
        if cfg.sources.get("out") == NEW_RUN_FOLDER:
            point_latest(RUNS_ROOT, cfg.out)
        return _fit(setup(cfg, saved, model_factory, optimizer_factory), eval_epochs, callbacks)


def _fit(run, eval_epochs, callbacks):
    cfg, model = run.cfg, run.model
    metrics_path = os.path.join(cfg.out, "metrics.json")
    within_budget = cfg.epochs <= EPOCH_BUDGET
    if not within_budget:
        warnings.warn(f"!!! {cfg.epochs} epochs is over the {EPOCH_BUDGET}-epoch budget: "
                      "this run is recorded as within_budget=false !!!", stacklevel=3)
    params = count_params(model)
    if params > PARAM_BUDGET:
        within_budget = False
        warnings.warn(f"!!! {params} parameters is over the {PARAM_BUDGET} budget !!!", stacklevel=3)
    if run.execution.compile and run.start_epoch < cfg.epochs:
        # compiled outside the epoch loop so its cost is reported apart (and still counted in time-to-target)
        run.compile_time = warm_up(run)
    metrics = start_metrics(run, params, within_budget)
    steps_per_epoch = len(run.train_loader)
    scored = None if eval_epochs is None else set(eval_epochs) | {cfg.epochs}
    train_time = run.history[-1]["train_time_s"] if run.history else run.compile_time + run.fit_time
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen, first_bad = train_epoch(run, epoch)
        sync(run.device)
        train_time += time.perf_counter() - t0
        if first_bad.item() >= 0:
            metrics.update(status="failed", error=f"non-finite loss at step {first_bad.item()} "
                           f"(epoch {epoch + 1}); the last good checkpoint is kept")
            atomic_write_json(metrics_path, metrics)
            raise FloatingPointError(metrics["error"])
        test_loss, test_acc, eval_time = score(run) if scored is None or epoch + 1 in scored else (None, None, 0.0)
        h = {"epoch": epoch + 1, "steps": (epoch + 1) * steps_per_epoch, "train_loss": (loss_sum / seen).item(),
             "train_acc": (correct / seen).item(), "test_loss": test_loss, "test_acc": test_acc,
             "train_time_s": train_time, "eval_time_s": eval_time}
        run.history.append(h)
        report(h)
        save(run, epoch + 1)
        summarize(metrics, run.history, cfg.target_acc, steps_per_epoch)
        atomic_write_json(metrics_path, metrics)
        for cb in callbacks:
            cb(run, h)
        if cfg.stop_at_target and test_acc is not None and test_acc >= cfg.target_acc:
            break

    metrics["status"] = "done"
    if run.history:
        if run.preds is None:  # resumed after the last epoch: nothing was evaluated in this process
            score(run)
        labels = run.test_loader.labels.cpu().numpy()
        metrics["per_class_acc"] = per_class_accuracy(labels, run.preds.cpu().numpy())
        if cfg.plots:
            write_plots(run, metrics)
    summarize(metrics, run.history, cfg.target_acc, steps_per_epoch)
    atomic_write_json(metrics_path, metrics)
    return Result(model, metrics, cfg.out, cfg)
