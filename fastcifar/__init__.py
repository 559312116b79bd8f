"""fastcifar: train <=50K-parameter CIFAR-10 networks as fast as they can be trained."""

__version__ = "0.1.0"
