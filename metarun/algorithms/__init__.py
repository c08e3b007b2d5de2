"""Meta-learning algorithms: each is one file behind the MetaAlgorithm protocol plus one YAML file.

The public Python API: build a backbone from a benchmark's spec, an algorithm from both, and call
`meta_loss(batch)` in your own loop (README, "Use it from Python"); defaults come from configs/algo/*.yaml.
"""

from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.feat import FEAT
from metarun.algorithms.incontext import InContextLearner
from metarun.algorithms.leo import LEO
from metarun.algorithms.maml import MAML
from metarun.algorithms.matching import MatchingNet
from metarun.algorithms.metaoptnet import MetaOptNet
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.r2d2 import R2D2
from metarun.algorithms.reptile import Reptile

__all__ = ["FEAT", "LEO", "MAML", "InContextLearner", "MatchingNet", "MetaAlgorithm", "MetaOptNet", "MetaSGD", "ProtoNet", "R2D2",
           "Reptile"]
