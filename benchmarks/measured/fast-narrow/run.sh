# run from the repository root (2026-12-05, 2-core AMD EPYC without AVX512: --amp trains in fp32 there;
# CIFAR-10 (JPEG copy)). Narrower stride-2 layouts under the fast preset's bn recipe (Muon 0.225 + SGD 0.45,
# 2 epochs, batch 128), seed 0, 1 thread per run, two runs at once beside the test suite (times are not speeds).
# Each bn-<layout>-s<seed>.json is the screen's SCREEN line with the run's metrics.json under "metrics".
for spec in "c32p c32 c46p c46" "c24p c32 c40p c48" "c24p c36 c44p c50" "c20p c32 c48p c56"; do
  python -m research.screen --stem-stride 2 --layout "$spec" -- --norm bn --amp --seed 0 --threads 1 \
    --data ../shared/data/cifar10-jpeg.tar.gz --quiet --no-plots --out "runs/fast-narrow/${spec// /-}-s0"
done
