"""FSDP1 (torch's ``FullyShardedDataParallel``, accelerate's ``fsdp_version: 1``) is refused before step 1 with one
line naming what works instead; before, it was taken for a replicated run and its flat shards recorded as tensors.

A real FSDP1 wrapper on CPU over a one-process gloo group (in a child process, so the group never leaks into other
tests): the wrapper itself, the inner module with ``use_orig_params=True`` (views of flat shards), and a Trainer
whose model is the wrapper, which stops in ``on_train_begin``."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import os, sys, tempfile, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from relex_callback.errors import RelexInputError
from relex_callback.trainer.topology import Topology
from relex_callback.examples.toy import build_model, build_tokenizer
seen = []
for orig in (False, True):
    w = FSDP(build_model(build_tokenizer(), hidden_size=32, layers=1), device_id=torch.device("cpu"),
             use_orig_params=orig)
    for m in (w, w.module) if orig else (w,):
        try:
            Topology.from_model(m)
            seen.append("accepted")
        except RelexInputError as e:
            seen.append(str(e))
# the plain model (no FSDP) in the same group is still a single-process run
assert Topology.from_model(build_model(build_tokenizer(), hidden_size=32, layers=1)).mode == "single"
# a Trainer whose model is the FSDP1 wrapper: refused at on_train_begin, before any step
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from fault_child import build_trainer
from relex_callback import RelexCallback
trainer, model, tok = build_trainer(tempfile.mkdtemp(), [RelexCallback(tcut=4, horizons=[8])], max_steps=6)
trainer.model = trainer.model_wrapped = FSDP(model, device_id=torch.device("cpu"))
try:
    trainer.train()
    seen.append("trained")
except RelexInputError as e:
    seen.append(str(e) + " @step %d" % trainer.state.global_step)
dist.destroy_process_group()
print("RESULT", repr(seen))
'''


def test_fsdp1_is_refused_before_step_1_with_one_line():
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", CHILD, REPO], capture_output=True, text=True, env=env, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    seen = eval(line[0][len("RESULT "):])
    assert len(seen) == 4, seen
    for msg in seen:
        assert "FSDP1" in msg and "fsdp_version: 2" in msg and "\n" not in msg.split(" @step")[0], msg
    assert seen[-1].endswith("@step 0"), seen[-1]
