#!/usr/bin/env bash
# 1 vs 2 processes (torchrun) on a synthetic Qwen3-235B-A22B, 8 layers, calibration-free schemes;
# prints wall times and a digest of the output shards (equal digests: byte-identical outputs).
# Needs 2 GPUs: bash scripts/bench_dist.sh
set -e
export PYTHONUNBUFFERED=1
python scripts/make_synthetic.py --geometry qwen3-235b-a22b --layers 8 --out /tmp/q --device cuda --vocab-size 32768 > /dev/null
cat /tmp/q/*.safetensors > /dev/null  # warm page cache, as the bench's --cache warm
for algo in fp8_dynamic fp8_blockwise; do
cat > /tmp/$algo.yaml <<YAML
global: {save_path: /tmp/out-$algo, device: cuda}
model: {name: q, model_path: /tmp/q}
compression: {name: PTQ, quantization: {name: $algo, bits: 8}}
YAML
for n in 1 2; do
  rm -rf /tmp/out-$algo
  t0=$(date +%s.%N)
  if [ $n = 1 ]; then python -m streamq quantize -c /tmp/$algo.yaml -q > /tmp/log-$algo-$n 2>&1;
  else python -m torch.distributed.run --nproc-per-node 2 -m streamq quantize -c /tmp/$algo.yaml -q > /tmp/log-$algo-$n 2>&1; fi
  t1=$(date +%s.%N)
  echo "$algo nproc=$n wall $(python -c "print(round($t1-$t0,2))") s; $(grep -h 'done in\|peak' /tmp/log-$algo-$n | tr '\n' ' ')"
  sha256sum /tmp/out-$algo/*.safetensors | sha256sum | cut -c1-16
done; done
