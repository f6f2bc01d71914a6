. gpu/lib.sh
info
python3 -c "
import numpy as np
r = np.random.default_rng(0)
np.savez('/tmp/rand45k.npz', x_train=r.integers(0, 256, (45000, 32, 32, 3), dtype=np.uint8),
         y_train=r.integers(0, 10, 45000), x_test=r.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
         y_test=r.integers(0, 10, 10000))" && ls -la /tmp/rand45k.npz | tee -a $L
A="launch.py --config configs/npz.py --config.data.path=/tmp/rand45k.npz --config.model.name=resnet32 --config.aul.batch_size=64 --config.aul.learning_rate=0.1 --config.noise.kind=uniform --config.noise.rate=0.4"
step e2e_f32_150 480 30 python3 $A --config.aul.epochs=150 --workdir /tmp/e2e_f32
cp /tmp/e2e_f32/summary.json $OUT/summary_f32_150.json
step e2e_bf16_20 100 450 python3 $A --config.aul.epochs=20 --config.model.dtype=bfloat16 --workdir /tmp/e2e_bf16
cp /tmp/e2e_bf16/summary.json $OUT/summary_bf16_20.json
step dump_f32 75 500 env XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" python3 benchmarks/aul_run_time.py --epochs 0
python3 gpu/hlo_grep.py /tmp/dump input_multiply_reduce_fusion_8 input_multiply_reduce_fusion_9 2>&1 | tee -a $L | head -80
echo "total $(( $(date +%s) - T0 ))s" | tee -a $L
