"""Backbones: input -> features, behind the Backbone protocol. Heads belong to algorithms, so one backbone
serves every algorithm; defaults come from configs/model/*.yaml."""

from metarun.models.base import Backbone
from metarun.models.cnn import ConvNet
from metarun.models.mlp import MLP
from metarun.models.resnet12 import ResNet12
from metarun.models.transformer import Transformer

__all__ = ["MLP", "Backbone", "ConvNet", "ResNet12", "Transformer"]
