"""Medical Transformer (Valanarasu et al. 2021, "Medical Transformer: Gated Axial-Attention
for Medical Image Segmentation"): gated axial attention, the gated axial U-Net and MedT.

Gated axial attention attends along one axis (a column for the ``hight_block``, a row for
the ``width_block``) with relative position embeddings for queries, keys and values
(``relative``, one entry per offset) and four learned gates that weigh the positional
terms: similarity = BN(qk) + BN(f_qr * qr) + BN(f_kr * kr) (one BatchNorm2d over the three
stacked), then output = BN(f_sv * sv) + BN(f_sve * sve) (one BatchNorm1d over both, their
channels interleaved as the official ``view`` leaves them). A block is a ResNet-style
bottleneck: 1x1 ``conv_down`` + BN + ReLU, height then width attention (the width block
average-pools by the stride), ReLU, 1x1 ``conv_up`` + BN, the (``downsample``) shortcut,
ReLU.

``gated_axial_unet`` (the official ``gated``): a 7x7 stride-2 stem conv and two 3x3 convs
(to a fixed 128 channels and back), four stages of gated axial blocks (``layer1`` ...
``layer4``, widths 128 s ... 1024 s, strides 1, 2, 2, 2), a decoder of 3x3 convs each
followed by 2x bilinear upsampling, ReLU and the skip of the stage it reaches (``decoder1``
is stride 2, so it returns to layer4's resolution), and the 1x1 ``adjust`` to the classes.
Logits come out at the input resolution.

``medt`` (the official ``MedT``, local-global "LoGo" training): the global branch runs the
stem, ``layer1``, ``layer2`` and ``decoder4``/``decoder5`` on the whole image; the local
branch (the ``*_p`` modules: a stem, four stages of axial blocks *without* positional
embeddings or gates, the five decoder convs) runs on each of the 4 x 4 patches of the image
with shared weights, and its outputs are tiled back. The two maps are summed, then
``decoderf`` (3x3) + ReLU and ``adjust``. The patches are static slices of a fixed grid
(builtin TFLite); by default they go through the local branch as one batch (identical in
inference; ``per_patch=True`` keeps the official one-call-per-patch loop, whose training-mode
BatchNorm normalises each patch on its own).

Follows ``lib/models/axialnet.py`` of jeya-maria-jose/Medical-Transformer (``gated``,
``MedT``: s = 0.125, groups 8, layers [1, 2, 4, 1]; ``train.py``: 3 input channels,
num_classes 2, the README's ``--imgsize 128``; images are ``ToTensor`` [0, 1] without
normalisation). Layer names are its module paths, so its ``.pth`` state dicts load through
``keras_vit.load_timm_weights`` (``keras_vit.convert.medt``). Parameters it defines but
never uses (``AxialBlock_wopos.conv1``, ``adjust_p``) are kept as ``UnusedConv``
layers so that its checkpoints load strictly and its parameter count is matched.

Where this generalises the official code, it agrees with it wherever the official code
runs as intended:
  - The relative tables are sized by the axis each block attends along (the official
    ``kernel_size`` is one number, so it only runs square images); a non-square image
    builds with a table per axis.
  - The local branch's patches are a quarter of the image on each side; the official loop
    slices fixed 32 px patches, which is the same at its 128 px (at other sizes it fails
    below 128 px and covers only the top-left 128 px above).
  - The gates are trainable weights; the official creates them with requires_grad=False
    and ``train.py`` turns every parameter trainable after epoch 10.
The relative tables depend on the input size, as in the official code: a checkpoint made
at another size is refused with a clear error (nothing is resampled).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vit.layers import batch_norm
from keras_vit.layers.attention import softmax_float32
from keras_vit.models.common import check_img_size, check_in_chans
from keras_vit.registry import register_variant

BN_EPS = 1e-5
# The official bottleneck's expansion (AxialBlock*.expansion).
EXPANSION = 2
# The stem's middle conv has a fixed width in the official code, whatever the scale s.
STEM_WIDTH = 128
# torch's default Conv2d init (kaiming_uniform_(a=sqrt(5))): U(+-1/sqrt(fan_in)).
CONV_INIT = keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _bn(channels_axis=-1, name=None):
    """torch BatchNorm (eps 1e-5, momentum 0.1) on the given channel axis."""
    if channels_axis == -1:
        return batch_norm(name)
    return keras.layers.BatchNormalization(axis=channels_axis, epsilon=BN_EPS, momentum=0.9,
                                           name=name)


def _conv(filters, kernel, strides=1, use_bias=True, name=None):
    """torch Conv2d with padding kernel // 2; a stride-2 one is "valid" behind an explicit
    ZeroPadding2D (Keras' "same" would pad only below and right)."""
    return keras.layers.Conv2D(filters, kernel, strides=strides, use_bias=use_bias,
                               padding="same" if strides == 1 else "valid",
                               kernel_initializer=CONV_INIT, bias_initializer=CONV_INIT,
                               name=name)


def relative_index(length):
    """The official ``flatten_index``: entry (i, j) of the (length, length) table reads
    ``relative[:, i - j + length - 1]``, flattened row-major."""
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    return (i - j + length - 1).reshape(-1).astype(np.int32)


@keras.saving.register_keras_serializable(package="keras_vit")
class AxialAttention(keras.layers.Layer):
    """Multi-head self-attention along one axis of a (B, H, W, C) map (the official
    ``AxialAttention_dynamic`` when ``positional``, else ``AxialAttention_wopos``).

    ``width=False`` attends along H (each column separately), True along W. ``kernel_size``
    is the length of that axis (the relative table has 2 kernel_size - 1 offsets).
    ``groups`` heads of ``dim / groups`` channels; queries and keys have half of that.
    ``stride`` > 1 average-pools the output (the official ``pooling``). Returns
    (B, H / stride, W / stride, dim). Every tensor is at most 4-D (builtin TFLite).
    """

    def __init__(self, dim, groups=8, kernel_size=56, stride=1, width=False, positional=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim, self.groups, self.kernel_size = int(dim), int(groups), int(kernel_size)
        self.stride, self.width, self.positional = int(stride), bool(width), bool(positional)
        if self.dim % self.groups or (self.dim // self.groups) % 2:
            raise ValueError(f"dim {dim} must be divisible by 2 * groups ({groups}): "
                             "queries and keys take half of each group's channels")
        self.group_dim = self.dim // self.groups
        self.bn_qkv = _bn(name="bn_qkv")
        # qk, qr, kr stacked on the head axis (positional), or qk alone.
        self.bn_similarity = _bn(1, name="bn_similarity")
        self.bn_output = _bn(name="bn_output")

    def build(self, input_shape):
        length = input_shape[2] if self.width else input_shape[1]
        if length is not None and length != self.kernel_size:
            raise ValueError(f"{self.name}: the attended axis has {length} positions, the "
                             f"relative table was made for kernel_size {self.kernel_size}")
        in_dim = input_shape[-1]
        # The official qkv_transform (a 1x1 Conv1d, no bias) as (in, 2 dim); its init.
        self.qkv = self.add_weight(
            name="qkv", shape=(in_dim, 2 * self.dim),
            initializer=keras.initializers.RandomNormal(stddev=math.sqrt(1.0 / in_dim)))
        self.bn_qkv.build((None, None, 2 * self.dim))
        if self.positional:
            self.relative = self.add_weight(
                name="relative", shape=(2 * self.group_dim, 2 * self.kernel_size - 1),
                initializer=keras.initializers.RandomNormal(
                    stddev=math.sqrt(1.0 / self.group_dim)))
            self.gates = {}
            for gate, value in (("f_qr", 0.1), ("f_kr", 0.1), ("f_sve", 0.1), ("f_sv", 1.0)):
                self.gates[gate] = self.add_weight(
                    name=gate, shape=(), initializer=keras.initializers.Constant(value))
            self.bn_similarity.build((None, 3 * self.groups, None, None))
            self.bn_output.build((None, None, 2 * self.dim))
        else:
            self.bn_similarity.build((None, self.groups, None, None))
            self.bn_output.build((None, None, self.dim))

    def _embeddings(self):
        """The relative tables as (channel, query i, key j), split into q, k, v parts."""
        k = self.kernel_size
        table = ops.take(self.relative, relative_index(k), axis=1)
        table = ops.reshape(table, (2 * self.group_dim, k, k))
        half = self.group_dim // 2
        return table[:half], table[half:2 * half], table[2 * half:]

    @staticmethod
    def _per_query(t, emb):
        """out[b, g, i, :] = t[b, g, i, :] @ emb[:, i, :] for t (N, G, L, c), emb (c, L, L'):
        one batched matmul over the query position i. Returns (N, G, L, L')."""
        _, groups, length, channels = t.shape
        t = ops.reshape(ops.transpose(t, (2, 0, 1, 3)), (length, -1, channels))
        out = ops.matmul(t, ops.transpose(emb, (1, 0, 2)))  # (L, N*G, L')
        out = ops.reshape(out, (length, -1, groups, emb.shape[-1]))
        return ops.transpose(out, (1, 2, 0, 3))

    def _merge_heads(self, t):
        """(N, G, L, c) -> (N, L, G * c), channel g * c + c' as the official view."""
        _, groups, length, channels = t.shape
        return ops.reshape(ops.transpose(t, (0, 2, 1, 3)), (-1, length, groups * channels))

    def call(self, x, training=None):
        _, h, w, c = x.shape
        if self.width:
            rows, length = h, w
            x = ops.reshape(x, (-1, w, c))                                   # (B*H, W, C)
        else:
            rows, length = w, h
            x = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, h, c))      # (B*W, H, C)
        qkv = self.bn_qkv(ops.matmul(x, ops.cast(self.qkv, x.dtype)), training=training)
        qkv = ops.reshape(qkv, (-1, length, self.groups, 2 * self.group_dim))
        qkv = ops.transpose(qkv, (0, 2, 1, 3))                   # (N, G, L, 2 group_dim)
        half = self.group_dim // 2
        q, k, v = qkv[..., :half], qkv[..., half:2 * half], qkv[..., 2 * half:]
        qk = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))       # (N, G, L, L)
        if self.positional:
            q_emb, k_emb, v_emb = (ops.cast(e, x.dtype) for e in self._embeddings())
            qr = self._per_query(q, q_emb) * self.gates["f_qr"]
            kr = ops.transpose(self._per_query(k, k_emb), (0, 1, 3, 2)) * self.gates["f_kr"]
            stacked = self.bn_similarity(ops.concatenate([qk, qr, kr], axis=1),
                                         training=training)
            stacked = ops.reshape(stacked, (-1, 3, self.groups, length * length))
            similarity = ops.reshape(ops.sum(stacked, axis=1),
                                     (-1, self.groups, length, length))
        else:
            similarity = self.bn_similarity(qk, training=training)
        similarity = softmax_float32(similarity)
        sv = ops.matmul(similarity, v)                           # (N, G, L, group_dim)
        if self.positional:
            # sve[n, g, i, c] = sum_j similarity[n, g, i, j] v_emb[c, i, j]
            sve = self._per_query(similarity, ops.transpose(v_emb, (2, 1, 0)))
            sv = self._merge_heads(sv * self.gates["f_sv"])
            sve = self._merge_heads(sve * self.gates["f_sve"])
            # Channels interleaved (2 o + {0: sv, 1: sve}) as the official view of the cat.
            out = ops.reshape(ops.stack([sv, sve], axis=-1), (-1, length, 2 * self.dim))
            out = self.bn_output(out, training=training)
            out = ops.sum(ops.reshape(out, (-1, length, self.dim, 2)), axis=-1)
        else:
            out = self.bn_output(self._merge_heads(sv), training=training)
        if self.width:
            out = ops.reshape(out, (-1, h, w, self.dim))
        else:
            out = ops.transpose(ops.reshape(out, (-1, w, h, self.dim)), (0, 2, 1, 3))
        if self.stride > 1:
            out = ops.average_pool(out, self.stride, self.stride, padding="valid")
        return out

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, h // self.stride, w // self.stride, self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "groups": self.groups,
                "kernel_size": self.kernel_size, "stride": self.stride, "width": self.width,
                "positional": self.positional}


@keras.saving.register_keras_serializable(package="keras_vit")
class UnusedConv(keras.layers.Layer):
    """A 1x1 Conv2d (with bias) the official code defines but never calls
    (``AxialBlock_wopos.conv1``, ``adjust_p``): its ``kernel`` (1, 1, in, out) and ``bias``
    (out,) are kept so that the official checkpoints load strictly and the parameter count
    is the official one. Not trainable (they get no gradient); passes its input through."""

    def __init__(self, in_dim, out_dim, **kwargs):
        super().__init__(**kwargs)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.kernel = self.add_weight(name="kernel", shape=(1, 1, self.in_dim, self.out_dim),
                                      initializer="zeros", trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.out_dim,), initializer="zeros",
                                    trainable=False)

    def call(self, x):
        return x

    def get_config(self):
        return {**super().get_config(), "in_dim": self.in_dim, "out_dim": self.out_dim}


@keras.saving.register_keras_serializable(package="keras_vit")
class GridPatches(keras.layers.Layer):
    """The ``grid`` x ``grid`` patches of a (B, H, W, C) map, row by row, by static slices:
    a list of (B, H / grid, W / grid, C) maps, or (``stacked``) one (grid^2 B, ...) batch,
    patch-major (patch k is rows k B ... (k + 1) B - 1)."""

    def __init__(self, grid=4, stacked=True, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.stacked = int(grid), bool(stacked)

    def build(self, input_shape):
        if input_shape[1] % self.grid or input_shape[2] % self.grid:
            raise ValueError(f"{self.name}: a {input_shape[1]} x {input_shape[2]} map does not "
                             f"split into {self.grid} x {self.grid} patches")

    def call(self, x):
        _, h, w, _ = x.shape
        ph, pw = h // self.grid, w // self.grid
        patches = [x[:, ph * i:ph * (i + 1), pw * j:pw * (j + 1), :]
                   for i in range(self.grid) for j in range(self.grid)]
        return ops.concatenate(patches, axis=0) if self.stacked else patches

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        shape = (b, h // self.grid, w // self.grid, c)
        if self.stacked:
            return (None if b is None else b * self.grid ** 2,) + shape[1:]
        return [shape] * self.grid ** 2

    def get_config(self):
        return {**super().get_config(), "grid": self.grid, "stacked": self.stacked}


@keras.saving.register_keras_serializable(package="keras_vit")
class TilePatches(keras.layers.Layer):
    """The inverse of ``GridPatches``: patches (a list, or one stacked batch) tiled back into
    a (B, grid h, grid w, C) map. 4-D throughout."""

    def __init__(self, grid=4, stacked=True, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.stacked = int(grid), bool(stacked)

    def call(self, patches):
        if self.stacked:
            _, h, w, c = patches.shape
            flat = ops.reshape(patches, (self.grid ** 2, -1, h * w, c))
            patches = [ops.reshape(flat[k], (-1, h, w, c)) for k in range(self.grid ** 2)]
        g = self.grid
        rows = [ops.concatenate(patches[g * i:g * (i + 1)], axis=2) for i in range(g)]
        return ops.concatenate(rows, axis=1)

    def compute_output_shape(self, input_shape):
        if self.stacked:
            n, h, w, c = input_shape
            return (None if n is None else n // self.grid ** 2, h * self.grid, w * self.grid, c)
        b, h, w, c = input_shape[0]
        return (b, h * self.grid, w * self.grid, c)

    def get_config(self):
        return {**super().get_config(), "grid": self.grid, "stacked": self.stacked}


class AxialBlock:
    """The layers of the official AxialBlock_dynamic (``positional``) or AxialBlock_wopos,
    built once and called on (B, H, W, C) maps (MedT's patches share them).
    ``kernel_sizes`` = (H, W) the attention sees (before the width block's pooling)."""

    def __init__(self, in_dim, planes, *, stride=1, kernel_sizes, groups, positional, name):
        out_dim = planes * EXPANSION
        # AxialBlock_wopos' conv1 = nn.Conv2d(width, width, 1) is defined, never called.
        self.unused_conv1 = None if positional else UnusedConv(planes, planes,
                                                               name=f"{name}.conv1")
        self.conv_down = _conv(planes, 1, use_bias=False, name=f"{name}.conv_down")
        self.bn1 = batch_norm(f"{name}.bn1")
        self.hight_block = AxialAttention(planes, groups, kernel_sizes[0], positional=positional,
                                          name=f"{name}.hight_block")
        self.width_block = AxialAttention(planes, groups, kernel_sizes[1], stride=stride,
                                          width=True, positional=positional,
                                          name=f"{name}.width_block")
        self.conv_up = _conv(out_dim, 1, use_bias=False, name=f"{name}.conv_up")
        self.bn2 = batch_norm(f"{name}.bn2")
        self.downsample = None
        if stride != 1 or in_dim != out_dim:
            self.downsample = (_conv(out_dim, 1, strides=stride, use_bias=False,
                                     name=f"{name}.downsample.0"),
                               batch_norm(f"{name}.downsample.1"))
        self.relu = keras.layers.ReLU(name=f"{name}.relu")
        self.add = keras.layers.Add(name=f"{name}.add")

    def __call__(self, x):
        shortcut = x
        if self.unused_conv1 is not None:
            x = self.unused_conv1(x)
        out = self.relu(self.bn1(self.conv_down(x)))
        out = self.relu(self.width_block(self.hight_block(out)))
        out = self.bn2(self.conv_up(out))
        if self.downsample is not None:
            shortcut = self.downsample[1](self.downsample[0](shortcut))
        return self.relu(self.add([out, shortcut]))


def axial_stages(in_dim, depths, widths, groups, size, positional, suffix, num_stages=4):
    """The official ``layer1`` ... ``layer<num_stages>`` (``_make_layer``: the first block of a
    stage strides, its tables at the stage's input size; the others attend at the strided
    size) for a stem map of ``size`` / 2. Returns the stages as lists of blocks."""
    h, w = size
    kernel_sizes = (h // 2, w // 2)
    stages = []
    for i in range(num_stages):
        stride = 1 if i == 0 else 2
        planes = widths["planes"][i]
        blocks = []
        for j in range(depths[i]):
            blocks.append(AxialBlock(in_dim, planes, stride=stride if j == 0 else 1,
                                     kernel_sizes=kernel_sizes, groups=groups,
                                     positional=positional, name=f"layer{i + 1}{suffix}.{j}"))
            in_dim = planes * EXPANSION
            if j == 0:
                kernel_sizes = (kernel_sizes[0] // stride, kernel_sizes[1] // stride)
        stages.append(blocks)
    return stages


def run_stages(x, stages):
    """Each stage's output map."""
    outs = []
    for blocks in stages:
        for block in blocks:
            x = block(x)
        outs.append(x)
    return outs


class _Branch:
    """The layers of one encoder-decoder (the global one, or MedT's local ``*_p`` one) built
    once and called on any number of inputs (MedT's 16 patches share them)."""

    def __init__(self, suffix, widths, decoders, stem_dim):
        s = suffix
        self.pad1 = keras.layers.ZeroPadding2D(3, name=f"conv1{s}.pad")
        self.conv1 = _conv(stem_dim, 7, strides=2, use_bias=False, name=f"conv1{s}")
        self.conv2 = _conv(STEM_WIDTH, 3, use_bias=False, name=f"conv2{s}")
        self.conv3 = _conv(stem_dim, 3, use_bias=False, name=f"conv3{s}")
        self.bns = [batch_norm(f"bn{i}{s}") for i in (1, 2, 3)]
        self.relu = keras.layers.ReLU(name=f"relu{s}")
        self.up = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"up{s}")
        # decoder<i> for i in ``decoders``; decoder1 is the stride-2 one.
        self.decoder1_pad = keras.layers.ZeroPadding2D(1, name=f"decoder1{s}.pad")
        self.decoders = {i: _conv(widths["decoder"][i - 1], 3, strides=2 if i == 1 else 1,
                                  name=f"decoder{i}{s}") for i in decoders}

    def stem(self, x):
        x = self.relu(self.bns[0](self.conv1(self.pad1(x))))
        x = self.relu(self.bns[1](self.conv2(x)))
        return self.relu(self.bns[2](self.conv3(x)))

    def decode(self, i, x):
        """relu(upsample(decoder_i(x))), decoder1 being the stride-2 one."""
        if i == 1:
            x = self.decoder1_pad(x)
        return self.relu(self.up(self.decoders[i](x)))


def _widths(width_scale):
    s = float(width_scale)
    return dict(stem=int(64 * s), planes=[int(128 * s), int(256 * s), int(512 * s),
                                          int(1024 * s)],
                decoder=[int(1024 * 2 * s), int(1024 * s), int(512 * s), int(256 * s),
                         int(128 * s)])


def _check_args(img_size, divisor, what, in_chans, num_classes, width_scale, groups, depths):
    h, w = check_img_size(img_size, divisor, what=what)
    check_in_chans(in_chans)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    depths = tuple(int(d) for d in depths)
    if len(depths) != 4 or min(depths) < 1:
        raise ValueError(f"depths must be 4 positive ints (the official layers), got {depths}")
    widths = _widths(width_scale)
    if widths["stem"] < 1 or any(p % (2 * groups) for p in widths["planes"]):
        raise ValueError(f"width_scale {width_scale} gives stage widths {widths['planes']}, "
                         f"which must be positive multiples of 2 * groups ({2 * groups})")
    return h, w, depths, widths


def _full_decoder(branch, stages):
    """The official four-stage decoder: decoder1 (stride 2) back to layer4's size + layer4,
    then decoder2 ... decoder4 each + the skip, decoder5 to the input resolution."""
    x1, x2, x3, x4 = stages
    x = keras.layers.Add()([branch.decode(1, x4), x4])
    x = keras.layers.Add()([branch.decode(2, x), x3])
    x = keras.layers.Add()([branch.decode(3, x), x2])
    x = keras.layers.Add()([branch.decode(4, x), x1])
    return branch.decode(5, x)


def gated_axial_unet(*, img_size=128, in_chans=3, num_classes=2, width_scale=0.125, groups=8,
                     depths=(1, 2, 4, 1), name="gated_axial_unet"):
    """The gated axial-attention U-Net (the official ``gated``: ``ResAxialAttentionUNet`` of
    ``AxialBlock_dynamic``). ``width_scale`` is the official ``s``, ``depths`` its
    ``layers``. The sides of ``img_size`` are multiples of 32 (four stride-2 steps and the
    stride-2 ``decoder1``). Returns logits (B, H, W, num_classes)."""
    h, w, depths, widths = _check_args(img_size, 32, "the gated axial U-Net's size divisor",
                                       in_chans, num_classes, width_scale, groups, depths)
    inputs = keras.Input((h, w, in_chans))
    branch = _Branch("", widths, (1, 2, 3, 4, 5), widths["stem"])
    stages = axial_stages(widths["stem"], depths, widths, groups, (h, w), True, "")
    x = _full_decoder(branch, run_stages(branch.stem(inputs), stages))
    x = _conv(num_classes, 1, name="adjust")(branch.relu(x))
    return keras.Model(inputs, x, name=name)


def medt(*, img_size=128, in_chans=3, num_classes=2, width_scale=0.125, groups=8,
         depths=(1, 2, 4, 1), per_patch=False, name="medt"):
    """MedT (the official ``MedT``: ``medt_net`` with ``AxialBlock_dynamic`` globally and
    ``AxialBlock_wopos`` on the patches). ``width_scale`` is the official ``s``, ``depths``
    its ``layers`` (the global branch uses the first two stages). The sides of ``img_size``
    are multiples of 128 (4 patches a side, each through the full five-step decoder).

    ``per_patch=False`` runs the 16 patches through the local branch as one batch of 16 B:
    the same outputs in inference, a sixteenth of the graph (faster to trace, run and
    export). In training its BatchNorms then normalise with the statistics of all patches
    together; ``per_patch=True`` calls the branch once per patch as the official loop does
    (each patch normalised with its own batch statistics, the running averages updated once
    per patch). Returns logits (B, H, W, num_classes)."""
    h, w, depths, widths = _check_args(img_size, 128, "MedT's size divisor (4 patches x 32)",
                                       in_chans, num_classes, width_scale, groups, depths)
    inputs = keras.Input((h, w, in_chans))
    # Global branch: layer1, layer2 and decoder4/5 on the whole image.
    glob = _Branch("", widths, (4, 5), widths["stem"])
    stages = axial_stages(widths["stem"], depths, widths, groups, (h, w), True, "",
                          num_stages=2)
    x1, x2 = run_stages(glob.stem(inputs), stages)
    x = keras.layers.Add(name="global_skip")([glob.decode(4, x2), x1])
    x = glob.decode(5, x)
    # Local branch: the same layers on each of the 4 x 4 patches, tiled back.
    ph, pw = h // 4, w // 4
    # The official builds the local stem after the global stages, from its running
    # ``inplanes``: the local stem is as wide as layer2's output, not the global stem.
    local_dim = widths["planes"][1] * EXPANSION
    local = _Branch("_p", widths, (1, 2, 3, 4, 5), local_dim)
    local_stages = axial_stages(local_dim, depths, widths, groups, (ph, pw), False, "_p")
    def local_branch(patch):
        return _full_decoder(local, run_stages(local.stem(patch), local_stages))

    patches = GridPatches(4, stacked=not per_patch, name="local_patches")(inputs)
    if per_patch:  # the official loop: one call per patch
        x_local = [local_branch(patch) for patch in patches]
    else:  # the 16 patches as one batch
        x_local = local_branch(patches)
    x_local = TilePatches(4, stacked=not per_patch, name="local_tiles")(x_local)
    x = keras.layers.Add(name="global_local")([x, x_local])
    x = glob.relu(_conv(widths["decoder"][4], 3, name="decoderf")(x))
    x = UnusedConv(widths["decoder"][4], num_classes, name="adjust_p")(x)
    x = _conv(num_classes, 1, name="adjust")(glob.relu(x))
    return keras.Model(inputs, x, name=name)


_CFG = dict(task="segmentation", input_size=128, num_classes=2, mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0), interpolation="bilinear", crop_pct=1.0)

register_variant("gated_axial_unet", gated_axial_unet, __name__, _CFG, img_size=128,
                 num_classes=2, width_scale=0.125, groups=8, depths=(1, 2, 4, 1))
register_variant("medt", medt, __name__, _CFG, img_size=128, num_classes=2, width_scale=0.125,
                 groups=8, depths=(1, 2, 4, 1))
