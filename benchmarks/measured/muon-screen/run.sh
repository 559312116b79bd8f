# recorded at commit 4fdba5a, where research/muon.py held the optimizer (git show 4fdba5a:research/muon.py);
# it is now fastcifar/optim.py, and the Muon runs' recipe is the trainer's own flags:
#   python -m fastcifar.train --norm bn --amp --optimizer muon --muon-lr 0.225 --seed S --threads 2 ...
# run from the repository root; each screen writes runs/muon-screen/<run>/screen.json
for seed in 0 1 2 3; do
  for opt in sgd muon; do
    python -m research.screen --optimizer $opt --muon-lr 0.225 -- --norm bn --amp --seed $seed --threads 2 \
      --data ../shared/data/cifar10-jpeg.tar.gz --quiet --no-plots --out runs/muon-screen/bn-$opt-s$seed --overwrite 2>&1 | grep -E "SCREEN|error|Traceback"
  done
done
