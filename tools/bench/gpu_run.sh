#!/usr/bin/env bash
# Runs the GPU tests, the Rust benchmarks and the PyTorch references in one go on the GPU host, writing logs and JSON
# under $OUT (default ./gpu_out). Expects the prebuilt binaries in .dev/ (see docs/performance.md) and, for the
# PyTorch references, the diffusers 0.42.1 + importlib_metadata wheels in .whl/ when the host lacks diffusers.
#
#   tools/bench/gpu_run.sh [tests] [kernels] [variants] [dit] [e2e] [modes] [memlog] [pipeline] [ncu] [textprof] [vaeprof] [torch] [stages]
#   (default: tests kernels dit torch)
#   BENCH_ARGS="--cases v1" TORCH_ARGS="--cases v1" tools/bench/gpu_run.sh
#   tools/bench/gpu_run.sh dit e2e pipeline torch stages   # the whole edit side by side with PyTorch (docs/performance.md)
#   MODES="fp8 fp8fast fp8release lowmem plus2 v1_512" tools/bench/gpu_run.sh e2e modes   # FP8, memory modes, other cases
#   MODES="fp8 fp8xvae fp8xall lowmem lowxall" tools/bench/gpu_run.sh modes   # exact allocations against pooled pages
#   PACK=1 OUT=$OUT tools/bench/gpu_run.sh …              # on a device call: logs and JSON in $OUT/all.tar.gz
#   TEST_BINS=gpu_fast_ops TEST_FILTER="fused_glue vae_convolutions" tools/bench/gpu_run.sh tests pipeline  # a short check
#
# `pipeline` runs pipeline_bench with --stages (each stage around the networks part by part; PIPE_ARGS adds more);
# `stages` runs tools/bench/torch_stage_bench.py (PyTorch VAE, text encoder, encode_prompt, the PyTorch edit summed
# with torch.json's DiT steps; STAGES_ARGS="--compile vae,text_encoder" adds torch.compile, minutes). The table at
# the end joins whatever JSON files the stages wrote. `vaeprof` times every kernel of our VAE and of PyTorch's under
# ncu and prints where each spends its GPU time (tools/bench/kernel_summary.py).
set -u
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
STAGES=${*:-tests kernels dit torch}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# cuDNN 9 for the VAE's convolutions (fast-path kind `conv`): PyTorch's wheel ships it; without it they run as
# im2col GEMMs (logged once, shown in the fast-path report).
CUDNN_LIB=$(python3 -c 'import os, nvidia.cudnn as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$CUDNN_LIB" ] && [ -d "$CUDNN_LIB" ] && export LD_LIBRARY_PATH=$CUDNN_LIB:$LD_LIBRARY_PATH && echo "cuDNN: $CUDNN_LIB"
export PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
# with_peak NAME COMMAND...: runs COMMAND while nvidia-smi samples the GPU's used memory every 50 ms; prints and
# writes ($OUT/NAME.peak) the peak in MiB as the driver saw it (what users see, the pool's reservations included,
# transients inside a stage too, which the reports' after-edit figures miss).
with_peak() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/$name.mem" 2>/dev/null &
  local sampler=$!
  "$@"; local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  sort -n "$OUT/$name.mem" | tail -1 | tee "$OUT/$name.peak" | sed "s/^/$name: peak GPU memory used (MiB, driver): /"
  rm -f "$OUT/$name.mem"
  return $rc
}
# Binaries travel xz-compressed (the carried tree is limited to 64 MiB).
for f in .dev/bin/*.xz; do
  [ -e "$f" ] || continue
  b=.dev/$(basename "$f" .xz); xz -dc "$f" > "$b" && chmod +x "$b"
done
export RUST_BACKTRACE=1
# The qwen-edit binary of e2e, modes and memlog (QWEN_EDIT=.dev/qwen-edit-old: a previous build, for a before/after
# in the same call; relative to the checkout).
QWEN_EDIT=${QWEN_EDIT:-.dev/qwen-edit}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total \
  --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if has tests; then
  # The tests read fixtures under the checkout path they were built in (build_gpu.sh records it).
  root=$(cat .dev/bin/BUILD_ROOT 2>/dev/null || true)
  if [ -n "$root" ] && [ ! -e "$root/tests/fixtures" ]; then mkdir -p "$(dirname "$root")" && ln -sfn "$PWD" "$root"; fi
  echo "== GPU tests"; : > "$OUT/tests.log"
  # TEST_BINS picks the binaries, TEST_FILTER the tests (libtest name filters, e.g. "fused_glue vae_convolutions").
  for t in ${TEST_BINS:-gpu_fast_ops gpu_fp8 gpu_models gpu_region}; do
    timeout ${TEST_TIMEOUT:-300} .dev/$t ${TEST_FILTER:-} --test-threads=1 --nocapture >> "$OUT/tests.log" 2>&1
    echo "$t exit $? (124: stopped at TEST_TIMEOUT)" | tee -a "$OUT/tests_exit.log"
  done
  grep -E 'rel L2|test result|panicked|FAILED|failed|ordering' "$OUT/tests.log" | head -70
  # If the default (TMA) attention kernel failed a check, benchmark the DiT with the mma.sync kernel instead (only
  # when the attention checks ran: a TEST_FILTER without them leaves the default alone).
  if grep -q 'flash_attention_matches_reference' "$OUT/tests.log" && { ! grep -q 'attend: DiT joint.*, tma vs mma.sync' "$OUT/tests.log" \
    || grep -qE 'attend(: DiT.*, tma vs| \(tma\)|: key mask, tma ).*(relative L2 error|non-finite)' "$OUT/tests.log"; }; then
    echo "TMA attention unverified: benchmarking with QWEN_FLASH=mma"; export QWEN_FLASH=mma
  fi
fi
if has kernels || has dit; then
  args=""
  has kernels || args="$args --skip-kernels"
  has dit || args="$args --skip-dit"
  echo "== Rust benchmark"
  timeout ${BENCH_TIMEOUT:-400} .dev/dit_bench --json "$OUT/rust.json" $args ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; tail -45 "$OUT/bench.log"
fi
if has e2e; then
  # End to end with full-size random weights for all three networks: time per stage and memory over repeated edits.
  # The first edit of a fresh machine compiles and autotunes burn's own kernels (kept in ~/.cache/qwen-image).
  echo "== qwen-edit --demo --size full (first process on this machine)"
  start=$(date +%s)
  with_peak e2e timeout ${E2E_TIMEOUT:-400} $QWEN_EDIT --demo --size full --device cuda --compare --repeat ${REPEAT:-10} \
    --quiet -o "$OUT/e2e" --report "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
  echo "e2e exit $? after $(( $(date +%s) - start )) s"; tail -60 "$OUT/e2e.log"
fi
if has pipeline; then
  echo "== pipeline_bench"
  timeout ${PIPE_TIMEOUT:-420} .dev/pipeline_bench --json "$OUT/pipeline.json" --stages ${PIPE_ARGS:-} \
    > "$OUT/pipeline.log" 2>&1
  echo "pipeline_bench exit $?"; tail -50 "$OUT/pipeline.log"
fi
if has variants; then
  # Attention kernel variants (tuning switches of flash_attention_tma.cu and flash_attention_fp8.cu), each a full
  # module source in .dev/kvar/<name>/ (tools/bench/kernel_variants.py writes them) loaded through QWEN_CUDA_KERNEL_DIR.
  [ -d .dev/kvar ] || python3 tools/bench/kernel_variants.py --out .dev/kvar
  for d in .dev/kvar/*/; do
    echo "== variant $(basename $d)"
    QWEN_CUDA_KERNEL_DIR=$d timeout 120 .dev/dit_bench --skip-dit --attention-only --reps ${VARIANT_REPS:-10} \
      --json "$OUT/variant_$(basename $d).json" 2>&1 | grep -E 'attention .*\[(tma|fp8)' 
  done
fi
if has ncu; then
  # Hardware counters of one launch of each attention kernel at the Edit v1 joint shape (clocks left alone).
  for k in flash_fwd_tma_d128 flash_fwd_fp8_d128 flash_fwd_wgmma_d128; do
    echo "== ncu $k"
    timeout ${NCU_TIMEOUT:-120} ncu --clock-control none -k regex:$k -c 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      .dev/dit_bench --skip-dit --attention-only --reps 1 --json /tmp/ncu_bench.json > "$OUT/ncu_$k.txt" 2>&1
    echo "ncu exit $?"; grep -E 'Duration|Throughput|Occupancy|Registers|Stall|Issue|Warp Cycles|Active Warps|Pipe|Bank' \
      "$OUT/ncu_$k.txt" | head -40
  done
fi
if has modes; then
  # The memory modes of issue 13 on the same demo edit (after `e2e`, whose process compiled burn's kernels): FP8
  # weights (DiT and text encoder; the DiT only), FP8 with cuBLASLt's fast accumulation, FP8 and bf16 with
  # --release-memory, --low-memory (24 GB cards); and the issue's other cases in bf16: Edit-Plus with one and two
  # input images, Edit v1 at 512². Each report holds the memory plan and the measured pool / driver memory. MODES
  # picks some (default: fp8 fp8dit lowmem).
  img=tests/fixtures/processor/images
  for name in ${MODES:-fp8 fp8dit lowmem}; do
    export -n QWEN_FP8_FAST_ACCUM
    case $name in
      fp8) flags=(--quantize fp8) ;;
      fp8dit) flags=(--quantize fp8-dit) ;;
      fp8fast) flags=(--quantize fp8); export QWEN_FP8_FAST_ACCUM=1 ;;  # the default since 2026-12-07
      fp8exact) flags=(--quantize fp8); export QWEN_FP8_FAST_ACCUM=0 ;;  # promoted FP8 sums
      fp8attn) flags=(--quantize fp8 --fp8-attention) ;;  # the joint attention in FP8 too
      # img_mlp.net.2 in FP8 too (kept by default, as the published ablations do; no proxy edit changed, docs/fp8.md)
      fp8net2) flags=(--quantize fp8 --quantize-keep img_in,txt_in,time_text_embed.timestep_embedder,norm_out.linear,proj_out,img_mod,txt_mod) ;;
      fp8cache) flags=(--quantize fp8 --fp8-cache) ;;  # the pruning cache's K/V in 8 bits (half the cache)
      lowcache) flags=(--low-memory --fp8-cache) ;;  # the 2 GiB budget then holds all 60 blocks instead of 42
      fp8release) flags=(--quantize fp8 --release-memory) ;;
      release) flags=(--release-memory) ;;
      lowmem) flags=(--low-memory) ;;
      # exact-size allocations (--exact-allocation: the VAE's stages, or every stage), each stage's given back after it
      fp8xvae) flags=(--quantize fp8 --exact-allocation vae) ;;
      fp8xall) flags=(--quantize fp8 --exact-allocation all) ;;
      lowxvae) flags=(--low-memory --exact-allocation vae) ;;
      lowxall) flags=(--low-memory --exact-allocation all) ;;
      xvae) flags=(--exact-allocation vae) ;;
      fp8drop) flags=(--quantize fp8 --drop-cache) ;;  # the pruning cache dropped before the decode
      fp8dropx) flags=(--quantize fp8 --drop-cache --exact-allocation all) ;;
      fp8dropxvae) flags=(--quantize fp8 --drop-cache --exact-allocation vae) ;;
      fp8droprel) flags=(--quantize fp8 --drop-cache --release-memory) ;;  # pooled, unused pages released per stage
      plus1) flags=(--variant edit-plus) ;;
      plus2) flags=(-i $img/astronaut.png -i $img/coffee.png -p "Put the cup in her hand") ;;
      v1_512) flags=(--vae-area 262144) ;;
      *) echo "unknown mode $name"; continue ;;
    esac
    echo "== qwen-edit --demo --size full ${flags[*]}"
    start=$(date +%s)
    with_peak "e2e_$name" timeout ${MODE_TIMEOUT:-240} $QWEN_EDIT --demo --size full --device cuda --compare --repeat ${MODE_REPEAT:-3} \
      "${flags[@]}" --quiet -o "$OUT/e2e_$name" --report "$OUT/e2e_$name.json" > "$OUT/e2e_$name.log" 2>&1
    echo "$name exit $? after $(( $(date +%s) - start )) s"; tail -30 "$OUT/e2e_$name.log"
  done
fi
if has memlog; then
  # burn's allocator log (cubecl `[memory.logger] level = "full"`, in a cubecl.toml of a scratch working directory)
  # of one demo edit (MEMLOG_FLAGS, default FP8), summarized by tools/bench/memlog_summary.py: which requests made
  # new pool pages and how much the pools reserved beyond what was in use.
  d=$(mktemp -d); here=$PWD
  printf '[memory.logger]\nfile = "%s/mem.log"\nlevel = "full"\n' "$d" > "$d/cubecl.toml"
  echo "== memory log: qwen-edit --demo --size full ${MEMLOG_FLAGS:---quantize fp8}"
  if [ "${MEMLOG_VAE:-0}" = 1 ]; then  # the VAE alone (pipeline_bench's encode and decode at 1024²)
    (cd "$d" && timeout ${MEMLOG_TIMEOUT:-240} "$here/.dev/pipeline_bench" --skip-text-encoder --reps 1 \
      --json "$d/vae.json" > "$OUT/memlog.log" 2>&1)
  else
    (cd "$d" && timeout ${MEMLOG_TIMEOUT:-240} "$here/$QWEN_EDIT" --demo --size full --device cuda --compare \
      --repeat 1 ${MEMLOG_FLAGS:---quantize fp8} --quiet -o "$d/out" > "$OUT/memlog.log" 2>&1)
  fi
  echo "memlog exit $? ($(du -h "$d/mem.log" 2>/dev/null | cut -f1) of log)"
  python3 tools/bench/memlog_summary.py "$d/mem.log" > "$OUT/memlog_summary.txt" 2>&1; head -60 "$OUT/memlog_summary.txt"
  [ "${MEMLOG_KEEP:-0}" = 1 ] && gzip -c "$d/mem.log" > "$OUT/memlog_raw.gz"  # the whole log, for a closer look
  rm -rf "$d"
fi
if has textprof; then
  # Every kernel's duration under ncu for the first TEXTPROF_LAUNCHES (default 1500) launches of pipeline_bench's
  # text-encoder section: its first vision-tower calls (a first call, the timed call, the call whose embeddings the
  # language model then reads). The per-launch CSV (gzipped) says which layer's kernel takes what: the vision tower's
  # 45 ms against a ≈ 20 ms estimate from its FLOPs (docs/performance.md). QWEN_GEMM_AUTOTUNE=0: no timing trials.
  echo "== ncu: the text encoder's first ${TEXTPROF_LAUNCHES:-1500} kernels"
  QWEN_GEMM_AUTOTUNE=0 timeout ${NCU_TIMEOUT:-420} ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --print-units base --launch-count ${TEXTPROF_LAUNCHES:-1500} --log-file "$OUT/textprof.csv" \
    .dev/pipeline_bench --skip-vae --reps 1 --json /tmp/textprof_bench.json > "$OUT/textprof.log" 2>&1
  echo "ncu exit $?"; tail -5 "$OUT/textprof.log"
  # Without the random weights' generator; then the second vision block's launches one by one (after the first
  # call's patch embedding and first block: adjust TEXTPROF_LIST to the table's counts).
  python3 tools/bench/kernel_summary.py "$OUT/textprof.csv" --json "$OUT/textprof.json" --exclude prng \
    --list ${TEXTPROF_LIST:-20:60} | head -90
  gzip -f "$OUT/textprof.csv"  # a call brings back 8 files at most: PACK=1 keeps this one in the archive
fi
if has vaeprof; then
  # Every kernel's duration (ncu serializes them: GPU time without launch gaps) for our VAE encode + decode at 1024²
  # (pipeline_bench: a first call and one timed call each, then one more decode) and PyTorch's (torch_stage_bench.py:
  # a warm-up and one timed call each, cudnn.benchmark off). Compare the shares, not the totals (the call counts
  # differ). QWEN_GEMM_AUTOTUNE=0: cuDNN's heuristic picks our algorithms, so cudnnFind's trials stay out.
  # kernel_durations NAME COMMAND...: every kernel's duration under ncu into $OUT/vaeprof_NAME.*, and its summary.
  kernel_durations() {
    local name=$1; shift
    echo "== ncu: kernels of $name"
    timeout ${NCU_TIMEOUT:-420} ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      --log-file "$OUT/vaeprof_$name.csv" "$@" > "$OUT/vaeprof_$name.log" 2>&1
    echo "ncu exit $?"
    python3 tools/bench/kernel_summary.py "$OUT/vaeprof_$name.csv" --json "$OUT/vaeprof_$name.json" | head -40
  }
  QWEN_GEMM_AUTOTUNE=0 kernel_durations ours .dev/pipeline_bench --skip-text-encoder --reps 1 \
    --json /tmp/vaeprof_bench.json
  kernel_durations torch python3 tools/bench/torch_stage_bench.py --sections vae --reps 1 --cudnn-benchmark off \
    --skip-vae-stages --json /tmp/vaeprof_torch.json
fi
if has torch; then
  echo "== PyTorch reference"
  timeout ${TORCH_TIMEOUT:-300} python3 tools/bench/torch_dit_bench.py --json "$OUT/torch.json" ${TORCH_ARGS:-} \
    > "$OUT/torch.log" 2>&1
  echo "torch exit $?"; tail -15 "$OUT/torch.log"
fi
if has stages; then
  # After `torch`: the PyTorch edit's sum takes the DiT steps from torch.json.
  echo "== PyTorch stages (VAE, text encoder, encode_prompt)"
  timeout ${STAGES_TIMEOUT:-480} python3 tools/bench/torch_stage_bench.py --json "$OUT/torch_stages.json" \
    --dit-json "$OUT/torch.json" ${STAGES_ARGS:-} > "$OUT/torch_stages.log" 2>&1
  echo "torch stages exit $?"; grep -vE '^\[transformers\]|^W[0-9]{4} ' "$OUT/torch_stages.log" | tail -30
fi
if ls "$OUT"/*.json >/dev/null 2>&1; then
  python3 tools/bench/compare.py "$OUT/rust.json" "$OUT/torch.json" --pipeline "$OUT/pipeline.json" \
    --e2e "$OUT/e2e.json" --torch-stages "$OUT/torch_stages.json" --out "$OUT/combined.json" | tee "$OUT/table.md"
fi
# The tests' verdicts once more at the end: a long call's output tail would otherwise lose them behind the e2e logs.
if has tests; then
  echo "== GPU tests (again)"; grep -E '^test result|panicked|FAILED' "$OUT/tests.log" | head -20
  cat "$OUT/tests_exit.log" 2>/dev/null
fi
# PACK=1: everything in one archive beside the table (a device call brings back at most 8 files from $OUT), without
# the edits' images (PACK_IMAGES=1 keeps them; with them the archive outgrew what a call brings back).
if [ "${PACK:-0}" = 1 ]; then
  [ "${PACK_IMAGES:-0}" = 1 ] || find "$OUT" -name '*.png' -delete
  tar -czf /tmp/gpu_out.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name table.md -delete \
    && mv /tmp/gpu_out.tar.gz "$OUT/all.tar.gz" && ls -la "$OUT"
fi
