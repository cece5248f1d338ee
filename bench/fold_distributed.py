"""The streaming fold in a real 2-process DeepSpeed ZeRO-3 run (CPU, gloo): buffer bytes per process, end-of-window
time and the extrapolated weights against the exact path, as tcut grows at a fixed number of ring slots.

    PYTHONPATH=. python bench/fold_distributed.py [--tcuts 25,50,100] [--slots 8] [--fold-rank 8] [--hidden 64]

For each tcut two GRPO runs of the same tiny model on the same data (the run is deterministic: seed 0, one thread per
process) go to tcut under ``accelerate launch`` with ``tests/configs/zero3_cpu.yaml``: one exact (the whole window
in the buffer), one folded (``buffer_slots``/``fold_rank``). Printed per tcut: each process's buffer bytes, the
end-of-window seconds (process 0: solve + gather + write), the number of folds, and the folded horizon checkpoint
(H = 2 tcut) against the exact one: cosine of the moves theta_H - theta_0 over all tensors, the worst tensor's
cosine, and the relative error ||theta_fold - theta_exact|| / ||theta_exact - theta_0||. Figures only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, "tests", "dist_scripts", "train_grpo.py")
CONFIG = os.path.join(REPO, "tests", "configs", "zero3_cpu.yaml")


def launch(out, port, args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_DISABLED="true")
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file", CONFIG,
           "--main_process_port", str(port), SCRIPT, out, "--record-until", "0", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    return time.perf_counter() - t, [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(2)]


def weights(path):
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tcuts", default="25,50,100")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--fold-rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    port = 29900 + os.getpid() % 50
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tcut in [int(x) for x in a.tcuts.split(",")]:
            H = 2 * tcut
            common = ["--tcut", str(tcut), "--horizons", str(H), "--exclude", "norm", "--hidden", str(a.hidden),
                      "--hidden-layers", str(a.layers), "--lr", str(a.lr)]
            res = {}
            for kind, extra in (
                ("exact", []),
                ("folded", ["--buffer-slots", str(a.slots), "--fold-rank", str(a.fold_rank)]),
            ):
                out = os.path.join(tmp, f"{kind}-{tcut}")
                port += 1
                wall, info = launch(out, port, common + extra)
                res[kind] = (out, wall, info)
                print(f"tcut {tcut} {kind}: {wall:.0f} s wall, buffer bytes per process "
                      f"{[i['buffer_bytes'] for i in info]}, folds {info[0]['folds']}, end of window "
                      f"{info[0]['end_of_window_seconds']:.2f} s", flush=True)
            theta0 = torch.load(os.path.join(res["exact"][0], "trajectory.pt"))["snaps"][0]
            ex = weights(os.path.join(res["exact"][0], "relex", f"step-{H}"))
            fo = weights(os.path.join(res["folded"][0], "relex", f"step-{H}"))
            keys = [k for k in theta0 if k in ex and "norm" not in k]
            de = torch.cat([(ex[k].double() - theta0[k].double()).flatten() for k in keys])
            df = torch.cat([(fo[k].double() - theta0[k].double()).flatten() for k in keys])
            worst = min(
                float(
                    torch.nn.functional.cosine_similarity(
                        (fo[k].double() - theta0[k].double()).flatten(),
                        (ex[k].double() - theta0[k].double()).flatten(),
                        dim=0,
                    )
                )
                for k in keys
                if (ex[k].double() - theta0[k].double()).norm() > 0
            )
            rows.append({
                "tcut": tcut, "H": H, "slots": a.slots, "fold_rank": a.fold_rank,
                "buffer_bytes_exact": [i["buffer_bytes"] for i in res["exact"][2]],
                "buffer_bytes_folded": [i["buffer_bytes"] for i in res["folded"][2]],
                "folds": res["folded"][2][0]["folds"],
                "end_of_window_s_exact": res["exact"][2][0]["end_of_window_seconds"],
                "end_of_window_s_folded": res["folded"][2][0]["end_of_window_seconds"],
                "cosine": float(de @ df / (de.norm() * df.norm())), "worst_tensor_cosine": worst,
                "relative_error": float((df - de).norm() / de.norm()),
                "tracked_elements_per_process": [i["tracked_elements_this_rank"] for i in res["folded"][2]],
            })
    print()
    print(f"{'tcut':>5} {'H':>4} {'exact B/proc':>13} {'folded B/proc':>14} {'folds':>5} {'eow exact s':>11} "
          f"{'eow fold s':>10} {'cosine':>9} {'worst':>9} {'rel err':>9}")
    for r in rows:
        print(f"{r['tcut']:>5} {r['H']:>4} {r['buffer_bytes_exact'][0]:>13,} {r['buffer_bytes_folded'][0]:>14,} "
              f"{r['folds']:>5} {r['end_of_window_s_exact']:>11.2f} {r['end_of_window_s_folded']:>10.2f} "
              f"{r['cosine']:>9.6f} {r['worst_tensor_cosine']:>9.6f} {r['relative_error']:>9.2e}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
