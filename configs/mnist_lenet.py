"""MNIST with LeNet, 40% uniform noise (TFDS; the data must be prepared once, see README).

  python launch.py --config configs/mnist_lenet.py --workdir /tmp/aul_mnist \
    --config.data.data_dir=~/tensorflow_datasets

60,000 examples, 30 epochs: about 2 minutes on one GPU.
"""

from aul_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.name = 'mnist'
  config.model.name = 'lenet'
  config.aul.epochs = 30
  config.aul.batch_size = 128
  config.aul.learning_rate = 0.05
  config.eval_batch_size = 1000
  return config
