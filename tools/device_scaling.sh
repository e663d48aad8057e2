# 1-16 thread scaling against llama.cpp on the 16-core device machine (BENCHMARKS.md, "Thread
# scaling"), where no model hub or package registry can be reached and 64 MB travel. Two halves:
#
#   bash tools/device_scaling.sh prepare       # here: fills .devcarry/ (~32 MB; ignored by git)
#   bash tools/device_scaling.sh run q4_0:3 q4_k_m:1   # there: TYPE:RUNS, one tool run each
#
# prepare needs this machine's bench cache (python tools/bench_vs_llamacpp.py --types
# q4_0,q4_k_m --build-only) and PY312: a Python of the device's version with numpy and cython
# (the extension is built for it here: rerun prepare after a change to the C code). It packs the
# four model files with tools/pack_model.py (the rows repeat: a speed-only copy) and takes
# llama-bench from three of the tool's llama.cpp builds, building what is missing (native-noamx,
# avx512: AVX-512 without AVX-VNNI, avx2), so that `run` can pick the widest the device's CPU
# executes. Carry .devcarry and llamacpu/_core.cpython-312-x86_64-linux-gnu.so.
# run unpacks into $LLAMACPU_CACHE with empty stand-ins for the checkpoint and the bf16 GGUF
# (bench_vs_llamacpp.py then finds every file made), and runs the tool with -t 1,2,4,8,16, writing
# to $OUT; LIMIT (seconds, default 570) bounds the whole run, and a type that has no time left
# is skipped; THREADS and EXTRA (more tool arguments: --quick for a smoke test) change the run.
# The tool's table comes back in $OUT/scaling-TYPE.md, its log in $OUT/log-TYPE.txt.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
D=$REPO/.devcarry
BENCH=${LLAMACPU_CACHE:-$HOME/.cache/llamacpu}/bench
SRC=${LLAMACPU_CACHE:-$HOME/.cache/llamacpu}/llama.cpp-0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp
FILES="llamacpp-1b-q4_0.gguf llamacpp-1b-q4_k_m.gguf $(cd "$BENCH" 2>/dev/null && ls llamacpu-1b-q4_0-*.bin llamacpu-1b-q4_k_m-*.bin 2>/dev/null)"

prepare() {
  set -e
  mkdir -p "$D/pk" /tmp/device-llama
  grep -qx "/.devcarry/" "$REPO/.git/info/exclude" 2>/dev/null || echo "/.devcarry/" >> "$REPO/.git/info/exclude"
  for f in $FILES; do python "$REPO/tools/pack_model.py" pack "$BENCH/$f" "$D/pk/$f.pk"; done
  cp "$BENCH/ckpt-1b/config.json" "$D/"
  python -c "import sys; sys.path.insert(0, '$REPO/tools'); import bench_vs_llamacpp as b; open('$D/bw.c', 'w').write(b.BW_C)"
  gcc -O2 -fopenmp -static "$D/bw.c" -o "$D/bw"   # static: the device may have another libgomp
  # bench_vs_llamacpp.py's builds (its CMAKE_FLAGS), llama-bench only; each built once
  python -c "import sys; sys.path.insert(0, '$REPO/tools'); import bench_vs_llamacpp as b
for v in ('native-noamx', 'avx512', 'avx2'): b.build_llamacpp(v, ['llama-bench'])"
  for b in native-noamx:noamx avx512:zen4 avx2:avx2; do
    mkdir -p "/tmp/device-llama/${b##*:}"
    cp -a "$SRC/build-${b%%:*}"/bin/{llama-bench,libllama-bench-impl.so,libllama-common.so*,libllama.so*,libggml*.so*} \
      "/tmp/device-llama/${b##*:}/"
  done
  strip --strip-unneeded /tmp/device-llama/*/*.so
  tar cJf "$D/llama.tar.xz" -C /tmp/device-llama noamx zen4 avx2
  (cd "$REPO" && "$PY312" setup.py -q build_ext --inplace --build-temp /tmp/device-build312)
  strip --strip-debug "$REPO"/llamacpu/_core.cpython-312-*.so
  du -sh "$D"
}

run() {
  export PYTHONUNBUFFERED=1
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  local t0=$(date +%s) limit=${LIMIT:-570} C=/tmp/lc
  { lscpu; nproc; free -g; python3 -V; } > "$OUT/machine.txt" 2>&1
  grep -E "Model name|^CPU\(s\)|Thread|Core|L3|Model:" "$OUT/machine.txt"
  mkdir -p "$C/bench/ckpt-1b" /tmp/llama
  cp "$D/config.json" "$C/bench/ckpt-1b/"; touch "$C/bench/ckpt-1b/model.safetensors" "$C/bench/llamacpp-1b-bf16.gguf"
  cp "$D/bw" "$D/bw.c" "$C/bench/"
  local S=$C/llama.cpp-0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp
  mkdir -p "$S"; touch "$S/convert_hf_to_gguf.py" "$S/CMakeLists.txt"   # the source is not needed: no build
  for f in "$D"/pk/*.pk; do python3 "$REPO/tools/pack_model.py" unpack "$f" "$C/bench/$(basename "$f" .pk)" & done
  tar xJf "$D/llama.tar.xz" -C /tmp/llama
  wait
  local flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) " v V=avx2
  has() { for x in "$@"; do case "$flags" in *" $x "*) ;; *) return 1;; esac; done; }
  has avx512f avx512bw avx512vl avx512dq avx512vbmi avx512_vnni avx512_bf16 && V=zen4
  has avx512f avx512bw avx512vl avx512dq avx512vbmi avx512_vnni avx512_bf16 avx_vnni && V=noamx
  for v in $V zen4 avx2; do   # the widest build that runs
    LD_LIBRARY_PATH=/tmp/llama/$v /tmp/llama/$v/llama-bench -m "$C/bench/llamacpp-1b-q4_0.gguf" -p 16 -n 4 -r 1 \
      > "$OUT/llama-smoke.txt" 2>&1 && { V=$v; break; }
  done
  echo "llama.cpp build: $V"
  export LD_LIBRARY_PATH=/tmp/llama/$V LLAMACPU_CACHE=$C
  for tr in "$@"; do
    local typ=${tr%%:*} r=${tr##*:} left=$(( limit - ($(date +%s) - t0) ))
    [ $left -lt 60 ] && { echo "no time left for $typ"; break; }
    echo "== $typ -r $r, $left s left"
    timeout $left python3 "$REPO/tools/bench_vs_llamacpp.py" -t "${THREADS:-1,2,4,8,16}" --types "$typ" -r "$r" \
      --quiet-wait 0 --redo 0 --llama-bench /tmp/llama/$V/llama-bench --llama-quantize /bin/true \
      --convert-python python3 ${EXTRA:-} --out "$OUT/scaling-$typ.md" > "$OUT/log-$typ.txt" 2>&1
    echo "rc=$?"; grep "run [0-9]" "$OUT/log-$typ.txt"
  done
  echo "total $(( $(date +%s) - t0 )) s"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash tools/device_scaling.sh prepare | run TYPE:RUNS..." >&2; exit 2 ;;
esac
