#!/bin/bash
# BLEU of --int8 --aot against float32 --aot (and eager --int8, float32) on newstest2016 and the book, beam 5
cd /work/main
M=runs/small-enro-compile/model
export SEQ2SEQ_DIFF_AOT_CACHE=${OUT:-/tmp}/bleu-aot
for set in book/gimp-manual-heldout test/newstest2016; do
  IN=data/en-ro/$set.en; REF=data/en-ro/$set.ro; name=$(basename $set)
  for v in f32 int8 f32-aot int8-aot; do
    flags=""
    case $v in int8*) flags="--int8";; esac
    case $v in *aot) flags="$flags --aot";; esac
    out=${OUT:-/tmp}/$name-$v.ro
    s=$(date +%s.%N)
    python3 cli.py translate --model $M --input $IN --output $out --beam-size 5 --quiet $flags 2>${OUT:-/tmp}/$name-$v.err
    e=$(date +%s.%N)
    bleu=$(python3 cli.py evaluate --hyp $out --ref $REF --json 2>/dev/null | grep -o '"score": [0-9.]*' | head -1)
    echo "$name beam 5 $v ($flags): $(echo "$e - $s" | bc) s, $(wc -l < $out) lines, $bleu, lines differing from f32: $(diff ${OUT:-/tmp}/$name-f32.ro $out | grep -c '^>')"
  done
done
