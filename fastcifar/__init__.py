"""fastcifar: train <=50K-parameter CIFAR-10 networks as fast as they can be trained.

    import fastcifar
    r = fastcifar.fit(norm="gn", preset="best")     # r.model, r.metrics, r.out
    cfg = fastcifar.TrainConfig.resolve(norm="ln")  # the settings, typed; fastcifar.fit(cfg)
"""

__version__ = "0.1.0"
__all__ = ["Result", "TrainConfig", "fit"]


def __getattr__(name):  # lazily: `import fastcifar` stays cheap, and `fastcifar.train` stays the CLI's module
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name in ("fit", "Result"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'fastcifar' has no attribute {name!r}")
