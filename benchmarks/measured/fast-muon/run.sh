# run from the repository root (2026-12-02, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy))
DATA=../shared/data/cifar10-jpeg.tar.gz
# accuracy: 20 fresh seeds (40-59) per recipe, Ray tasks two at a time, one thread each; the same seeds for each
# sgd/: the SGD fast preset as it stood (run as one three-norm sweep before the preset changed); at HEAD:
python -m benchmarks.time_to_accuracy --norm bn --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set optimizer=sgd --out results/fast-muon/sgd-bn
python -m benchmarks.time_to_accuracy --norm gn ln --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set optimizer=sgd epochs=3 batch_size=128 stop_at_target=true \
    --out results/fast-muon/sgd-gnln
python -m benchmarks.time_to_accuracy --norm bn --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set optimizer=muon muon_lr=0.225 --out results/fast-muon/bn
python -m benchmarks.time_to_accuracy --norm gn ln --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set optimizer=muon muon_lr=0.2 epochs=2 batch_size=96 stop_at_target=true \
    --out results/fast-muon/gnln
# time to 70%, side by side: one run at a time, 2 threads, idle machine, seeds 60-64 interleaved
python -m benchmarks.time_to_accuracy --norm bn --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd" "optimizer=muon,muon_lr=0.225" --out results/fast-muon/timed-bn
python -m benchmarks.time_to_accuracy --norm gn ln --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd,epochs=3,batch_size=128,stop_at_target=true" \
             "optimizer=muon,muon_lr=0.2,epochs=2,batch_size=96,stop_at_target=true" --out results/fast-muon/timed-gnln
# 2026-12-05, 2-core AMD EPYC without AVX512 (--amp trains in fp32 there), the same side-by-side timing of bn at
# c7c2c39 (timed-bn-epyc/):
python -m benchmarks.time_to_accuracy --norm bn --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd" "" --out results/fast-muon/timed-bn-epyc
