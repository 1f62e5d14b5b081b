"""The transformer feed-forward network W2 act(W1 x)."""

import keras

from keras_vit.layers.common import activation, dense, flatten_tokens


@keras.saving.register_keras_serializable(package="keras_vit")
class Mlp(keras.layers.Layer):
    """Two linear layers with an activation between (timm ``Mlp``: fc1, act, drop, fc2, drop).

    ``act="gelu"`` is the exact erf form, as torch's nn.GELU.
    """

    def __init__(self, hidden_features, out_features=None, act="gelu", drop=0.0, bias=True,
                 ranks=None, **kwargs):
        super().__init__(**kwargs)
        self.ranks = dict(ranks or {})  # factorised linear layers: {"fc1": r, "fc2": r}
        self.hidden_features = int(hidden_features)
        self.out_features = out_features
        self.act = act
        self.drop = float(drop)
        self.bias = bias
        self.fc1 = dense(self.hidden_features, use_bias=bias, name="fc1",
                         rank=self.ranks.get("fc1"))
        self.act_fn = activation(act)
        self.drop1 = keras.layers.Dropout(self.drop)
        self.fc2 = None  # width known at build time when out_features is None
        self.drop2 = keras.layers.Dropout(self.drop)

    def build(self, input_shape):
        out = self.out_features or input_shape[-1]
        self.fc2 = dense(out, use_bias=self.bias, name="fc2", rank=self.ranks.get("fc2"))
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.hidden_features,))

    def call(self, x, training=None):
        # On the 2-D form the activation reads fc1's BiasAdd directly, so grappler fuses
        # MatMul + bias + GELU into one oneDNN op (flatten_tokens).
        x, restore = flatten_tokens(x)
        x = self.drop1(self.act_fn(self.fc1(x)), training=training)
        return restore(self.drop2(self.fc2(x), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_features or input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "hidden_features": self.hidden_features,
                "out_features": self.out_features, "act": self.act, "drop": self.drop,
                "bias": self.bias, **({"ranks": self.ranks} if self.ranks else {})}
