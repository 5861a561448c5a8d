"""Why is the private expert `misconceptions` an attractor of Arrow routing?

    python docs/reproduction/attractor.py              # print the tables from the committed record
    python docs/reproduction/attractor.py --run [--library assets/library] [--limit 10] [--hidden routed|base]

The shipped library's routing statistics (`routing.json`, arrow@private) make `misconceptions` the
most-routed expert on every seen inference and sentiment task and on the held-out
presuppositions_as_nli. Arrow's prototypes v_{e,m} (Ostapenko et al., 2024, Sec. 4.2: the top
right singular vector of ΔW = B·A, `lorlib_ui.core.prototypes`) are unit vectors, so no norm
explains it. This script runs the first `--limit` test prompts of the 26 seen and 7 held-out tasks,
keeps every token's scores h·v at the input h of each LoRA'd module m (q_proj and v_proj of 30
layers), and, over the 26 private experts, measures:

1. routing: the mean logit |h·v| over content tokens and over chat-template tokens; the expert's
   share of top-1 (content token, module) choices, pooled and as a mean over tasks (long prompts
   weigh more when pooled); the tasks it is most routed on, by summed top-k softmax weight over
   content tokens and modules (as `routing-stats` ranks them);
2. alignment with directions every token shares: |cos(v, μ_m)|, with μ_m the mean content hidden
   state at m over all tasks' tokens; the same with μ^template_m, the template tokens' mean; the
   logit of the mean, |μ_m·v|, and of the rest, mean |(h − μ_m)·v|; and |μ_m·v| / mean |h·v|, the
   share of the mean logit that the mean hidden state alone gives;
3. the spectrum of ΔW: σ1/σ2 and σ1/‖ΔW‖_F;
4. Spearman's correlation across the 26 experts between the top-1 share and each measure, and
   where misconceptions ranks on each;
5. a counterfactual: the same routing of h − μ_m (centred by the content or the template mean);
   only routing is recomputed, the hidden states stay those of the run.

Measures over modules are means over the 60 modules. By default h is what lorlib routes on: the
input of each layer in the model routed by arrow@private, which carries the expert updates of the
layers before it; `--hidden base` takes the base model's instead. The record (`--out`) holds every
per-expert number, the tasks each expert is most routed on (and those `routing.json` stores), each
expert's top-1 share and |μ·v| per module, the Spearman table, the counterfactuals and the sanity
checks (one logit by hand, the router's own logits and weights on the first prompt, prototypes
recomputed from the weights). About two minutes on two CPU cores. Describes; chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
ATTRACTOR = "misconceptions"


def topk_weights(logits, k: int, temperature: float):
    """Arrow's weights (tokens, experts): softmax(logit / T) over each token's top k, 0 elsewhere."""
    top, index = logits.topk(k, dim=1)
    return logits.new_zeros(logits.shape).scatter_(1, index, (top / temperature).softmax(dim=1)), index


def capture(rm, router, private, protos, prompts, prefix, suffix, hidden):
    """Run every prompt once. Returns per module the signed scores h·v (tokens, experts) and the
    sums of h over content and template tokens; which tokens are content; each token's task; and
    checks on the first prompt: one logit by hand and, when routed, the router's logits and weights."""
    import torch

    n, d = sum(len(ids) for _, ids in prompts), next(iter(protos.values())).shape[1]
    experts = [rm.experts[i] for i in private]
    scores = {m: torch.empty(n, len(private)) for m in rm.modules}
    sums = {m: torch.zeros(2, d, dtype=torch.float64) for m in rm.modules}
    content, task_of = torch.zeros(n, dtype=torch.bool), torch.empty(n, dtype=torch.long)
    inputs = {}  # module -> this prompt's inputs h (tokens, d_in), from a hook on the routed layer

    def keep(layer, args):
        inputs[layer.name] = args[0][0].float()

    hooks = [rm.layers[m].register_forward_pre_hook(keep) for m in rm.modules]
    at, checks = 0, {}
    for p, (task, ids) in enumerate(prompts):
        routing = rm.routing(router, record=p == 0) if hidden == "routed" else nullcontext()
        with torch.inference_mode(), routing as builder:
            rm.model(input_ids=torch.tensor([ids], device=rm.device))
        span, own = slice(at, at + len(ids)), torch.zeros(len(ids), dtype=torch.bool)
        own[prefix : len(ids) - suffix] = True
        content[span], task_of[span] = own, task
        for m in rm.modules:
            scores[m][span] = inputs[m] @ protos[m].T
            sums[m] += torch.stack([inputs[m][own].sum(0), inputs[m][~own].sum(0)])
        if p == 0:  # one logit by hand; the router's own logits and weights on this prompt
            m, t, j = rm.modules[-1], prefix, experts.index(ATTRACTOR)
            checks["hand_logit"] = abs(sum(a * b for a, b in zip(inputs[m][t].tolist(), protos[m][j].tolist())))
            checks["script_logit"] = float(scores[m][t, j].abs())
            if builder is not None:
                logits = {x: torch.cat(builder.logits[x])[:, private] for x in rm.modules}
                weights = {x: torch.cat(builder.weights[x])[:, private] for x in rm.modules}
                ours = {x: scores[x][span].abs() for x in rm.modules}
                checks["router_logit"] = float(logits[m][t, j])
                checks["max_logit_diff"] = max(float((logits[x] - ours[x]).abs().max()) for x in ours)
                checks["max_weight_diff"] = max(
                    float((weights[x] - topk_weights(ours[x], router.top_k, router.temperature)[0]).abs().max())
                    for x in ours
                )
        at += len(ids)
    for hook in hooks:
        hook.remove()
    return scores, sums, content, task_of, checks


def route(scores, protos, centre, content, task_of, n_tasks, router):
    """Arrow's routing of h − centre[m] (of h itself when centre is None), from the scores h·v:
    top-1 counts (tasks, modules, experts) over content tokens, and per task the index of the
    expert with the largest top-k weight summed over its content tokens and the modules."""
    import torch

    n_experts = next(iter(scores.values())).shape[1]
    top1, mass = torch.zeros(n_tasks, len(scores), n_experts), torch.zeros(n_tasks, n_experts)
    for j, (m, s) in enumerate(scores.items()):
        logits = (s if centre is None else s - protos[m] @ centre[m]).abs()
        weights, index = topk_weights(logits, router.top_k, router.temperature)
        top1[:, j].index_put_((task_of[content], index[content, 0]), torch.ones(()), accumulate=True)
        mass.index_add_(0, task_of[content], weights[content])
    return top1.numpy(), mass.argmax(dim=1).tolist()


def shares(top1):
    """(experts,) top-1 shares from counts (tasks, modules, experts): pooled over all content
    token-module pairs (long prompts weigh more), and the mean over tasks of each task's share."""
    pooled = top1.sum((0, 1)) / top1.sum()
    per_task = top1.sum(1) / top1.sum((1, 2))[:, None]
    return pooled, per_task.mean(0)


def spectrum(library, experts, protos):
    """(modules, experts, 2): σ1/σ2 and σ1/‖ΔW‖_F of each ΔW = B·A (the singular values of the
    r x r core R_B R_Aᵀ, as in `lorlib_ui.core.prototypes`); and the largest 1 − |cos| between a
    prototype recomputed from the weights and the one the routed model holds."""
    import numpy as np
    import torch

    from lorlib_ui.core.prototypes import prototypes_for_adapter

    ratios, drift = np.zeros((len(protos), len(experts), 2)), 0.0
    for e, name in enumerate(experts):
        factors = {m: f for m, f in library.load_adapter(name).factors.items() if m in protos}
        recomputed = prototypes_for_adapter(factors)
        for j, m in enumerate(protos):
            a, b = (f.double() for f in factors[m])
            sigma = torch.linalg.svdvals(torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T)
            ratios[j, e] = float(sigma[0] / sigma[1]), float(sigma[0] / sigma.norm())
            drift = max(drift, 1 - abs(float(recomputed[m] @ protos[m][e])))
    return ratios, drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the model (about two minutes) and save the record")
    parser.add_argument("--library", default=str(ROOT / "assets" / "library"))
    parser.add_argument("--limit", type=int, default=10, help="test prompts per task (default 10)")
    parser.add_argument("--hidden", choices=("routed", "base"), default="routed", help="whose hidden states")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reproduction" / "records" / "attractor.json"))
    args = parser.parse_args()
    out = Path(args.out)
    if args.run:
        run(args, out)
    elif not out.exists():
        sys.exit(f"no record {out}: run with --run first")
    record = json.loads(out.read_text())
    print(
        f"{len(record['tasks'])} tasks, {record['tokens']['content']} content and {record['tokens']['template']} "
        f"template tokens, {len(record['modules'])} modules; hidden states: {record['hidden']}; "
        f"{record['limit']} {record['split']} prompts per task"
    )
    print(f"checks: {json.dumps(record['checks'])}")
    a = record["experts"].index(ATTRACTOR)
    leads = sum(max(range(len(row)), key=row.__getitem__) == a for row in record["mu_logit_by_module"].values())
    print(f"modules where {ATTRACTOR} has the largest |μ·v| of the {len(record['experts'])} experts: {leads}\n")
    print_tables(record)


def run(args, out: Path) -> None:
    """Run the model, measure, and write the record to `out`."""
    import numpy as np
    import torch

    from lorlib_ui.analysis.evaluation import select_tasks, test_rows
    from lorlib_ui.analysis.routing_stats import load_routing
    from lorlib_ui.analysis.stats import spearman
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.prompting import encode_prompt, template_span
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    torch.set_num_threads(1)
    started = time.time()
    library = Library.open(args.library)
    data = load_tasks(library.data_source())
    tasks = select_tasks(library, "all", data)  # the held-out tasks, then the seen ones
    rm = RoutedModel.load(library, device="cpu")
    router = make_router("arrow@private", library.names, groups=library.groups())
    private = list(router.subset)
    experts = [rm.experts[i] for i in private]
    protos = {m: rm.layers[m].prototypes[private].float() for m in rm.modules}  # (experts, d_in), unit rows
    chat = bool(rm.tokenizer.chat_template)
    prefix, suffix = template_span(rm.tokenizer, chat)
    prompts = [
        (i, encode_prompt(rm.tokenizer, row["input"], chat))
        for i, task in enumerate(tasks)
        for row in test_rows(data, task, args.limit)
    ]
    scores, sums, content, task_of, checks = capture(rm, router, private, protos, prompts, prefix, suffix, args.hidden)
    mu = {m: (s[0] / content.sum()).float() for m, s in sums.items()}
    mu_template = {m: (s[1] / (~content).sum()).float() for m, s in sums.items()}
    centres = {"h": None, "h − μ": mu, "h − μ^template": mu_template}
    runs = {k: route(scores, protos, c, content, task_of, len(tasks), router) for k, c in centres.items()}
    top1, most_routed = runs["h"][0], [experts[i] for i in runs["h"][1]]
    ratios, checks["max_prototype_drift"] = spectrum(library, experts, protos)

    def over_modules(per_module) -> np.ndarray:  # (experts,): the mean over modules of per_module(m)
        return np.mean([np.asarray(per_module(m), dtype=float) for m in protos], axis=0)

    logit = {
        k: over_modules(lambda m, rows=rows: scores[m][rows].abs().mean(0))
        for k, rows in (("content", content), ("template", ~content))
    }
    mu_by_module = np.array([(protos[m] @ mu[m]).abs().numpy() for m in protos])  # (modules, experts)
    mu_logit = mu_by_module.mean(0)
    measures = {
        "top-1 share": shares(top1)[0],
        "top-1 share, task mean": shares(top1)[1],
        "tasks most routed": np.array([most_routed.count(x) for x in experts], dtype=float),
        "mean |h·v|, content": logit["content"],
        "mean |h·v|, template": logit["template"],
        "|μ·v|": mu_logit,
        "mean |(h−μ)·v|, content": over_modules(lambda m: (scores[m][content] - protos[m] @ mu[m]).abs().mean(0)),
        "|cos(v, μ)|": over_modules(lambda m: (protos[m] @ mu[m]).abs() / mu[m].norm()),
        "|cos(v, μ^template)|": over_modules(lambda m: (protos[m] @ mu_template[m]).abs() / mu_template[m].norm()),
        "|μ·v| / mean |h·v|": mu_logit / logit["content"],
        "σ1/σ2": ratios[..., 0].mean(0),
        "σ1/‖ΔW‖_F": ratios[..., 1].mean(0),
    }
    a = experts.index(ATTRACTOR)
    rank = {k: 1 + int((v > v[a]).sum()) for k, v in measures.items()}
    rho = {k: spearman(measures["top-1 share"], v) for k, v in measures.items() if k != "top-1 share"}
    stored = load_routing(library).get("arrow@private", {}).get("content", {}).get("per_task", [])
    stored = {row["task"]: row["most_routed"] for row in stored}
    checks["top1_share_sum"] = float(measures["top-1 share"].sum())
    checks["most_routed_as_stored"] = f"{sum(stored.get(t) == x for t, x in zip(tasks, most_routed))} of {len(tasks)}"
    seconds = time.time() - started

    counterfactual = counterfactuals(experts, tasks, runs)
    record = {
        "library": str(args.library),
        "limit": args.limit,
        "split": "test",
        "hidden": args.hidden,
        "router": router.describe(),
        "tasks": tasks,
        "held_out": list(library.held_out.tasks),
        "experts": experts,
        "modules": list(protos),
        "tokens": {"content": int(content.sum()), "template": int((~content).sum())},
        "seconds": round(seconds, 1),
        "measures": {k: dict(zip(experts, np.round(v, 5).tolist())) for k, v in measures.items()},
        "rank_of_attractor": rank,
        "spearman": rho,
        "most_routed": dict(zip(tasks, most_routed)),
        "stored_most_routed": stored,
        "top1_share_by_module": dict(zip(protos, np.round(top1.sum(0) / top1.sum((0, 2))[:, None], 5).tolist())),
        "mu_logit_by_module": dict(zip(protos, np.round(mu_by_module, 5).tolist())),
        "counterfactual": counterfactual,
        "checks": checks,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {out}, {seconds:.0f} s")


def counterfactuals(experts, tasks, runs) -> dict:
    """For each routing (h, and h centred two ways): every expert's top-1 share, pooled and as a
    mean over tasks, and the expert each task is most routed to."""
    out = {}
    for label, (counts, routed) in runs.items():
        share, balanced = shares(counts)
        out[label] = {
            "top1_share": dict(zip(experts, share.round(5).tolist())),
            "top1_share_task_mean": dict(zip(experts, balanced.round(5).tolist())),
            "most_routed": dict(zip(tasks, [experts[i] for i in routed])),
        }
    return out


def print_tables(record: dict) -> None:
    """The Markdown tables, from the record."""
    import numpy as np

    experts, tasks, rank, rho = record["experts"], record["tasks"], record["rank_of_attractor"], record["spearman"]
    measures = {k: np.array([v[x] for x in experts]) for k, v in record["measures"].items()}
    most_routed = [record["most_routed"][t] for t in tasks]
    a, n = experts.index(ATTRACTOR), len(experts)
    print("| expert | " + " | ".join(measures) + " |\n|---|" + "---:|" * len(measures))
    for e in np.argsort(-measures["top-1 share"], kind="stable")[:8]:
        print(f"| {experts[e]} | " + " | ".join(_cell(k, v[e]) for k, v in measures.items()) + " |")
    print(f"| rank of {ATTRACTOR} (of {n}) | " + " | ".join(str(rank[k]) for k in measures) + " |\n")
    print(f"| measure | Spearman ρ with top-1 share ({n} experts) | rank of {ATTRACTOR} |\n|---|---:|---:|")
    for k, r in rho.items():
        print(f"| {k} | {r:+.2f} | {rank[k]} |")
    print("\n| expert | tasks it is most routed on (content tokens, summed top-k weight) |\n|---|---|")
    for x in sorted(dict.fromkeys(most_routed), key=most_routed.count, reverse=True):
        print(f"| {x} | " + ", ".join(t for t, y in zip(tasks, most_routed) if y == x) + " |")
    print(
        f"\n| routing | {ATTRACTOR}: top-1 share (rank) | its task-mean top-1 share (rank) | tasks it is most "
        "routed on | seen tasks most routed to their own expert | top expert by top-1 share |"
        "\n|---|---:|---:|---:|---:|---|"
    )
    for label, run in record["counterfactual"].items():
        share = np.array([run["top1_share"][x] for x in experts])
        balanced = np.array([run["top1_share_task_mean"][x] for x in experts])
        routed = [run["most_routed"][t] for t in tasks]
        best, own = int(share.argmax()), sum(t == x for t, x in zip(tasks, routed))
        print(
            f"| {label} | {100 * share[a]:.1f}% ({1 + int((share > share[a]).sum())}) "
            f"| {100 * balanced[a]:.1f}% ({1 + int((balanced > balanced[a]).sum())}) | {routed.count(ATTRACTOR)} "
            f"| {own} of {sum(t in experts for t in tasks)} | {experts[best]} ({100 * share[best]:.1f}%) |"
        )


def _cell(measure: str, value: float) -> str:
    if measure.startswith("top-1 share"):
        return f"{100 * value:.1f}%"
    return f"{value:.0f}" if measure == "tasks most routed" else f"{value:.3f}"


if __name__ == "__main__":
    main()
