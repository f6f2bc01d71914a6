. gpu/lib.sh
info
P=python3
step run_f32_b64 200 60 $P benchmarks/aul_run_time.py --model resnet32 --dtype float32 --epochs 10 --chunk 5
step thr_b64 170 250 $P benchmarks/train_throughput.py --model resnet32 --batch-size 64 --steps 100 --repeats 5 --dtype float32,bfloat16
step thr_b128 200 380 $P benchmarks/train_throughput.py --model resnet32 --batch-size 128 --steps 50 --repeats 5 --dtype float32,bfloat16 --conv-impl library,canonical_vjp
step run_bf16_b64 140 470 $P benchmarks/aul_run_time.py --model resnet32 --dtype bfloat16 --epochs 10 --chunk 5
echo "total $(( $(date +%s) - T0 ))s" | tee -a $L
