# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)), at 390740f /
# 7a7a544 with the `lean-gelu` layout of 4c522e5 as the only uncommitted change ("with uncommitted changes" in
# results.md), when the fast bn recipe was Muon at batch 192 on `lean`
DATA=../shared/data/cifar10-jpeg.tar.gz
# screen: GELU after each block's norm against ReLU on 16 seeds (100-115), two at a time, 1 thread; screen-act/ holds
# each run's screen.json
for seed in $(seq 100 115); do for act in relu gelu; do
  echo python -m research.screen --act $act -- --norm bn --amp --seed $seed --threads 1 --data $DATA --quiet \
      --no-plots --out runs/fast-gelu/bn-$act-s$seed
done; done | xargs -P 2 -I{} sh -c {}
SWEEP="python -m benchmarks.time_to_accuracy --norm bn --executor ray --accuracy-only --cpus-per-run 1 --data $DATA"
# GELU at batch 256 (a quarter fewer steps), at the preset's rates and at lr 0.5 / Muon 0.25, the same 16 seeds
$SWEEP --seeds 16 --first-seed 100 --points "arch=lean-gelu,batch_size=256,lr=0.5,muon_lr=0.25" \
    "arch=lean-gelu,batch_size=256" --out runs/fast-gelu/screen-b256
# on the records' seeds 40-59, so each run pairs with fast-muon-b192/bn/: GELU at batch 192 (bn-b192/), then at 256 (bn-b256/)
$SWEEP --seeds 20 --first-seed 40 --set arch=lean-gelu --out runs/fast-gelu/bn-b192
$SWEEP --seeds 20 --first-seed 40 --set arch=lean-gelu batch_size=256 lr=0.5 muon_lr=0.25 --out runs/fast-gelu/bn-b256
# time to 70%, side by side, idle, one run at a time, 2 threads: the issue's SGD preset, Muon at 192 on `lean`
# (the preset until then), GELU at 192 and at 256 (timed-bn/, seeds 60-64); then again on 8 fresh seeds
# without GELU at 192 (timed-bn-2/, seeds 65-72)
python -m benchmarks.time_to_accuracy --norm bn --seeds 5 --first-seed 60 --data $DATA --points \
    "optimizer=sgd,batch_size=128" "" "arch=lean-gelu" "arch=lean-gelu,batch_size=256,lr=0.5,muon_lr=0.25" \
    --out runs/fast-gelu/timed-bn
python -m benchmarks.time_to_accuracy --norm bn --seeds 8 --first-seed 65 --data $DATA --points \
    "optimizer=sgd,batch_size=128" "" "arch=lean-gelu,batch_size=256,lr=0.5,muon_lr=0.25" --out runs/fast-gelu/timed-bn-2
# in timed-bn/, seed 60's SGD run (20.13 s) shared the machine with a test run; the median of the other four SGD
# runs is 8.42 s, the reported median 8.47 s
