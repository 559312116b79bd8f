# Record: the step-throughput timer behind the depthwise-separable entry of benchmarks/NOTES.md
# (run as python tp.py deep|tv from this folder, beside screen.py; it reads ./screen.py).
import sys, time, torch, torch.nn.functional as F
sys.argv = ["x", "--layout", sys.argv[1]]
exec(open("screen.py").read().split("# evaluate only")[0])
import fastcifar.models as M
torch.set_num_threads(2)
for norm in ["bn", "gn"]:
    m = T.make_model(norm=norm, arch=a.layout if a.layout in M.ARCHS else None).train()
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    with FlopCounterMode(display=False) as fc:
        if True:
            F.cross_entropy(m(x).float(), y).backward()
    for i in range(23):
        if i == 3: t = time.perf_counter()
        if True:
            F.cross_entropy(m(x).float(), y).backward()
        opt.step(); opt.zero_grad()
    dt = (time.perf_counter() - t) / 20
    print(a.layout, norm, M.count_params(m), f"{fc.get_total_flops()/128/1e6:.1f} MFLOP/img", f"{128/dt:.0f} img/s", f"20 ep {20*50000/(128/dt)/60:.1f} min")
