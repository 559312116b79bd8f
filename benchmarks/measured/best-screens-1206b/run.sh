# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)), with
# research/screen.py as of a98a621: the best preset, scored at epochs 8, 14 and 20; 1 thread per run, two runs at once
# (times are not speeds; bn-gelu-s0 and bn-mixg-s0 also shared the cores with a test run). Each <name>.json is the screen's SCREEN record with the run's
# metrics.json under "metrics". Compare with separable-res's bn seeds 0 / 1 (86.28 / 86.13%, best-separable-res/)
# and separable's gn seed 0 (84.85%, best-separable-gnln/).
DATA=../shared/data/cifar10-jpeg.tar.gz
COMMON="--amp --preset best --threads 1 --data $DATA --quiet --no-plots"
# bn on separable-res: GELU after each norm (the whitening stem keeps ReLU), and the head's global max pool
# replaced by the mean of max and average pooling
python -m research.screen --act gelu --eval-epochs 8,14 -- --norm bn --seed 0 $COMMON --out runs/best-screens-1206b/bn-gelu-s0 &
python -m research.screen --mix-pool global --eval-epochs 8,14 -- --norm bn --seed 0 $COMMON \
    --out runs/best-screens-1206b/bn-mixg-s0 &
wait
python -m research.screen --act gelu --eval-epochs 8,14 -- --norm bn --seed 1 $COMMON --out runs/best-screens-1206b/bn-gelu-s1 &
# gn: separable's parameters with a shortcut around its 8x8 pair, the last pair pooled after its conv (+9% norm work)
python -m research.screen --layout "d36p d48 d64 d72p d104 d104r d136p" --eval-epochs 8,14 -- --norm gn --seed 0 \
    $COMMON --out runs/best-screens-1206b/gn-res-s0 &
wait
