"""Every training setting, decided in one place: the presets and the typed, frozen `TrainConfig`.

A config is built once, in layers, each overriding the one before: defaults -> the preset (for the norm and, where
a preset value is given per device type, the device) -> the run being resumed -> a config file -> explicit
settings (command-line flags or keyword arguments). `sources` records which layer each value came from.

Settings fall in three kinds. The **recipe** decides what is learned (network, schedule, data, test-time views);
the **execution** decides only how it runs (device, precision, compile, kernels, threads, loader); the rest says
where files live. A recipe belongs to the recipe, not to the device: every preset value, for every device it may
be used on, has a measured record behind it (`RECORDS`; `tests/test_config.py` checks them).
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .device import ConfigError
from .models import ARCHS, NORMS
from .optim import OPTIMIZERS

EPOCH_BUDGET = 20
TTA_VIEWS = ("off", "flip", "flip-shift")
LOADER_NAMES = ("resident", "ffcv")
DEVICE_TYPES = ("cpu", "cuda")

# A value is one for every norm and device, {norm: value}, or {device type: either of those}.
PRESETS = {
    # the lean layout learns most per second; the shortest schedules whose last epoch reaches 70% on every seed.
    # Muon where it keeps a 73% mean at no more epochs (bn: +2 points; ln: one epoch fewer); gn's 2-epoch Muon
    # fell to 72.9%, so gn keeps SGD. bn's batch 192 takes a third fewer steps for -0.2 points, so its Muon is
    # quicker to 70% than the SGD it replaced
    "fast": dict(arch="lean", epochs={"bn": 2, "gn": 3, "ln": 2}, stop_at_target=True,
                 batch_size={"bn": 192, "gn": 128, "ln": 96}, lr={"bn": 0.45, "gn": 0.2, "ln": 0.2},
                 optimizer={"bn": "muon", "gn": "sgd", "ln": "muon"}, muon_lr={"bn": 0.225, "gn": None, "ln": 0.2}),
    # the layout that learns most in 20 epochs, inside 10 minutes on a 2-core CPU. Shortcuts and then GELU gained
    # on each of bn's five seeds; the shortcuts not on ln's two, and their 31% more FLOPs leave gn's slower
    # GroupNorm step no room. gn and ln keep ReLU, which the fused GroupNorm kernel folds in
    "best": dict(arch={"bn": "separable-res-gelu", "gn": "separable", "ln": "separable"}, epochs=20,
                 stop_at_target=False, batch_size=128,
                 lr={"bn": 0.2, "gn": 0.1, "ln": 0.1}, optimizer="sgd", muon_lr=None),
}
# the sweeps that measured each preset's recipe, per norm (repository paths; benchmarks/RESULTS.md reads them)
RECORDS = {
    "fast": {"bn": "benchmarks/measured/fast-muon-b192/bn/results.json", "gn": "benchmarks/measured/fast20/results.json",
             "ln": "benchmarks/measured/fast-muon-ns3/ln/results.json"},
    "best": {"bn": "benchmarks/measured/best-separable-res-gelu", "gn": "benchmarks/measured/best-separable-gnln",
             "ln": "benchmarks/measured/best-separable-gnln"},
}
RECIPE = ("norm", "preset", "arch", "epochs", "batch_size", "lr", "optimizer", "muon_lr", "muon_ns_steps",
          "weight_decay", "label_smoothing", "seed", "target_acc", "stop_at_target", "tta", "cutout", "limit")
EXECUTION = ("device", "amp", "compile", "cuda_graphs", "fused_norm", "threads", "loader")
FILES = ("data", "beton_dir", "out", "overwrite", "quiet", "plots")
FROM_PRESET = ("arch", "epochs", "batch_size", "lr", "optimizer", "muon_lr", "stop_at_target")
# a resumed run keeps its recipe and its data; the machine it resumes on chooses how to run it
RESUMED = RECIPE + ("loader", "data", "beton_dir")


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings. Build it with `TrainConfig.resolve(**settings)`; the fields are the
    command-line flags of `python -m fastcifar.train`, with underscores."""
    # recipe
    norm: str = "bn"
    preset: str = "fast"
    arch: Optional[str] = None            # None: from the preset
    epochs: Optional[int] = None          # None: from the preset
    batch_size: Optional[int] = None      # None: from the preset
    lr: Optional[float] = None            # peak learning rate (Muon: of what stays on SGD); None: from the preset
    optimizer: Optional[str] = None       # sgd or muon (on the conv filters); None: from the preset
    muon_lr: Optional[float] = None       # Muon's peak learning rate; None: from the preset
    muon_ns_steps: int = 3                # Newton-Schulz iterations per Muon step (as accurate as 5, measured)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    target_acc: float = 0.70
    stop_at_target: Optional[bool] = None  # None: the fast preset at its own epoch count
    tta: str = "flip-shift"               # test-time views
    cutout: int = 0
    limit: Optional[int] = None           # use only N train and N test images (smoke tests)
    # execution
    device: str = "auto"
    amp: bool = False
    compile: str = "auto"
    cuda_graphs: bool = False
    fused_norm: str = "auto"
    threads: Optional[int] = None
    loader: str = "resident"
    # files
    data: Optional[str] = None            # None: $FASTCIFAR_DATA, else the official download
    beton_dir: Optional[str] = None       # None: ~/.cache/fastcifar/betons/<key>
    out: Optional[str] = None             # None: a new runs/<norm>-<preset>-<time>
    overwrite: bool = False
    quiet: bool = False
    plots: bool = True
    # where each value came from: "default", "preset fast", "resumed run", "config file", "command line", ...
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        validate(self)

    # ------------------------------------------------------------ building

    @classmethod
    def resolve(cls, *, file=None, resumed=None, device_type=None, explicit_source="argument", **explicit):
        """The config for `explicit` settings over a config file's dict (`file`), over a resumed run's saved
        config (`resumed`), over the preset. `device_type` ("cpu"/"cuda") picks per-device preset values; by
        default the device the run would use."""
        names = {f.name for f in dataclasses.fields(cls)} - {"sources"}
        for layer, where in ((explicit, None), (file or {}, "config file"), (resumed or {}, "resumed run")):
            unknown = sorted(set(layer) - names - ({"sources"} if where else set()))
            if unknown:
                raise ConfigError(f"unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}"
                                  + (f" in the {where}" if where else ""))
        file = {k: v for k, v in (file or {}).items() if k != "sources"}
        resumed = {k: v for k, v in (resumed or {}).items() if k in RESUMED}
        if resumed and "optimizer" not in resumed:  # saved before the recipe named its optimizer: SGD
            resumed.update(optimizer="sgd", muon_lr=None)
        if resumed and "muon_ns_steps" not in resumed:  # saved before Muon named its Newton-Schulz steps: 5
            resumed["muon_ns_steps"] = 5
        if resumed:
            refuse_contradictions(resumed, explicit)
        values, sources = {}, {}
        for layer, where in ((resumed, "resumed run"), (file, "config file"), (explicit, explicit_source)):
            for k, v in layer.items():
                if v is not None or k not in FROM_PRESET:  # None asks for the preset's value
                    values[k], sources[k] = v, where
        norm, preset = values.get("norm", cls.norm), values.get("preset", cls.preset)
        if norm not in NORMS or preset not in PRESETS:  # validate() would say it, after a KeyError here
            return cls(**values)
        dev = device_type or pick_device_type(values.get("device", cls.device))
        for k in FROM_PRESET[:-1]:
            if values.get(k) is None:
                values[k], sources[k] = preset_value(preset, k, norm, dev), f"preset {preset} ({dev})"
        if values["optimizer"] != "muon" and sources["muon_lr"].startswith("preset"):
            values["muon_lr"] = None  # a preset's Muon rate does not follow a switch to SGD
        if values.get("stop_at_target") is None:  # the preset's stop, only at its own epoch count
            values["stop_at_target"] = PRESETS[preset]["stop_at_target"] and \
                values["epochs"] == preset_value(preset, "epochs", norm, dev)
            sources["stop_at_target"] = f"preset {preset} ({dev})"
        for f in dataclasses.fields(cls):
            sources.setdefault(f.name, "default")
        sources.pop("sources")
        return cls(**values, sources=sources)

    def replace(self, **changes):
        """A copy with `changes` applied as explicit settings; values that came from the preset are derived
        again, so they follow a new norm or preset."""
        keep = {k: v for k, v in self.to_dict().items() if not self.sources.get(k, "").startswith("preset")}
        cfg = TrainConfig.resolve(**{**keep, **changes})
        kept = {k: self.sources[k] for k in keep if k not in changes and k in self.sources}
        return dataclasses.replace(cfg, sources={**cfg.sources, **kept})

    # ------------------------------------------------------------ serializing

    def to_dict(self):
        """Every setting (no sources): JSON-able, and `from_dict` gives the same config back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sources"}

    @classmethod
    def from_dict(cls, d, source="config file"):
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of settings, not {type(d).__name__}")
        d = dict(d)
        sources = d.pop("sources", None)
        cfg = cls.resolve(file=d)
        if isinstance(sources, dict) and set(sources) == set(cfg.sources):
            return dataclasses.replace(cfg, sources={k: str(v) for k, v in sources.items()})
        return cfg

    def recipe(self):
        return {k: getattr(self, k) for k in RECIPE}

    def execution(self):
        return {k: getattr(self, k) for k in EXECUTION}

    def files(self):
        return {k: getattr(self, k) for k in FILES}


def load_config_file(path):
    """The settings of a JSON file written by --print-config (its "config" object) or of a plain object."""
    try:
        with open(os.path.expanduser(path)) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict):
        d = d["config"]
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    return d


def pick_device_type(device):
    if device in DEVICE_TYPES:
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def preset_value(preset, key, norm, device_type):
    v = PRESETS[preset][key]
    if isinstance(v, dict) and set(v) <= set(DEVICE_TYPES):
        v = v[device_type]
    return v[norm] if isinstance(v, dict) else v


def refuse_contradictions(saved, explicit):
    """A resumed run keeps its recipe: a setting given now that contradicts it is refused, except a larger
    epoch count, which extends the run."""
    for k, v in explicit.items():
        if k in RECIPE and k in saved and v is not None and v != saved[k]:
            if k == "epochs" and isinstance(v, int) and isinstance(saved[k], int) and v > saved[k]:
                continue
            raise ConfigError(f"--{k.replace('_', '-')} {v} contradicts the run being resumed (which has "
                              f"{saved[k]}); leave it out to keep the run's own setting")


# ---------------------------------------------------------------- validation

def _flag(name):
    return f"--{name.replace('_', '-')}"


def _check(ok, name, what):
    if not ok:
        raise ConfigError(f"{_flag(name)} {what}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def validate(c):
    """The same checks for the CLI, the API, a config file and a resumed run's saved settings."""
    for name, choices in (("norm", NORMS), ("preset", PRESETS), ("tta", TTA_VIEWS), ("loader", LOADER_NAMES),
                          ("device", ("auto",) + DEVICE_TYPES), ("compile", ("auto", "on", "off")),
                          ("fused_norm", ("auto", "on", "off"))):
        _check(getattr(c, name) in choices, name, f"must be one of {', '.join(choices)} (got {getattr(c, name)!r})")
    _check(c.optimizer is None or c.optimizer in OPTIMIZERS, "optimizer",
           f"must be one of {', '.join(OPTIMIZERS)} (got {c.optimizer!r})")
    _check(c.arch is None or c.arch in ARCHS, "arch", f"must be one of {', '.join(sorted(ARCHS))} (got {c.arch!r})")
    _check(c.epochs is None or (_is_int(c.epochs) and c.epochs >= 1), "epochs", "must be a whole number, at least 1")
    _check(c.batch_size is None or (_is_int(c.batch_size) and c.batch_size >= 1), "batch_size",
           "must be a whole number, at least 1")
    _check(c.lr is None or (_is_num(c.lr) and c.lr > 0), "lr", "must be a positive number")
    _check(c.muon_lr is None or (_is_num(c.muon_lr) and c.muon_lr > 0), "muon_lr", "must be a positive number")
    if c.optimizer == "sgd" and c.muon_lr is not None:
        raise ConfigError("--muon-lr applies only with --optimizer muon")
    if c.optimizer == "muon" and c.muon_lr is None:
        raise ConfigError(f"--optimizer muon needs --muon-lr "
                          f"(the {c.preset} preset has no measured one for {c.norm})")
    _check(_is_int(c.muon_ns_steps) and 1 <= c.muon_ns_steps <= 10, "muon_ns_steps",
           "must be a whole number in 1..10")
    _check(_is_num(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "must be a number, not negative")
    _check(_is_num(c.label_smoothing) and 0 <= c.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    _check(_is_int(c.seed) and c.seed >= 0, "seed", "must be a whole number, not negative")
    _check(_is_num(c.target_acc) and 0 < c.target_acc <= 1, "target_acc", "is a fraction in (0, 1]")
    _check(_is_int(c.cutout) and 0 <= c.cutout <= 32, "cutout", "must be a whole number of pixels in 0..32")
    _check(c.limit is None or (_is_int(c.limit) and c.limit >= 1), "limit", "must be a whole number, at least 1")
    _check(c.threads is None or (_is_int(c.threads) and c.threads >= 1), "threads", "must be a whole number, at least 1")
    for name in ("stop_at_target",):
        _check(getattr(c, name) is None or isinstance(getattr(c, name), bool), name, "must be true or false")
    for name in ("amp", "cuda_graphs", "overwrite", "quiet", "plots"):
        _check(isinstance(getattr(c, name), bool), name, "must be true or false")
    for name in ("data", "beton_dir", "out"):
        v = getattr(c, name)
        _check(v is None or (isinstance(v, str) and v and "\0" not in v), name, "must be a path")
    if c.cuda_graphs and c.compile == "off":
        raise ConfigError("--cuda-graphs captures the compiled step: it cannot be used with --compile off")
