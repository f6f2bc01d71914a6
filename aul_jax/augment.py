"""Standard CIFAR augmentation (4-pixel pad, random crop, horizontal flip) run on the device."""

import jax
import jax.numpy as jnp

PAD = 4


def _crop_and_flip(image_HxWxC: jax.Array, key: jax.Array) -> jax.Array:
  """One image: zero-pad by PAD, take a random crop of the original size, flip half the time."""
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(image_HxWxC, ((PAD, PAD), (PAD, PAD), (0, 0)))
  top, left = jax.random.randint(crop_key, (2,), 0, 2 * PAD + 1)
  cropped = jax.lax.dynamic_slice(padded, (top, left, 0), image_HxWxC.shape)
  return jnp.where(jax.random.bernoulli(flip_key), cropped[:, ::-1, :], cropped)


def augment_batch(images_BxHxWxC: jax.Array, keys_B: jax.Array) -> jax.Array:
  """Augments each image with its own key, so results do not depend on how a batch is split."""
  return jax.vmap(_crop_and_flip)(images_BxHxWxC, keys_B)
