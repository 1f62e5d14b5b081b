"""Token pooling and token-to-map reshapes shared by classification and dense heads."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vit")
class TokenPool(keras.layers.Layer):
    """(B, N, D) -> (B, D): ``token`` takes token ``index``; ``avg`` / ``max`` pool the
    tokens after the ``num_prefix_tokens`` prefix (timm's global_pool)."""

    def __init__(self, mode="token", num_prefix_tokens=1, index=0, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("token", "avg", "max"):
            raise ValueError(f"pool mode must be 'token', 'avg' or 'max', got {mode!r}")
        self.mode, self.num_prefix_tokens, self.index = mode, int(num_prefix_tokens), int(index)

    def call(self, x):
        if self.mode == "token":
            return x[:, self.index]
        x = x[:, self.num_prefix_tokens:]
        return ops.mean(x, axis=1) if self.mode == "avg" else ops.max(x, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode,
                "num_prefix_tokens": self.num_prefix_tokens, "index": self.index}


@keras.saving.register_keras_serializable(package="keras_vit")
class TokensToMap(keras.layers.Layer):
    """(B, prefix + gh*gw, D) -> (B, gh, gw, D): drops the prefix tokens, restores the grid."""

    def __init__(self, grid_size, num_prefix_tokens=0, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, x):
        x = x[:, self.num_prefix_tokens:]
        return ops.reshape(x, (-1, self.grid_size[0], self.grid_size[1], x.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.grid_size + (input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "num_prefix_tokens": self.num_prefix_tokens}
