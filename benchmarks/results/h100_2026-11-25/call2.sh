. gpu/lib.sh
info
P=python3; B=benchmarks/aul_run_time.py
W=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL
step prof_f32 150 30 $P $B --dtype float32 --epochs 2 --chunk 2 --profile
step while_f32 130 170 env XLA_FLAGS=$W $P $B --dtype float32 --epochs 4 --chunk 4 --profile
step while_bf16 110 300 env XLA_FLAGS=$W $P $B --dtype bfloat16 --epochs 4 --chunk 4
step b128_bf16 90 390 $P $B --dtype bfloat16 --batch-size 128 --epochs 4 --chunk 4
echo "total $(( $(date +%s) - T0 ))s" | tee -a $L
grep -h '^\[' $L | tail -60
