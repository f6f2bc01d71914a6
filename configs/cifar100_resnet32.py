"""The paper's CIFAR-100 AUL run: ResNet-32, 45k training images, 40% uniform noise.

  python launch.py --config configs/cifar100_resnet32.py --workdir /tmp/aul_cifar100 \
    --config.data.data_dir=~/tensorflow_datasets

Same recipe as configs/cifar10_resnet32.py (paper Section 5 and Appendix A.2).
"""

from aul_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.name = 'cifar100'
  config.model.name = 'resnet32'
  return config
