#!/usr/bin/env bash
# Usage: tests/tools/bytecheck.sh OLD_BIN NEW_BIN [big]: runs every subcommand with both binaries on the
# committed fixtures (and, with "big", on the bench-small data) and cmp's every output; stdout and
# stderr are compared with the two output folders' paths and the timings masked. For a change
# that must not change any output (a refactor): exit 0 when every output is the same bytes.
set -uo pipefail
OLD=$1; NEW=$2; BIG=${3:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIX=$ROOT/fixtures/tiny
W=$(mktemp -d /tmp/bytecheck.XXXX)
fail=0; n=0
run() { # name, args... (use OUT as output path placeholder)
  local name=$1; shift
  for v in old new; do
    local bin=$OLD; [ $v = new ] && bin=$NEW
    mkdir -p $W/$v
    local args=("${@//OUT/$W/$v/$name}")
    args=("${args[@]//DIR/$W/$v}")
    "$bin" -q --no-sync "${args[@]}" > $W/$v/$name.stdout 2> $W/$v/$name.stderr; echo $? > $W/$v/$name.rc
  done
  n=$((n+1))
  for f in $(cd $W/old && ls -d $name* ); do
    if [ -d $W/old/$f ]; then
      diff -r $W/old/$f $W/new/$f >/dev/null || { echo "DIFF $f"; fail=1; }
    else
      if [[ $f == *.stdout || $f == *.stderr ]]; then
        # Paths differ (old/ and new/); timings differ: compare what remains.
        norm() { sed -E "s#$W/(old|new)#W#g; s/[0-9.]+ s:.*//; s/\"seconds\": [0-9.e-]+//" "$1"; }
        cmp -s <(norm $W/old/$f) <(norm $W/new/$f) || { echo "DIFF $f"; fail=1; }
      else
        cmp -s $W/old/$f $W/new/$f || { echo "DIFF $f"; fail=1; }
      fi
    fi
  done
}
for dt in bf16 f16 f32; do
  B=$FIX/base-$dt.safetensors
  for k in 1 2 3; do
    run slot$k-$dt.safetensors extract --base $B --tuned $FIX/task$k-$dt.safetensors --slot $((k-1))/3 --seed 7 -o OUT
    run ind$k-$dt.safetensors extract --base $B --tuned $FIX/task$k-$dt.safetensors --density 0.3 --seed $((k+4)) -o OUT
  done
  run dense1-$dt.safetensors extract --base $B --tuned $FIX/task1-$dt.safetensors --density 1 -o OUT
  S="DIR/slot1-$dt.safetensors DIR/slot2-$dt.safetensors DIR/slot3-$dt.safetensors"
  I="DIR/ind1-$dt.safetensors DIR/ind2-$dt.safetensors DIR/ind3-$dt.safetensors"
  run mslot-$dt.safetensors merge --base $B $S -o OUT
  run mind-$dt.safetensors merge --base $B $I -o OUT
  run mw-$dt.safetensors merge --base $B $I --weights 0.5,1,-2 -o OUT
  run mr-$dt.safetensors merge --base $B $I --rescale -o OUT
  run msw-$dt.safetensors merge --base $B $S --weights 0.5,-1,3 -o OUT
  run msr-$dt.safetensors merge --base $B $S --rescale -o OUT
  run apn-$dt.safetensors apply --no-rescale --base $B DIR/ind1-$dt.safetensors -o OUT
  run m32-$dt.safetensors merge --base $B $S --dtype f32 -o OUT
  run m64-$dt.safetensors merge --base $B $I --dtype f64 -o OUT
  run mcpu-$dt.safetensors merge --device cpu --base $B $I -o OUT
  run mshard-$dt merge --base $B $S --shard-size 100KB -o OUT
  run ap-$dt.safetensors apply --base $B DIR/ind1-$dt.safetensors -o OUT
  run apd-$dt.safetensors apply --base $B DIR/dense1-$dt.safetensors -o OUT
  run insp-$dt.json inspect --json $I
  run inspb-$dt.json inspect --json --base $B $I
  run insps-$dt.txt inspect --summary $S
  run ver-$dt.txt verify --base $B $S
  run bad-$dt.txt merge --base $FIX/base-f32.safetensors DIR/slot1-bf16.safetensors -o OUT
done
if [ -n "$BIG" ]; then
  D=$ROOT/target/bench/data/small-bf16
  for k in 1 2 3; do
    run bslot$k.st extract --base $D/base.safetensors --tuned $D/tune$k.safetensors --slot $((k-1))/3 -o DIR/bslot$k.safetensors
    run bind$k.st extract --base $D/base.safetensors --tuned $D/tune$k.safetensors --density 0.3333 --seed $k -o DIR/bind$k.safetensors
  done
  run bmslot.safetensors merge --base $D/base.safetensors DIR/bslot1.safetensors DIR/bslot2.safetensors DIR/bslot3.safetensors -o OUT
  run bmind.safetensors merge --base $D/base.safetensors DIR/bind1.safetensors DIR/bind2.safetensors DIR/bind3.safetensors -o OUT
  run bap.safetensors apply --base $D/base.safetensors DIR/bslot1.safetensors -o OUT
  for f in bslot1 bslot2 bslot3 bind1 bind2 bind3; do cmp -s $W/old/$f.safetensors $W/new/$f.safetensors || { echo "DIFF $f"; fail=1; }; done
fi
echo "bytecheck: $n commands, $(ls $W/old | wc -l) files compared; $([ $fail = 0 ] && echo all identical || echo DIFFERENCES)"
rm -rf $W
exit $fail
