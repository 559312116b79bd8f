# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)): the best
# preset's bn recipe (SGD 0.2, batch 128, 20 epochs) on `separable-res` with GELU after each block's norm, the
# layout now named `separable-res-gelu`. bn-s0.json and bn-s1.json are the metrics of the screens in
# best-screens-1206b/ (research.screen --act gelu at a98a621; scored at epochs 8, 14 and 20), their "arch" set to the
# ARCHS name of that layout. bn-s2..s4.json are the trainer's metrics.json: seeds 2 and 3 with 1 thread each, the
# two at once, every epoch scored; seed 4 with 2 threads alone on the idle machine: its training time is the
# layout's time for 20 epochs.
DATA=../shared/data/cifar10-jpeg.tar.gz
for seed in 2 3; do
  python -m fastcifar.train --norm bn --amp --preset best --arch separable-res-gelu --seed $seed --threads 1 \
      --data $DATA --quiet --no-plots --out runs/best-separable-res-gelu/bn-s$seed &
done; wait
python -m fastcifar.train --norm bn --amp --preset best --arch separable-res-gelu --seed 4 --threads 2 --data $DATA \
    --quiet --no-plots --out runs/best-separable-res-gelu/bn-s4
# now the preset's own layout for bn:
# python -m fastcifar.train --norm bn --amp --preset best --seed 4 --data $DATA
# GELU's step against ReLU's, side by side in one run (idle, 2 threads, random data; throughput/ at a8761ac):
python -m benchmarks.throughput --arch separable-res separable-res-gelu --norm bn --precision bf16 --threads 2 \
    --batch-size 128 --out runs/best-separable-res-gelu/throughput
