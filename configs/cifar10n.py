"""CIFAR-10N (Wei et al., 2022): CIFAR-10's 50k training images with real human labels.

  python launch.py --config configs/cifar10n.py --workdir /tmp/aul_cifar10n \
    --config.data.data_dir=~/tensorflow_datasets

Each training image has three annotators' labels; TFDS `cifar10_n` gives them as features
beside CIFAR-10's own `label`, which is the truth here. Trained on `worse_label` (a wrong
label whenever any annotator gave one: 40.2% noise), and scored against `label`. The other
sets are `--config.data.label_key=aggre_label` (majority vote, 9.0%) and `random_label1`
(one annotator, 17.2%). The noise is real, so none is injected (noise.kind 'none'); the
test split's labels are CIFAR-10's. The recipe is the paper's CIFAR-10 one (ResNet-32, SGD
at 0.1, batch 64, 150 epochs): hours on one GPU, far too slow for a CPU.

Prepare it once on a machine with internet (it needs the CIFAR-N label files in TFDS' manual
directory, see the TFDS catalog): `tfds build cifar10_n --file_format=array_record`.
"""

from aul_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.name = 'cifar10_n'
  config.data.label_key = 'worse_label'
  config.data.clean_label_key = 'label'
  config.noise.kind = 'none'
  config.noise.rate = 0.0
  config.model.name = 'resnet32'
  return config
