#!/usr/bin/env bash
# Host memory in depth on the CPU (issue: a static run's peak at 48 layers within 10% of its
# peak at 4, no more than 10% slower than with oneDNN's default caches), and the plan's
# prediction next to each measurement. CPU only; about 2 minutes on 2 cores.
#   bash scripts/bench_host_depth.sh        (make bench-host-depth)
set -e
PY=${PY:-python}
WORK=${WORK:-/tmp/bench_host_depth}
REPEAT=${REPEAT:-3}
mkdir -p "$WORK"
for L in 4 48; do
  [ -f "$WORK/q$L/config.json" ] || $PY scripts/make_synthetic.py --geometry tiny-moe --layers $L --out "$WORK/q$L" > /dev/null
  cat > "$WORK/s$L.yaml" <<YAML
global: {save_path: $WORK/out$L, device: cpu}
model: {name: q, model_path: $WORK/q$L}
compression: {name: PTQ, quantization: {name: fp8_static, bits: 8}}
dataset: {name: RandomTokens, num_samples: 32, max_seq_length: 256, batch_size: 8, seed: 0}
YAML
done
run() {  # label, layers, extra env
  rm -rf "$WORK/out$2"
  line=$(env $3 $PY -m streamq quantize -c "$WORK/s$2.yaml" 2>&1 | grep -E 'done in|peak host' | tr '\n' ' ')
  echo "$1 layers=$2 $line"
}
for r in $(seq "$REPEAT"); do
  run "streamq caches (16 shapes) + heap trim" 4 "STREAMQ_BENCH=1"
  run "streamq caches (16 shapes) + heap trim" 48 "STREAMQ_BENCH=1"
  run "oneDNN default caches (1024 shapes)" 48 "LRU_CACHE_CAPACITY=1024 ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024"
done
