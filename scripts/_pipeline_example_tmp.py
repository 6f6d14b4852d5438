import sys; sys.path.insert(0,'/work/main')
import torch, tvm, time, numpy as np
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
import targets
from compiler import pipeline
class M(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.c=torch.nn.Conv2d(3,16,3,padding=1); s.bn=torch.nn.BatchNorm2d(16); s.c2=torch.nn.Conv2d(16,16,3,padding=1,groups=16); s.fc=torch.nn.Linear(16,10)
    def forward(s,x): return s.fc(torch.relu(s.c2(torch.relu(s.bn(s.c(x))))).mean((2,3)))
m=M().eval(); x=torch.randn(1,3,32,32)
mod=from_exported_program(torch.export.export(m,(x,)))
t=targets.get("x86")
mod=pipeline.prepare(mod,t); mod=pipeline.fuse(mod,t); mod=pipeline.schedule(mod,t)
print([gv.name_hint for gv in mod.functions])
ex=pipeline.build(mod,t)
vm=relax.VirtualMachine(ex,tvm.cpu())
out=vm["main"](tvm.runtime.tensor(x.numpy()))
print(type(out), out[0].numpy()[0,:4], m(x)[0,:4])
