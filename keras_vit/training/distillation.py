"""Distillation: a student learns the labels and a frozen teacher.

Output distillation, DeiT (Touvron et al. 2021):

hard: L = 1/2 CE(student_cls, y) + 1/2 CE(student_dist, argmax teacher)
soft: L = (1 - alpha) CE(student_cls, y) + alpha tau^2 KL(softmax(teacher/tau) || softmax(student_dist/tau))

Distilled students (DeiT/PiT ``distilled_training=True``) give the distillation head's logits
separately; other students use their one head for both terms.

Relation distillation, for ViT-style student and teacher (keras_vit TransformerBlocks of
global multi-head self-attention over one token sequence; width and head count may differ):

minilm (MiniLM, Wang et al. 2020, in MiniLMv2's multi-head relation form, Wang et al. 2021):
    the last block's queries, keys and values of each network, heads concatenated
    (B, N, C), are split into R relation heads of width d_r = C / R (C and d_r per network).
    Relations, per relation head r: the attention distribution
    A_r = softmax(Q_r K_r^T / sqrt(d_r)) and the value relation VR_r = softmax(V_r V_r^T /
    sqrt(d_r)), each row a distribution over the N tokens. With R the student's head count
    (the default), the student's A_r are its attention probabilities.
        L_AT = 1/(B R N) sum_b sum_r sum_t KL(A^T_{b,r,t} || A^S_{b,r,t})
        L_VR = the same with VR
        L = L_base + relation_weight (L_AT + L_VR)
    KL(teacher || student), averaged over relation heads and tokens (|x|), as the papers'
    formulas; MiniLM weights L_AT and L_VR equally (1, 1: ``minilm_weights``).
    MiniLM distils the teacher's last block into the student's last (``minilm_blocks``
    = (-1, -1)); MiniLMv2 notes an upper-middle teacher block may do better for deep teachers.

manifold (Hao, Guo, Jia et al., "Learning Efficient Vision Transformers via Fine-Grained
Manifold Distillation", NeurIPS 2022, arXiv 2107.01378; the authors' code,
huawei-noah/Efficient-Computing Distillation/ManifoldKD, whose normalisation and defaults
are followed): for each chosen (student block, teacher block) pair, the block outputs' patch
tokens (prefix tokens dropped) F (B, N, D), each token L2-normalised over D, give
    intra-image  M = F_b F_b^T          (B maps of N x N)
    inter-image  M = F_n F_n^T          (N maps of B x B, F_n: patch n of every image)
    random       M = F_K F_K^T          (K x K over K patches drawn from all B N, the same
                                         for student and teacher; K = 192)
    L_x = mean of (M^S - M^T)^2 over the entries (the squared Frobenius norm divided by
          the number of entries, as the reference code's ``.mean()``)
    L_mf = mean over block pairs of (4 L_intra + 0.1 L_inter + 0.2 L_random)
    L = L_base + relation_weight L_mf       (relation_weight = beta = 1)
    The reference run (DeiT-Tiny from CaiT-S24) pairs the first four and last four blocks;
    here by default the first and last min(4, depth_S // 2, depth_T // 2) blocks of each.

L_base, for both: CE(student, y) (with --label_smoothing); a distilled (two-head) student
trains its distillation head as DeiT's hard mode does: 1/2 CE(cls, y) + 1/2 CE(dist,
argmax teacher). The networks each run once per step: sub-models sharing their weights give
[logits, block inputs/outputs] together.
"""

import math

import keras
from keras import ops

from keras_vit.layers.attention import merge_heads, split_heads
from keras_vit.models.introspect import block_qkv, global_attention_blocks, prefix_tokens

MODES = ("hard", "soft", "minilm", "manifold")
RELATION_MODES = ("minilm", "manifold")


# -- the relation losses, on given tensors ---------------------------------------------------

def relation_logits(a, b, heads):
    """(B, N, C), (B, N, C) -> (B, R, N, N): a_r b_r^T / sqrt(C / R) per relation head r
    (the C channels split into R consecutive groups, as the heads of a layer are)."""
    a, b = split_heads(a, heads), split_heads(b, heads)
    return ops.matmul(a, ops.transpose(b, (0, 1, 3, 2))) / math.sqrt(a.shape[-1])


def relation_kl(student_logits, teacher_logits):
    """Mean over every leading index (batch, relation head, token) of
    KL(softmax(teacher) || softmax(student)) along the last axis."""
    log_t = ops.log_softmax(teacher_logits, axis=-1)
    log_s = ops.log_softmax(student_logits, axis=-1)
    return ops.mean(ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1))


def minilm_loss(student_qkv, teacher_qkv, relation_heads, weights=(1.0, 1.0)):
    """weights[0] L_AT + weights[1] L_VR (module docstring) from the (q, k, v) of the student
    and of the teacher, each (B, N, C) with the heads concatenated (C may differ between
    them; R must divide both)."""
    (qs, ks, vs), (qt, kt, vt) = student_qkv, teacher_qkv
    at = relation_kl(relation_logits(qs, ks, relation_heads),
                     relation_logits(qt, kt, relation_heads))
    vr = relation_kl(relation_logits(vs, vs, relation_heads),
                     relation_logits(vt, vt, relation_heads))
    return weights[0] * at + weights[1] * vr


def _l2_normalize(x):
    """x / max(||x||, 1e-12) over the last axis (torch's F.normalize)."""
    norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
    return x / ops.maximum(norm, 1e-12)


def _gram(f):
    return ops.matmul(f, ops.transpose(f, (0, 2, 1)))


def random_patch_sample(total, num_samples, seed, step=0):
    """``min(num_samples, total)`` distinct indices in [0, total), a fixed function of
    (seed, step): the same patches for student and teacher, new ones each training step, and
    the same again when a run resumes at that step."""
    import tensorflow as tf

    seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    scores = tf.random.stateless_uniform(tf.reshape(total, (1,)), seed=seed)
    k = (min(num_samples, total) if isinstance(total, int)
         else tf.minimum(num_samples, total))
    return tf.math.top_k(scores, k=k).indices


def manifold_loss(student_features, teacher_features, weights=(4.0, 0.1, 0.2),
                  num_samples=192, sample=None, seed=0, step=0):
    """w_intra L_intra + w_inter L_inter + w_random L_random (module docstring) of one block
    pair's patch tokens, student (B, N, D_S) and teacher (B, N, D_T). ``sample``: the indices
    (into the B N patches) of the random relation; default ``random_patch_sample``."""
    fs, ft = _l2_normalize(student_features), _l2_normalize(teacher_features)

    def mse(ms, mt):
        return ops.mean(ops.square(ms - mt))

    intra = mse(_gram(fs), _gram(ft))
    inter = mse(_gram(ops.transpose(fs, (1, 0, 2))), _gram(ops.transpose(ft, (1, 0, 2))))
    flat_s = ops.reshape(fs, (-1, fs.shape[-1]))
    flat_t = ops.reshape(ft, (-1, ft.shape[-1]))
    if sample is None:
        b, n = fs.shape[0], fs.shape[1]
        total = b * n if b is not None and n is not None else ops.shape(flat_s)[0]
        sample = random_patch_sample(total, num_samples, seed, step)
    rs, rt = ops.take(flat_s, sample, axis=0)[None], ops.take(flat_t, sample, axis=0)[None]
    rand = mse(_gram(rs), _gram(rt))
    return weights[0] * intra + weights[1] * inter + weights[2] * rand


def default_manifold_blocks(student_depth, teacher_depth):
    """(student block, teacher block) pairs: the first and the last n of each network,
    n = min(4, depths // 2) (the reference pairs DeiT-Tiny's 0-3, 8-11 with CaiT-S24's 0-3,
    20-23); the last blocks alone for a one-block network."""
    n = min(4, student_depth // 2, teacher_depth // 2)
    if n == 0:
        return ((student_depth - 1, teacher_depth - 1),)
    return (tuple((i, i) for i in range(n))
            + tuple((student_depth - n + i, teacher_depth - n + i) for i in range(n)))


# -- getting the intermediate quantities -------------------------------------------------------

class _Probe:
    """One network's sub-model [its outputs..., the chosen blocks' inputs (minilm) or outputs
    (manifold)], sharing its weights. A plain object, so that Keras does not track the
    sub-model (the checkpoint keeps the student's and teacher's own weight paths)."""

    def __init__(self, model, role, mode):
        self.model, self.role = model, role
        self.blocks = global_attention_blocks(model)
        if not self.blocks:
            kind = "e.g. ViT, DeiT, DeiT distilled" + (
                "; a SavedModel directory exposes none: give a .keras file or a registered name"
                if role == "teacher" else "")
            raise ValueError(
                f"--distillation={mode} needs a ViT-style {role}: blocks of global multi-head "
                "self-attention over one token sequence (keras_vit TransformerBlocks, all "
                f"seeing the same tokens; {kind}); the {role} {model.name!r} has none "
                "(windowed, hierarchical or convolutional models do not qualify)")
        self.num_tokens = self.blocks[0].input.shape[1]
        self.num_prefix = prefix_tokens(model, self.num_tokens)[0]
        self.num_patches = self.num_tokens - self.num_prefix
        self.num_outputs = len(model.outputs)

    def block_index(self, i, what):
        depth = len(self.blocks)
        if not -depth <= i < depth:
            raise ValueError(f"{what}: the {self.role} has {depth} blocks, got block {i}")
        return i % depth

    def build(self, tensors):
        self.features = keras.Model(self.model.input, list(self.model.outputs) + tensors,
                                    name=f"{self.model.name}_{self.role}_probe")

    def __call__(self, x, training):
        out = self.features(x, training=training)
        return list(out[:self.num_outputs]), list(out[self.num_outputs:])


def _keep_tokens(x, num_prefix, keep_prefix):
    """(B, N, C) without the prefix tokens past the first ``keep_prefix``."""
    if num_prefix == keep_prefix:
        return x
    return ops.concatenate([x[:, :keep_prefix], x[:, num_prefix:]], axis=1)


class DistillationModel(keras.Model):
    """Wraps a student and a frozen teacher; ``fit`` trains the student with the loss of
    ``mode`` (module docstring).

    hard / soft: ``alpha``, ``tau`` (DeiT). minilm / manifold: ``relation_weight`` (the
    relation loss's weight next to the base cross-entropy, 1: MiniLM adds L_AT and L_VR
    unweighted, manifold's beta is 1);
    minilm: ``relation_heads`` R (None: the student block's head count; must divide both
    networks' attention widths), ``minilm_blocks`` (student block, teacher block),
    ``minilm_weights`` (L_AT, L_VR); manifold: ``manifold_blocks`` ((student, teacher), ...)
    (None: ``default_manifold_blocks``), ``manifold_weights`` (intra, inter, random),
    ``manifold_samples`` K, ``seed`` of the random patch sample. The relation modes check
    before training that both networks are ViT-style with the same number of patch tokens
    (a ValueError otherwise); in them ``call`` returns ``{"logits": the student's outputs,
    "features": its block tensors}`` (the deployable model is ``student``).
    """

    def __init__(self, student, teacher, mode="hard", alpha=0.5, tau=1.0, label_smoothing=0.0,
                 relation_weight=1.0, relation_heads=None, minilm_blocks=(-1, -1),
                 minilm_weights=(1.0, 1.0), manifold_blocks=None,
                 manifold_weights=(4.0, 0.1, 0.2), manifold_samples=192, seed=0, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"distillation must be one of {', '.join(MODES)}, got {mode!r}")
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.mode, self.alpha, self.tau = mode, float(alpha), float(tau)
        self.label_smoothing = float(label_smoothing)
        self.relation_weight = float(relation_weight)
        self.minilm_weights = tuple(float(w) for w in minilm_weights)
        self.manifold_weights = tuple(float(w) for w in manifold_weights)
        self.manifold_samples, self.seed = int(manifold_samples), int(seed)
        if mode in RELATION_MODES:
            self._setup_relations(relation_heads, minilm_blocks, manifold_blocks)

    def _setup_relations(self, relation_heads, minilm_blocks, manifold_blocks):
        s = _Probe(self.student, "student", self.mode)
        t = _Probe(self.teacher, "teacher", self.mode)
        if s.num_patches != t.num_patches:
            raise ValueError(f"{self.mode} distillation needs the same number of patch tokens: "
                             f"student {s.num_patches}, teacher {t.num_patches} (use the same "
                             "image size and patch grid)")
        if self.mode == "minilm":
            si = s.block_index(minilm_blocks[0], "minilm_blocks")
            ti = t.block_index(minilm_blocks[1], "minilm_blocks")
            widths = (s.blocks[si].attn.inner_dim, t.blocks[ti].attn.inner_dim)
            heads = int(relation_heads or s.blocks[si].attn.num_heads)
            if heads < 1 or widths[0] % heads or widths[1] % heads:
                valid = [r for r in range(1, min(widths) + 1)
                         if widths[0] % r == 0 and widths[1] % r == 0]
                raise ValueError(f"relation_heads {heads} must divide the attention widths of "
                                 f"the student ({widths[0]}) and the teacher ({widths[1]}); "
                                 f"valid: {valid}")
            self.relation_heads, self.minilm_blocks = heads, (si, ti)
            s.build([s.blocks[si].input])
            t.build([t.blocks[ti].input])
        else:
            pairs = manifold_blocks or default_manifold_blocks(len(s.blocks), len(t.blocks))
            pairs = tuple((s.block_index(i, "manifold_blocks"),
                           t.block_index(j, "manifold_blocks")) for i, j in pairs)
            if not pairs:
                raise ValueError("manifold_blocks: give at least one (student, teacher) pair")
            self.manifold_blocks = pairs
            s.build([s.blocks[i].output for i, _ in pairs])
            t.build([t.blocks[j].output for _, j in pairs])
        # Plain attributes hold no Keras state: the probes' sub-models stay untracked.
        object.__setattr__(self, "_probes", (s, t))

    def call(self, x, training=False):
        if self.mode not in RELATION_MODES:
            return self.student(x, training=training)
        outputs, features = self._probes[0](x, training=training)
        return {"logits": outputs if len(outputs) > 1 else outputs[0], "features": features}

    def _ce(self, labels, logits):
        num_classes = logits.shape[-1]
        if len(labels.shape) == 1 or labels.shape[-1] != num_classes:
            labels = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), num_classes)
        if self.label_smoothing:
            labels = labels * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        return ops.mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))

    def _hard(self, y, cls_logits, dist_logits, teacher_logits):
        teacher_labels = ops.one_hot(ops.argmax(teacher_logits, axis=-1), dist_logits.shape[-1])
        return 0.5 * self._ce(y, cls_logits) + 0.5 * ops.mean(
            keras.losses.categorical_crossentropy(teacher_labels, dist_logits, from_logits=True))

    def _step(self):
        optimizer = getattr(self, "optimizer", None)
        return optimizer.iterations if optimizer is not None else 0

    def relation_loss(self, student_features, teacher_features):
        """The minilm / manifold term (before ``relation_weight``) from the probes' tensors."""
        s, t = self._probes
        f32 = [ops.cast(f, "float32") for f in student_features]
        t32 = [ops.stop_gradient(ops.cast(f, "float32")) for f in teacher_features]
        if self.mode == "minilm":
            keep = min(s.num_prefix, t.num_prefix)  # relations over the tokens both have

            def qkv(probe, index, x):
                return [_keep_tokens(ops.cast(merge_heads(u), "float32"), probe.num_prefix, keep)
                        for u in block_qkv(probe.blocks[index], x)]

            student_qkv = qkv(s, self.minilm_blocks[0], student_features[0])
            teacher_qkv = [ops.stop_gradient(u)
                           for u in qkv(t, self.minilm_blocks[1], teacher_features[0])]
            return minilm_loss(student_qkv, teacher_qkv, self.relation_heads,
                               self.minilm_weights)
        step = self._step()
        losses = [manifold_loss(fs[:, s.num_prefix:], ft[:, t.num_prefix:],
                                self.manifold_weights, self.manifold_samples,
                                seed=self.seed * 1000 + k, step=step)
                  for k, (fs, ft) in enumerate(zip(f32, t32))]
        return sum(losses) / len(losses)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.mode in RELATION_MODES:
            return self._relation_compute_loss(x, y, y_pred)
        cls_logits, dist_logits = (y_pred if isinstance(y_pred, (list, tuple))
                                   else (y_pred, y_pred))
        cls_logits = ops.cast(cls_logits, "float32")
        dist_logits = ops.cast(dist_logits, "float32")
        teacher_logits = ops.stop_gradient(ops.cast(self.teacher(x, training=False), "float32"))
        if self.mode == "hard":
            return self._hard(y, cls_logits, dist_logits, teacher_logits)
        base = self._ce(y, cls_logits)
        t = ops.softmax(teacher_logits / self.tau, axis=-1)
        log_s = ops.log_softmax(dist_logits / self.tau, axis=-1)
        kl = ops.sum(t * (ops.log(ops.maximum(t, 1e-12)) - log_s), axis=-1)
        return (1 - self.alpha) * base + self.alpha * self.tau ** 2 * ops.mean(kl)

    def loss_terms(self, x, y, y_pred=None):
        """{"base": L_base, "relation": the minilm / manifold term before
        ``relation_weight``} of a relation mode; ``y_pred`` default: ``self(x)`` (eval mode)."""
        if self.mode not in RELATION_MODES:
            raise ValueError(f"loss_terms is for the relation modes, not {self.mode!r}")
        if not isinstance(y_pred, dict):  # the student's outputs alone: run the probe
            y_pred = self(x, training=False)
        logits, student_features = y_pred["logits"], y_pred["features"]
        logits = [ops.cast(v, "float32")
                  for v in (logits if isinstance(logits, (list, tuple)) else [logits])]
        teacher_logits, teacher_features = self._probes[1](x, training=False)
        teacher_logits = ops.stop_gradient(ops.cast(
            teacher_logits[0] if len(teacher_logits) == 1
            else sum(teacher_logits) / len(teacher_logits), "float32"))
        if len(logits) == 2:  # a distilled student's second head learns as DeiT's hard mode
            base = self._hard(y, logits[0], logits[1], teacher_logits)
        else:
            base = self._ce(y, logits[0])
        return {"base": base, "relation": self.relation_loss(student_features, teacher_features)}

    def _relation_compute_loss(self, x, y, y_pred):
        terms = self.loss_terms(x, y, y_pred)
        return terms["base"] + self.relation_weight * terms["relation"]
