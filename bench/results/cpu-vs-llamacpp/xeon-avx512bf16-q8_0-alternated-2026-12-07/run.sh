#!/bin/bash
# ik_llama.cpp and mla-engine alternated, int8 / Q8_0 weights, pp512, tg32, tg32 @ d512 and d4096, 3 rounds
out=/tmp/alt_q8; mkdir -p $out
for r in 1 2 3; do
  date -u +%H:%M:%S > $out/ik-$r.time
  /work/build/ik_llama.cpp/build/bin/llama-bench -m /work/build/cut27/ik_llama.cpp-q8_0.gguf -mla 3 -fa 1 -fmoe 1 -rtr 1 -t 2 -r 1 -p 512 -n 32 -gp 512,32 -gp 4096,32 -o json > $out/ik-$r.json 2> $out/ik-$r.err
  date -u +%H:%M:%S > $out/mla-$r.time
  mla bench --model /work/build/cut27/model --weight-dtype int8 -p 512 -n 0 -r 1 --output json > $out/mla-pp-$r.json 2> $out/mla-pp-$r.err
  mla bench --model /work/build/cut27/model --weight-dtype int8 -p 0 -n 32 -d 0,512,4096 -r 1 --output json > $out/mla-$r.json 2> $out/mla-$r.err
done
echo done > $out/DONE
