"""Net surgery: a classifier cast as convolutions, so a larger input gives a map of class scores.

This is the classic Caffe "net surgery" example (``net_surgery.ipynb``): CaffeNet's
``fc6``/``fc7``/``fc8`` are reshaped into 6x6 and 1x1 convolutions, after which a
451 x 451 input yields an 8 x 8 grid of class probabilities, one per 227 x 227
window every 32 pixels (cells = (input - 227) / 32 + 1). Here it works for every
kind of model deepfeat loads:

* **flattening FC heads** (Caffe ``InnerProduct`` layers, torchvision AlexNet/VGG):
  the first FC layer after the flatten becomes a k x k convolution over the feature
  map it was trained on (:func:`fc_to_conv_weight`: ``out x (C*k*k)`` ->
  ``out x C x k x k``, the C, H, W flatten order of both frameworks), later FC
  layers 1x1 convolutions. torchvision's ``AdaptiveAvgPool2d(6)``/``(7)`` is an
  identity at the native input size and is dropped (at a larger input it would
  squash the map back to 6 x 6).
* **global pooling + linear heads** (timm, the embedded EfficientNet-Lite,
  torchvision ResNet/MobileNet/EfficientNet/DenseNet/RegNet...): the linear layer
  runs as a 1x1 convolution on the un-pooled feature map, after the global pooling
  has become a sliding pool over a *window* of feature cells. With the default
  ``window="native"`` the window is the feature-map size at the model's native
  input (7 x 7 for a 224 input at stride 32), so each cell is exactly the
  classifier applied to one native-size window of the input, as in the Caffe
  example; ``window=1`` classifies every feature-map cell on its own (a class
  activation map: since pooling and the linear layer are both linear for average
  pooling, the mean of those per-cell logits is the original logits).

The result of :func:`fully_convolutional` is a plain ``nn.Module``
(:class:`DenseClassifier`) that maps the normalised ``N x C x H x W`` batch to
``N x classes x h x w`` *probabilities* by default (a softmax over the class axis
is appended for models whose output is logits; Caffe nets ending in a ``Softmax``
layer already give probabilities); ``softmax=False`` keeps the model's own output
kind. It can be saved with ``torch.save`` (module or ``state_dict``). Every
conversion is checked numerically when it is built: at the native input size the
one cell must equal the original classifier, and (for the pooled heads) each cell
of a larger map must equal the original head applied to its window. A head that
cannot be written as convolutions raises :class:`~deepfeat.errors.ModelError`
saying which operation is in the way.

:func:`dense_map` runs it on an image and returns a :class:`DenseMap` (probabilities
per cell, the argmax grid, the top-class probability map, labels).

The package, one part a module:

* :mod:`.modules`: FC weights as convolution weights (:func:`fc_to_conv_weight`,
  :func:`linear_to_conv`) and the modules a dense classifier is made of
  (:class:`DenseClassifier`, :class:`Elementwise`, :class:`ChannelLayerNorm`);
* :mod:`.fxnodes`, :mod:`.split`, :mod:`.head`: reading a ``torch.fx`` graph,
  splitting a network into trunk and head, converting the head op by op;
* :mod:`.caffe`: the same for a Caffe net, layer by layer;
* :mod:`.checks`: the numerical equivalence checks;
* :mod:`.convert`: :func:`fully_convolutional`, which puts these together;
* :mod:`.densemap`: :func:`dense_map` and :class:`DenseMap` (running it on an image);
* :mod:`.pixels`: :func:`load_pixels` (the pictures glue shared with :mod:`deepfeat.viz.network`).
"""

from __future__ import annotations

from deepfeat.surgery.convert import fully_convolutional
from deepfeat.surgery.densemap import DenseMap, dense_map
from deepfeat.surgery.modules import DenseClassifier, fc_to_conv_weight, linear_to_conv
from deepfeat.surgery.pixels import load_pixels

__all__ = [
    "DenseClassifier", "DenseMap", "dense_map", "fc_to_conv_weight", "fully_convolutional", "linear_to_conv",
    "load_pixels",
]
