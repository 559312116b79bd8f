# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)), at 3120b3e:
# the best preset's bn recipe (SGD 0.2, batch 128, 20 epochs) on the layout now named `separable-res`, built from
# its spec by research.screen. Each bn-s<seed>.json is the run's metrics.json, its "arch" set to the ARCHS name of
# that spec. Seeds 0 and 1: 1 thread each, the two at once, scored at epochs 8, 14 and 20; seed 2: 2 threads,
# alone on the idle machine, scored at epoch 20 only: its training time is the layout's time for 20 epochs.
DATA=../shared/data/cifar10-jpeg.tar.gz
SPEC="d36p d48 d64 d64r d80p d96 d96r d112p"
for seed in 0 1; do
  python -m research.screen --layout "$SPEC" --eval-epochs 8,14 -- --norm bn --amp --preset best --seed $seed \
      --threads 1 --data $DATA --quiet --no-plots --out runs/best-separable-res/bn-s$seed &
done; wait
python -m research.screen --layout "$SPEC" -- --norm bn --amp --preset best --seed 2 --threads 2 --data $DATA \
    --quiet --no-plots --out runs/best-separable-res/bn-s2
# the same, now the preset's own layout for bn:
# python -m fastcifar.train --norm bn --amp --preset best --seed 2 --data $DATA
# seeds 3 and 4 through the trainer itself, once separable-res was the preset's bn layout (at 1436f62; 1 thread
# each, the two at once, every epoch scored); bn-s3.json and bn-s4.json are their metrics.json
for seed in 3 4; do
  python -m fastcifar.train --norm bn --amp --preset best --seed $seed --threads 1 --data $DATA --quiet --no-plots \
      --out runs/best-separable-res/bn-s$seed &
done; wait
