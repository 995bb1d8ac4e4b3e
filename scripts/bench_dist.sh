#!/usr/bin/env bash
# 1 vs N processes (torchrun, one GPU each) on a synthetic Qwen3-235B-A22B: wall time, each
# rank's peak memory against its plan, and a digest of the output shards (equal digests:
# byte-identical outputs). Needs N GPUs.
#
#   bash scripts/bench_dist.sh                                  # fp8_dynamic, fp8_blockwise; 8 layers
#   ALGOS="fp8_static" SAMPLES=256 SEQ=4096 BATCH=4 LAYERS=4 bash scripts/bench_dist.sh
#   ALGOS="int4_gptq" SAMPLES=128 SEQ=2048 BATCH=4 LAYERS=4 bash scripts/bench_dist.sh
set -e
export PYTHONUNBUFFERED=1
ALGOS=${ALGOS:-"fp8_dynamic fp8_blockwise"}
LAYERS=${LAYERS:-8}
NPROC=${NPROC:-2}
SAMPLES=${SAMPLES:-128}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-4}
WORK=${WORK:-/tmp/bench_dist}
mkdir -p "$WORK"
if [ ! -f "$WORK/q-$LAYERS/config.json" ]; then
  python scripts/make_synthetic.py --geometry qwen3-235b-a22b --layers "$LAYERS" --out "$WORK/q-$LAYERS" \
    --device cuda --vocab-size 32768 > /dev/null
fi
cat "$WORK/q-$LAYERS"/*.safetensors > /dev/null  # warm page cache, as the bench's --cache warm
for algo in $ALGOS; do
  bits=8; case $algo in int4_*) bits=4;; esac
  cat > "$WORK/$algo.yaml" <<YAML
global: {save_path: $WORK/out-$algo, device: cuda}
model: {name: q, model_path: $WORK/q-$LAYERS}
compression: {name: PTQ, quantization: {name: $algo, bits: $bits}}
dataset: {name: RandomTokens, num_samples: $SAMPLES, max_seq_length: $SEQ, batch_size: $BATCH, seed: 0}
YAML
  for n in 1 "$NPROC"; do
    rm -rf "$WORK/out-$algo"
    t0=$(date +%s.%N)
    if [ "$n" = 1 ]; then python -m streamq quantize -c "$WORK/$algo.yaml" -q > "$WORK/log-$algo-$n" 2>&1;
    else python -m torch.distributed.run --nproc-per-node "$n" -m streamq quantize -c "$WORK/$algo.yaml" -q \
      > "$WORK/log-$algo-$n" 2>&1; fi
    t1=$(date +%s.%N)
    echo "== $algo nproc=$n process wall $(python -c "print(round($t1-$t0,2))") s"
    grep -h 'done in\|peak\|layer stages\|rank [0-9]*:' "$WORK/log-$algo-$n" || tail -20 "$WORK/log-$algo-$n"
    python - "$WORK/out-$algo" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/streamq_report.json"))
print("phases:", {k: round(v, 2) for k, v in r["report"]["phases"].items()})
print("plan (rank 0): time", round(r["plan"]["estimated_seconds"], 1), "s", r["plan"]["time_breakdown"])
stages = r["report"]["stages"]
keys = sorted({k for s in stages for k in s if k != "layer"})
print("stage seconds summed over layers (rank 0):", {k: round(sum(s.get(k, 0) for s in stages), 2) for k in keys})
# Each layer's stages but the read, which runs ahead in its own thread: the layer loop's path.
print("per-layer seconds, stages but the read (rank 0):",
      [round(sum(v for k, v in s.items() if k not in ("layer", "read")), 2) for s in stages])
for split in r["report"].get("work_split", []):  # several processes splitting the solves
    print(f"layer {split['layer']} solves per rank (s): predicted {split['predicted_solve_s']}, "
          f"measured {split['measured_solve_s']}")
PY
    sha256sum "$WORK/out-$algo"/*.safetensors | awk '{print $1}' | sha256sum | cut -c1-16
  done
done
