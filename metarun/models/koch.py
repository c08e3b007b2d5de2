"""Koch, Zemel and Salakhutdinov (2015)'s Siamese embedding network for 105x105 Omniglot images (their Figure 4).

Four convolutional layers without padding: 64@10x10, 128@7x7, 128@4x4, 256@4x4, each followed by ReLU and the
first three by 2x2 max-pooling (105 -> 96 -> 48 -> 42 -> 21 -> 18 -> 9 -> 6), flattened (256 * 6 * 6 = 9216) into
a fully connected layer of 4096 sigmoid units, the embedding. No normalisation layer, as in the paper, so the
network is vmap-safe as it is. Weights are initialised as the paper says: convolutions N(0, 1e-2), biases
N(0.5, 1e-2), the fully connected layer N(0, 2e-1) (standard deviations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models.base import Backbone

_DEFAULTS = option_defaults("model", "koch")
LAYERS = ((64, 10), (128, 7), (128, 4), (256, 4))  # (channels, kernel) of the four convolutions


class KochNet(nn.Module, Backbone):
    """[N, C, H, W] images -> [N, embedding] sigmoid features (4096 in the paper)."""

    accepts = frozenset({"image"})

    def __init__(self, input_shape: Sequence[int], embedding: int = _DEFAULTS["embedding"],
                 width: float = _DEFAULTS["width"]) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=koch needs image inputs (C, H, W); got input shape {tuple(input_shape)}")
        if embedding < 1 or width <= 0:
            raise ValueError(f"model.embedding and model.width must be positive (got {embedding}, {width})")
        channels, size = int(input_shape[0]), int(input_shape[1])
        convs = []
        for index, (out, kernel) in enumerate(LAYERS):
            convs.append(nn.Conv2d(channels, max(1, round(out * width)), kernel))
            channels = convs[-1].out_channels
            size = size - kernel + 1
            if index < len(LAYERS) - 1:
                size //= 2
            if size < 1:
                raise ValueError(f"model=koch needs images of at least 105x105-like size; {tuple(input_shape)} "
                                 f"is too small for its unpadded 10/7/4/4 convolutions (benchmark.image_size=105)")
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(channels * size * size, embedding)
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=1e-2)
            nn.init.normal_(conv.bias, mean=0.5, std=1e-2)
        nn.init.normal_(self.fc.weight, std=2e-1)
        nn.init.normal_(self.fc.bias, mean=0.5, std=1e-2)
        self.out_features = embedding

    def forward(self, x: Tensor) -> Tensor:
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if index < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        return torch.sigmoid(self.fc(x.flatten(start_dim=-3)))
