"""ResNet (He et al. 2016) in torchvision's layout, the backbone of DETR and Deformable DETR.

ResNet v1.5 as torchvision and timm build it: 7x7 stride-2 stem conv (``conv1``,
``bn1``), 3x3 stride-2 max pool, four stages ``layer1`` .. ``layer4`` of bottleneck
(1x1 - 3x3 - 1x1, the stride in the 3x3 conv) or basic (3x3 - 3x3) blocks, a 1x1-conv
projection shortcut (``downsample.0`` conv, ``downsample.1`` BN) in a stage's first block,
global average pool and ``fc``. Layer names are the torchvision / timm state-dict paths
(``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``: the same in both), so
``load_timm_weights`` loads timm's ``resnet50`` / ``resnet101`` and torchvision
checkpoints; DETR's ``backbone.0.body.`` prefix is handled by keras_vit/detection/detr.py.

The builder API other families build on (kept stable)::

    resnet(*, depth=50, block=None, layers=None, widths=(64, 128, 256, 512), stem_width=64,
           img_size=224, in_chans=3, num_classes=1000, features_only=False,
           out_indices=None, frozen_batch_norm=False,
           replace_stride_with_dilation=(False, False, False), drop_rate=0.0,
           inputs=None, name="resnet")

* ``depth``: 18 / 34 (basic blocks), 50 / 101 / 152 (bottlenecks); ``block`` ("basic" or
  "bottleneck") and ``layers`` (blocks per stage) override it for custom sizes, ``widths``
  are the per-stage planes (timm's ``channels``; a bottleneck stage outputs 4x), and
  ``stem_width`` the stem conv's channels.
* ``features_only=True``: a model whose outputs are the maps of the stages in
  ``out_indices`` (0 = ``layer1`` = C2 at stride 4, ..., 3 = ``layer4`` = C5; default all
  four; the usual int / negative-index convention of models/common.resolve_out_indices),
  NHWC. Deformable DETR takes ``out_indices=(1, 2, 3)``, DETR ``(3,)``.
* ``frozen_batch_norm=True``: every BatchNorm is ``FrozenBatchNorm`` (DETR's
  ``FrozenBatchNorm2d``): fixed statistics and affine, eps 1e-5, in training as well.
* ``replace_stride_with_dilation``: torchvision's flags for layer2, layer3, layer4; a
  True stage keeps its input resolution and dilates its 3x3 convs instead (the stage's
  first block keeps the previous dilation, as torchvision). DETR-DC5 sets layer4's.
* ``inputs``: an existing Keras tensor to build on (a detector's image input); else a
  new ``keras.Input`` named ``images``.

Input sizes must be multiples of the network stride (32; 16 with layer4 dilated) so that
every stage map is an exact fraction of the input, as the detectors' pixel masks assume.
"""

import keras
from keras import ops

from keras_vit.layers import batch_norm, dense
from keras_vit.layers.common import fused_inference_batch_norm
from keras_vit.models.botnet import MaxPool3x3S2
from keras_vit.models.common import check_img_size, check_in_chans, resolve_out_indices
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}


@keras.saving.register_keras_serializable(package="keras_vit")
class FrozenBatchNorm(keras.layers.Layer):
    """DETR's ``FrozenBatchNorm2d``: x * w / sqrt(running_var + eps) + (b - running_mean * ...).

    Four non-trainable weights named as torch's buffers (``weight``, ``bias``,
    ``running_mean``, ``running_var``). A layer of its own rather than a
    ``BatchNormalization(trainable=False)``: setting ``model.trainable = True`` (what
    fine-tuning code does) turns a Keras BatchNormalization's gamma/beta trainable
    again and makes it normalise with batch statistics in training; these weights are
    created non-trainable, so they stay fixed whatever the layer's flag, as in DETR.
    """

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        c = (input_shape[-1],)
        for name, init in (("weight", "ones"), ("bias", "zeros"), ("running_mean", "zeros"),
                           ("running_var", "ones")):
            setattr(self, name, self.add_weight(name=name, shape=c, initializer=init,
                                                trainable=False))

    def call(self, x):
        fused = fused_inference_batch_norm(x, self.weight, self.bias, self.running_mean,
                                           self.running_var, self.epsilon)
        if fused is not None:  # one oneDNN kernel with the convolution before it
            return fused
        scale = ops.cast(self.weight, x.dtype) * ops.rsqrt(
            ops.cast(self.running_var, x.dtype) + self.epsilon)
        shift = ops.cast(self.bias, x.dtype) - ops.cast(self.running_mean, x.dtype) * scale
        return x * scale + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _norm(x, name, frozen):
    return (FrozenBatchNorm(name=name) if frozen else batch_norm(name))(x)


def _conv(x, filters, kernel_size, stride, name, dilation=1):
    """torch's Conv2d(bias=False, padding=dilation * (k - 1) // 2): the padding made explicit
    (Keras' "same" pads stride-2 convs on the other side)."""
    pad = dilation * (kernel_size - 1) // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}.pad")(x)
    return keras.layers.Conv2D(filters, kernel_size, strides=stride, padding="valid",
                               dilation_rate=dilation, use_bias=False, name=name)(x)


def _relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def resnet_block(x, planes, stride, name, block="bottleneck", dilation=1, first_dilation=None,
                 frozen=False):
    """torchvision's ``Bottleneck`` (stride and dilation in conv2) or ``BasicBlock``, with the
    ``downsample`` projection when the shape changes. ``first_dilation``: the dilation of the
    block's first 3x3 conv (a dilated stage's first block keeps the previous one)."""
    first_dilation = first_dilation or dilation
    out_chs = planes * EXPANSION[block]
    shortcut = x
    if stride != 1 or x.shape[-1] != out_chs:
        shortcut = _conv(x, out_chs, 1, stride, f"{name}.downsample.0")
        shortcut = _norm(shortcut, f"{name}.downsample.1", frozen)
    if block == "bottleneck":
        y = _relu(_norm(_conv(x, planes, 1, 1, f"{name}.conv1"), f"{name}.bn1", frozen),
                  f"{name}.act1")
        y = _relu(_norm(_conv(y, planes, 3, stride, f"{name}.conv2", first_dilation),
                        f"{name}.bn2", frozen), f"{name}.act2")
        y = _norm(_conv(y, out_chs, 1, 1, f"{name}.conv3"), f"{name}.bn3", frozen)
    elif block == "basic":
        y = _relu(_norm(_conv(x, planes, 3, stride, f"{name}.conv1", first_dilation),
                        f"{name}.bn1", frozen), f"{name}.act1")
        y = _norm(_conv(y, planes, 3, 1, f"{name}.conv2", dilation), f"{name}.bn2", frozen)
    else:
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return _relu(y, f"{name}.act3" if block == "bottleneck" else f"{name}.act2")


def resnet(*, depth=50, block=None, layers=None, widths=(64, 128, 256, 512), stem_width=64,
           img_size=224, in_chans=3, num_classes=1000, features_only=False, out_indices=None,
           frozen_batch_norm=False, replace_stride_with_dilation=(False, False, False),
           drop_rate=0.0, inputs=None, name="resnet"):
    """Builds a torchvision-layout ResNet as a functional model (see the module docstring)."""
    if depth not in DEPTHS and (block is None or layers is None):
        raise ValueError(f"depth must be one of {sorted(DEPTHS)} (or give block and layers), "
                         f"got {depth!r}")
    block = block or DEPTHS[depth][0]
    layers = tuple(int(n) for n in (layers or DEPTHS[depth][1]))
    if block not in EXPANSION:
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    widths = tuple(int(w) for w in widths)
    if len(layers) != 4 or len(widths) != 4:
        raise ValueError(f"layers and widths need 4 stages, got {layers} and {widths}")
    dilate = tuple(bool(d) for d in replace_stride_with_dilation)
    if len(dilate) != 3:
        raise ValueError("replace_stride_with_dilation needs 3 flags (layer2, layer3, layer4), "
                         f"got {replace_stride_with_dilation!r}")
    stride_total = 4 * 2 ** sum(1 for d in dilate if not d)
    h, w = check_img_size(img_size, stride_total, what="the network stride")
    check_in_chans(in_chans)
    indices = set(resolve_out_indices(out_indices, 4, default="all", what="stages")
                  ) if features_only else set()

    if inputs is None:
        inputs = keras.Input((h, w, in_chans), name="images")
    x = _conv(inputs, stem_width, 7, 2, "conv1")
    x = _relu(_norm(x, "bn1", frozen_batch_norm), "act1")
    x = MaxPool3x3S2(name="maxpool")(x)

    dilation, features = 1, []
    for i, (n, planes) in enumerate(zip(layers, widths)):
        stride = 1 if i == 0 else 2
        previous = dilation
        if i > 0 and dilate[i - 1]:
            dilation, stride = dilation * stride, 1
        for j in range(n):
            x = resnet_block(x, planes, stride if j == 0 else 1, f"layer{i + 1}.{j}", block,
                             dilation=dilation, first_dilation=previous if j == 0 else dilation,
                             frozen=frozen_batch_norm)
        if i in indices:
            features.append(x)
        if features_only and i == max(indices):
            return keras.Model(inputs, features, name=name)

    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    if not num_classes:
        return keras.Model(inputs, x, name=name)
    x = keras.layers.Dropout(drop_rate, name="drop")(x)
    return keras.Model(inputs, dense(num_classes, name="fc")(x), name=name)


# timm's resnet50 / resnet101 (default tags a1_in1k / a1h_in1k: 224 px, crop 0.95, bicubic;
# torchvision's IMAGENET1K_V1 checkpoints have the same layout and names).
_CFG = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.95,
            interpolation="bicubic")
register_variant("resnet50", resnet, __name__, _CFG, depth=50)
register_variant("resnet101", resnet, __name__, _CFG, depth=101)
