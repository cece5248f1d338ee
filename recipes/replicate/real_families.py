"""Fit families on the real model: the demo's window refitted with every coefficient curve, each horizon scored like
the real checkpoints at the same steps.

    python -m relex_callback.examples.demo                      # (make demo) writes relex_demo/
    PYTHONPATH=. python recipes/replicate/real_families.py --demo relex_demo

The demo's state file holds each tensor's direction v and report.json the coefficients c_t of the window; every
family of relex_callback.core.fit is fitted to those c_t (as the callback would with fit=...), the horizon weights are
theta_0 + c(H) v, and the same held-out greedy evaluation as the demo scores them beside the real checkpoints the demo
saved at each horizon (cosine / norm ratio of the extrapolated vs the real move too). Writes <demo>/families.json.
"""

import argparse
import json
import os

import torch
from relex_callback import load_state
from relex_callback.core.fit import fit
from relex_callback.examples import real_model as rm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="relex_demo", help="the demo's output directory")
    ap.add_argument("--families", default="linear,power,log", help="comma-separated fit families")
    a = ap.parse_args()

    demo = json.load(open(os.path.join(a.demo, "demo.json")))
    st = demo["settings"]
    rep = json.load(open(os.path.join(a.demo, "relex", "report.json")))
    state = load_state(os.path.join(a.demo, "relex"))
    base_dir = rm.prepare_checkpoint(st.get("cache"))
    model, tok = rm.load_model(base_dir)
    torch.set_num_threads(st.get("threads", 2))
    n_train = max(int(h) for h in demo["compute_saved"]) * st["prompts"] + 16
    _, test = rm.split_problems(n_train + st.get("select", 0), st["held_out"], max_operand=st["max_operand"],
                                seed=st["seed"], tokenizer=tok)
    theta0 = rm.flat_params(model)
    steps = torch.tensor(rep["steps"], dtype=torch.float64)
    coeffs = torch.tensor([t["coeffs"] for t in rep["tensors"]], dtype=torch.float64)  # [S, r, T]
    order = {t["name"]: i for i, t in enumerate(rep["tensors"])}
    tcut = int(rep["tcut"])
    real_tcut = rm.read_checkpoint_weights(os.path.join(a.demo, "real", f"step-{tcut}"), set(theta0))
    rows = []
    for fam in a.families.split(","):
        curve = fit(coeffs, steps, None, fam)
        for h in sorted(int(k) for k in demo["compute_saved"]):
            c = curve.coef_at(h)  # [S, r]
            w = {}
            for i, spec in enumerate(state.specs):
                v = state.tensors[spec.name][: state.rank].to(torch.float32)
                j = order[spec.name]
                w[spec.name] = (theta0[spec.name].reshape(-1).float()
                                + (c[j].to(torch.float32)[:, None] * v).sum(0)).reshape(theta0[spec.name].shape)
            for n in theta0:
                w.setdefault(n, real_tcut[n])  # untracked tensors: as trained to tcut (none for this model)
            real = rm.read_checkpoint_weights(os.path.join(a.demo, "real", f"step-{h}"), set(theta0))
            dp = torch.cat([(w[n].float() - theta0[n].float()).reshape(-1) for n in theta0]).double()
            dr = torch.cat([(real[n].float() - theta0[n].float()).reshape(-1) for n in theta0]).double()
            rm.load_weights(model, w)
            acc = rm.greedy_accuracy(model, tok, test, max_new_tokens=st["max_new_tokens"])
            rows.append({"family": fam, "step": h, "held_out": acc, "cosine": float(dp @ dr / (dp.norm() * dr.norm())),
                         "norm_ratio": float(dp.norm() / dr.norm()), "r2_mean": float(curve.r2[:, 0].mean())})
            print(json.dumps(rows[-1]), flush=True)
    real_acc = {r["step"]: r["held_out"] for r in demo["rows"] if r["model"].startswith("real")}
    out = {"tcut": tcut, "real_held_out": real_acc, "rows": rows}
    with open(os.path.join(a.demo, "families.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'family':<8} {'step':>5} {'held-out':>9} {'real':>6} {'cosine':>7} {'norm':>6}")
    for r in rows:
        print(f"{r['family']:<8} {r['step']:>5} {r['held_out']:>9.3f} {real_acc.get(r['step'], float('nan')):>6.3f} "
              f"{r['cosine']:>7.3f} {r['norm_ratio']:>6.3f}")


if __name__ == "__main__":
    main()
