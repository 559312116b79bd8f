# run from the repository root (2026-12-06, 2-core Intel Xeon with AMX, bf16, CIFAR-10 (JPEG copy)), at 41164cb / ef452bc,
# when the fast bn recipe was still Muon at batch 128 (the "(with uncommitted changes)" of some results.md: research/
# screen.py, which these commands do not import)
DATA=../shared/data/cifar10-jpeg.tar.gz
SWEEP="python -m benchmarks.time_to_accuracy --norm bn --executor ray --accuracy-only --cpus-per-run 1 --data $DATA"
# screens, 8 seeds (100-107), Ray, two at a time, 1 thread: batch 160-256 at several learning rates, then levers at 192
$SWEEP --seeds 8 --first-seed 100 --points "" "batch_size=160,lr=0.5,muon_lr=0.25" "batch_size=160,lr=0.56,muon_lr=0.28" \
    "batch_size=192,lr=0.55,muon_lr=0.275" "batch_size=192,lr=0.62,muon_lr=0.31" --out results/fast-muon-b192/screen-A
$SWEEP --seeds 8 --first-seed 100 --points "batch_size=192" "batch_size=192,lr=0.5,muon_lr=0.25" \
    "batch_size=192,lr=0.55,muon_lr=0.225" "batch_size=192,muon_ns_steps=5" "batch_size=256,lr=0.5,muon_lr=0.25" \
    --out results/fast-muon-b192/screen-C
$SWEEP --seeds 8 --first-seed 100 --points "batch_size=192,lr=0.4" "batch_size=192,lr=0.35,muon_lr=0.2" \
    "batch_size=192,muon_lr=0.25" "batch_size=192,muon_lr=0.2" "batch_size=192,label_smoothing=0.2" \
    --out results/fast-muon-b192/screen-D
$SWEEP --seeds 8 --first-seed 100 --points "batch_size=192,muon_ns_steps=2" "batch_size=192,weight_decay=0.001" \
    "batch_size=192,weight_decay=0.00025" "batch_size=192,label_smoothing=0.05" "muon_ns_steps=2" \
    --out results/fast-muon-b192/screen-E
# the best-looking levers at 192, on 16 fresh seeds (108-123)
$SWEEP --seeds 16 --first-seed 108 --points "batch_size=192" "batch_size=192,weight_decay=0.00025,label_smoothing=0.05" \
    "batch_size=192,muon_ns_steps=2,weight_decay=0.00025,label_smoothing=0.05" --out results/fast-muon-b192/screen-F
# a first timing, 3 seeds, idle, one run at a time, 2 threads (timed-b256/)
python -m benchmarks.time_to_accuracy --norm bn --seeds 3 --first-seed 60 --data $DATA --points "optimizer=sgd" "" \
    "batch_size=192,lr=0.55,muon_lr=0.275" "batch_size=256,lr=0.55,muon_lr=0.275" --out results/fast-muon-b192/timed-b256
# the record: batch 192 on the ns3 record's seeds 40-59, so each run pairs with its batch-128 run (bn/)
$SWEEP --seeds 20 --first-seed 40 --set batch_size=192 --out results/fast-muon-b192/bn
# time to 70%, side by side, idle, one run at a time, 2 threads, seeds 60-64 interleaved (timed-bn/): the SGD preset
# of the issue, Muon at batch 128 (the preset until then), Muon at 192. With 192 the default, the same three are
# "optimizer=sgd,batch_size=128" "batch_size=128" ""
python -m benchmarks.time_to_accuracy --norm bn --seeds 5 --first-seed 60 --data $DATA \
    --points "optimizer=sgd" "" "batch_size=192" --out results/fast-muon-b192/timed-bn
