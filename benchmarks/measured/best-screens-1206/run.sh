# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)). The best
# preset (separable, 20 epochs) on bn seed 0, scored at epochs 8, 14 and 20; 1 thread per run, two runs at once
# (times are not speeds). Each <name>-s0.json is the screen's SCREEN record with the run's metrics.json under
# "metrics". Compare with SGD's 85.92% and Muon's 85.75% on the same seed (best-separable/, best-muon/).
DATA=../shared/data/cifar10-jpeg.tar.gz
COMMON="--norm bn --amp --preset best --seed 0 --threads 1 --data $DATA --quiet --no-plots"
# Muon with more regularization (at 34c8c8a, when Muon always ran 5 Newton-Schulz steps)
python -m research.screen --eval-epochs 8,14 -- $COMMON --optimizer muon --muon-lr 0.1 --muon-ns-steps 5 \
    --label-smoothing 0.2 --out runs/best-screens-1206/bn-muon-ls02
python -m research.screen --eval-epochs 8,14 -- $COMMON --optimizer muon --muon-lr 0.1 --muon-ns-steps 5 \
    --cutout 8 --out runs/best-screens-1206/bn-muon-cut8
# SGD (the preset's recipe) on layouts with the same parameters spent higher up (at b9a5af7 and 02e861f)
python -m research.screen --layout "d36p d48 d64 d72p d104 d104 d136p" --eval-epochs 8,14 -- $COMMON \
    --out runs/best-screens-1206/bn-sgd-last8
python -m research.screen --layout "d40p d56 d72 d84p d100 d100p d112" --eval-epochs 8,14 -- $COMMON \
    --out runs/best-screens-1206/bn-sgd-wide-early
# shortcut blocks (layout token r; at 3120b3e), SGD, the preset's recipe
python -m research.screen --layout "d32p d48 d64 d64r d88p d88r d88r d128p" --eval-epochs 8,14 -- $COMMON \
    --out runs/best-screens-1206/bn-sgd-res-a
python -m research.screen --layout "d36p d48 d64 d64r d80p d96 d96r d112p" --eval-epochs 8,14 -- $COMMON \
    --out runs/best-screens-1206/bn-sgd-res-b
# the kept bn layout (separable-res) on ln, seeds 0 and 1, the preset's ln recipe (SGD 0.1), at 3120b3e
for seed in 0 1; do
  python -m research.screen --layout "d36p d48 d64 d64r d80p d96 d96r d112p" --eval-epochs 8,14 -- --norm ln --amp \
      --preset best --seed $seed --threads 1 --data $DATA --quiet --no-plots --out runs/best-screens-1206/ln-sgd-res-b-s$seed &
done; wait
