"""Relation distillation (keras_vit/training/distillation.py): MiniLM's attention and value
relations and the manifold distillation's patch relations, each against its formula written
out loop by loop in numpy, zero for a student that is its teacher, a training step that
lowers the loss with the teacher frozen, and the trainer's --distillation=minilm|manifold."""

import types

import keras
import numpy as np
import pytest
from keras import ops

import keras_vit
from keras_vit.training.distillation import (DistillationModel, manifold_loss, minilm_loss,
                                             random_patch_sample, relation_logits)

# A 2-head, 32-wide student and a 3-head, 48-wide, deeper teacher on the same 4x4 patch grid.
STUDENT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
TEACHER = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
# float32 against float64: the logits are O(1) and each loss a mean of O(1) terms, so float32
# rounding (~1e-7 relative per op, a few dozen ops deep) stays well under 1e-5.
RTOL = 1e-5


def models(seed=0):
    keras.utils.set_random_seed(seed)
    student = keras_vit.create_model("deit_tiny_patch16_224", **STUDENT)
    teacher = keras_vit.create_model("deit_tiny_patch16_224", **TEACHER)
    return student, teacher


def images(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype("float32")


def softmax(z):
    e = np.exp(z - max(z))
    return e / sum(e)


def numpy_minilm(student_qkv, teacher_qkv, heads):
    """MiniLM(v2): per example b, relation head r and token t, KL(teacher row || student row)
    of softmax(a_r . b_r / sqrt(d_r)) for (a, b) = (q, k) and (v, v); summed, divided by
    B R N; L_AT + L_VR."""
    total = 0.0
    for (sa, sb), (ta, tb) in [((student_qkv[0], student_qkv[1]), (teacher_qkv[0], teacher_qkv[1])),
                               ((student_qkv[2], student_qkv[2]), (teacher_qkv[2], teacher_qkv[2]))]:
        batch, n, _ = sa.shape
        ds, dt = sa.shape[-1] // heads, ta.shape[-1] // heads
        kl = 0.0
        for b in range(batch):
            for r in range(heads):
                s_cols, t_cols = slice(r * ds, (r + 1) * ds), slice(r * dt, (r + 1) * dt)
                for t in range(n):
                    p_s = softmax([sa[b, t, s_cols] @ sb[b, j, s_cols] / np.sqrt(ds)
                                   for j in range(n)])
                    p_t = softmax([ta[b, t, t_cols] @ tb[b, j, t_cols] / np.sqrt(dt)
                                   for j in range(n)])
                    kl += sum(p_t[j] * np.log(p_t[j] / p_s[j]) for j in range(n))
        total += kl / (batch * heads * n)
    return total


def numpy_manifold(fs, ft, sample, weights):
    """Hao et al.: cosine similarities of patch pairs; mean squared student - teacher
    difference within each image (N x N), across images per patch (B x B) and among the
    sampled patches (K x K); weighted sum."""
    def cos(u, v):
        return (u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))

    batch, n, _ = fs.shape
    intra = np.mean([(cos(fs[b, i], fs[b, j]) - cos(ft[b, i], ft[b, j])) ** 2
                     for b in range(batch) for i in range(n) for j in range(n)])
    inter = np.mean([(cos(fs[a, p], fs[c, p]) - cos(ft[a, p], ft[c, p])) ** 2
                     for p in range(n) for a in range(batch) for c in range(batch)])
    flat_s, flat_t = fs.reshape(batch * n, -1), ft.reshape(batch * n, -1)
    rand = np.mean([(cos(flat_s[i], flat_s[j]) - cos(flat_t[i], flat_t[j])) ** 2
                    for i in sample for j in sample])
    return weights[0] * intra + weights[1] * inter + weights[2] * rand


def test_minilm_loss_is_its_formula():
    rng = np.random.default_rng(1)
    student = [rng.standard_normal((2, 5, 8)) for _ in range(3)]   # 2 heads of 4 ...
    teacher = [rng.standard_normal((2, 5, 12)) for _ in range(3)]  # ... against 2 of 6
    got = minilm_loss([s.astype("float32") for s in student],
                      [t.astype("float32") for t in teacher], relation_heads=2)
    np.testing.assert_allclose(float(got), numpy_minilm(student, teacher, 2), rtol=RTOL)


def test_manifold_loss_is_its_formula():
    rng = np.random.default_rng(2)
    fs, ft = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 4, 12))
    sample = np.array([7, 0, 11, 3, 5])
    weights = (4.0, 0.1, 0.2)
    got = manifold_loss(fs.astype("float32"), ft.astype("float32"), weights, sample=sample)
    np.testing.assert_allclose(float(got), numpy_manifold(fs, ft, sample, weights), rtol=RTOL)
    # K >= B N: every patch, in some order (the relations' mean does not depend on it)
    every = manifold_loss(fs.astype("float32"), ft.astype("float32"), weights, num_samples=192)
    np.testing.assert_allclose(float(every), numpy_manifold(fs, ft, range(12), weights),
                               rtol=RTOL)


def test_random_patch_sample_is_distinct_and_a_function_of_seed_and_step():
    a = np.asarray(random_patch_sample(50, 20, seed=3, step=7))
    assert len(set(a.tolist())) == 20 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, random_patch_sample(50, 20, seed=3, step=7))
    assert not np.array_equal(a, random_patch_sample(50, 20, seed=3, step=8))


def test_relations_read_the_blocks_own_attention():
    """With R = the student's heads, its attention relation is the attention its last block
    computes (the probe reads the block's input and the block's own weights)."""
    from keras_vit.models.introspect import block_attention

    student, teacher = models()
    model = DistillationModel(student, teacher, "minilm")
    x = images(2)
    block_input = model(x)["features"][0]
    block = model._probes[0].blocks[-1]
    h = block.norm1(block_input)
    q, k = ops.split(block.attn.qkv(h), 3, axis=-1)[:2]
    relation = ops.softmax(relation_logits(q, k, 2), axis=-1)
    # the same softmax of the same q k^T, scaled as sqrt(d) vs the layer's d ** -0.5: rounding
    np.testing.assert_allclose(np.asarray(relation), np.asarray(block_attention(block, block_input)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["minilm", "manifold"])
def test_zero_for_the_teacher_itself_positive_otherwise(mode):
    student, teacher = models()
    twin = keras.models.clone_model(student)
    twin.set_weights(student.get_weights())
    x, y = images(4), np.arange(4) % 5
    same = DistillationModel(student, twin, mode).loss_terms(x, y)["relation"]
    other = DistillationModel(student, teacher, mode).loss_terms(x, y)["relation"]
    # Freshly initialised networks attend almost uniformly: the KL between them is small
    # (~4e-4), still 1000 times float32's noise; for the twin every relation is bit-identical.
    assert float(same) == 0 and float(other) > 1e-5, (float(same), float(other))


@pytest.mark.parametrize("mode", ["minilm", "manifold"])
def test_a_training_step_lowers_the_loss_and_leaves_the_teacher(mode):
    """One AdamW step through fit, eagerly (the compiled step: the trainer test's run); the
    loss measured before and after on the batch."""
    student, teacher = models()
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    model = DistillationModel(student, teacher, mode)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), run_eagerly=True)
    x, y = images(8), np.arange(8) % 5

    def loss():
        return float(model.compute_loss(x, y, model(x)))

    before = loss()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = loss()
    assert after < before, (before, after)
    for w, w0 in zip(teacher.get_weights(), teacher_weights):
        np.testing.assert_array_equal(w, w0)


def test_trainer_runs_minilm_and_rejects_what_it_cannot(tmp_path):
    """apps/train.py's path, in process: --teacher=<.keras> --distillation=minilm for a
    distilled DeiT student (two compiled steps, deployable averaged heads); the clear errors
    come before training."""
    from keras_vit.training import TrainConfig, train, validate
    from keras_vit.training.trainer import _compiled_model

    keras.utils.set_random_seed(0)
    teacher = keras_vit.create_model("deit_tiny_patch16_224", **dict(TEACHER, num_classes=8))
    teacher_path = str(tmp_path / "teacher.keras")
    teacher.save(teacher_path)
    args = dict(model="deit_tiny_distilled_patch16_224", img_size=32, teacher=teacher_path,
                model_args=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2))
    summary = train(TrainConfig(**args, distillation="minilm", train_samples=32, val_samples=16,
                                batch_size=16, epochs=1, model_dir=str(tmp_path / "run")))
    assert summary["steps"] == 2 and "val_accuracy" in summary
    assert len(keras.saving.load_model(str(tmp_path / "run" / "model.keras")).outputs) == 1

    coarse = keras_vit.create_model("deit_tiny_patch16_224", **dict(TEACHER, patch_size=4))
    coarse_path = str(tmp_path / "coarse.keras")
    coarse.save(coarse_path)
    info = types.SimpleNamespace(num_classes=5)

    def compiled(**kwargs):
        config = TrainConfig(**dict(args, **kwargs))
        validate(config)
        return _compiled_model(config, "classification", info, 32, 4, 4, False)[1]

    with pytest.raises(ValueError, match="hard, soft, minilm, manifold"):
        validate(TrainConfig(**dict(args, distillation="tinybert")))
    with pytest.raises(ValueError, match="manifold distillation needs the same number of patch "
                                         "tokens: student 16, teacher 64"):
        compiled(distillation="manifold", teacher=coarse_path)
    with pytest.raises(ValueError, match="minilm needs a ViT-style student"):
        compiled(distillation="minilm", model="swin_tiny_patch4_window7_224",
                 model_args=dict(embed_dim=24, depths=(2, 2), num_heads=(1, 2), window_size=4))
