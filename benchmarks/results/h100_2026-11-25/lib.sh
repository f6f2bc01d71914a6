# Helpers for the device calls (not part of the project): logs under $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
L=$OUT/log.txt; R=$OUT/results.jsonl; T0=$(date +%s)
info() {
  { date -u; nvidia-smi; nproc; lscpu | grep 'Model name'; free -g | head -2
    python3 -c 'import jax, flax, optax, torch, numpy; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__, "numpy", numpy.__version__, jax.devices())'
  } 2>&1 | tee -a $L
}
# step NAME LIMIT_S MAX_START_S CMD...: runs CMD unless MAX_START_S have passed since the start.
step() {
  local name=$1 lim=$2 maxstart=$3; shift 3
  local now=$(( $(date +%s) - T0 ))
  if [ $now -gt $maxstart ]; then echo "=== $name SKIPPED at ${now}s" | tee -a $L; return; fi
  echo "=== $name start $(date -u +%T) (+${now}s): $*" | tee -a $L
  local s=$(date +%s.%N)
  timeout $lim "$@" 2>&1 | tee $OUT/cur.txt >> $L
  local rc=${PIPESTATUS[0]} e=$(date +%s.%N)
  local wall=$(python3 -c "print(round($e - $s, 2))")
  echo "=== $name rc=$rc wall=${wall}s" | tee -a $L
  tail -25 $OUT/cur.txt | grep -v '^{'
  local last=$(tail -1 $OUT/cur.txt)
  case "$last" in "{"*) echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall, \"xla_flags\": \"${XLA_FLAGS:-}\", \"record\": $last}" >> $R;;
    *) echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall, \"xla_flags\": \"${XLA_FLAGS:-}\"}" >> $R;; esac
  rm -f $OUT/cur.txt
}
