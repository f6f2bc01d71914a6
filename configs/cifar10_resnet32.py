"""The paper's CIFAR-10 AUL run: ResNet-32, 45k training images, 40% uniform noise.

  python launch.py --config configs/cifar10_resnet32.py --workdir /tmp/aul_cifar10 \
    --config.data.data_dir=~/tensorflow_datasets

SGD (momentum 0.9, weight decay 1e-4), constant learning rate 0.1, batch 64, 150 epochs
(paper Section 5). The paper reports a noise estimate close to 0.4 with ~90% precision and
recall. Hours on one GPU; far too slow for a CPU.
"""

from aul_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.name = 'cifar10'
  config.model.name = 'resnet32'
  return config
