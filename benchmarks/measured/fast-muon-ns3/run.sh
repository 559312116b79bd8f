# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)), at b9a5af7,
# when the recipes still ran 5 Newton-Schulz steps by default
DATA=../shared/data/cifar10-jpeg.tar.gz
# time to 70%, side by side: one run at a time, 2 threads, idle machine, seeds 60-64 interleaved (timed-bn/):
# the SGD preset of the issue, Muon with 5 steps (the preset until then), Muon with 3
python -m benchmarks.time_to_accuracy --norm bn --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd" "" "muon_ns_steps=3" --out results/fast-muon-ns3/timed-bn
# accuracy: the fast-muon record's seeds 40-59, so each run pairs with its 5-step run; Ray, two at a time, 1 thread
python -m benchmarks.time_to_accuracy --norm bn --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set muon_ns_steps=3 --out results/fast-muon-ns3/bn
python -m benchmarks.time_to_accuracy --norm ln --seeds 20 --first-seed 40 --executor ray --accuracy-only \
    --cpus-per-run 1 --data $DATA --set muon_ns_steps=3 --out results/fast-muon-ns3/ln
# ln's time to 70% with 3 steps, side by side with the SGD recipe it replaced (at 65a6bfb, 3 steps the default):
python -m benchmarks.time_to_accuracy --norm ln --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd,epochs=3,batch_size=128,stop_at_target=true" "" --out results/fast-muon-ns3/timed-ln
