"""Training speed: lorlib's trainer against a plain Hugging Face Trainer + PEFT run, in one run.

    python benchmarks/bench_training.py [--task linguistic_mappings.plural_regular_json] [--steps 40]

Both train the same rank-4 LoRA (q, k, v, o; alpha 8; AdamW, lr 1e-3, 10 warm-up steps then
cosine; batch 8) on the same task of the embedded BIG-bench data, for the same number of steps,
from the embedded SmolLM2-135M-Instruct, with the loss on the answer tokens only (the peer masks
the prompt with -100 labels and pads each batch dynamically with DataCollatorForSeq2Seq, the
usual recipe). Each runs in float32 and with bfloat16 autocast, each in a fresh subprocess.
Reported: seconds per step, answer tokens per second (answer tokens seen / training time) and the
final loss (mean of the last 10% of steps), so that speed is compared at equal loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, BATCH, LR, WARMUP = 4, 8, 1e-3, 10


def _examples(task: str) -> list[tuple[str, str]]:
    from lorlib_ui.training.data import load_tasks
    from lorlib_ui.training.trainers import examples

    return examples(load_tasks("default"), [task])


def run_lorlib(task: str, steps: int, bf16: bool) -> dict:
    from lorlib_ui.core.base_model import load_base_model
    from lorlib_ui.training.config import TrainConfig
    from lorlib_ui.training.training import train_expert

    model, tokenizer = load_base_model(None, device="cpu", dtype="float32")
    config = TrainConfig(rank=RANK, targets=TARGETS, steps=steps, batch_size=BATCH, learning_rate=LR, bf16=bf16)
    result = train_expert(model, tokenizer, _examples(task), config)
    m = result.metrics
    return {"seconds": m["seconds"], "final_loss": m["final_loss"], "answer_tokens_per_s": m["answer_tokens_per_s"]}


def run_hf_trainer(task: str, steps: int, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorlib_ui.core.base_model import load_base_model
    from lorlib_ui.training.training import encode_example

    model, tokenizer = load_base_model(None, device="cpu", dtype="float32")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for prompt, answer in _examples(task):
        ids, n_prompt = encode_example(tokenizer, prompt, answer)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n_prompt + ids[n_prompt:]})
    answer_tokens = []

    class CountingTrainer(Trainer):  # answer tokens per batch, counted as lorlib counts them
        def compute_loss(self, model, inputs, *args, **kwargs):
            answer_tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    peft_model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), lora_dropout=0.0)
    )
    args = TrainingArguments(
        output_dir=str(ROOT / "benchmarks" / "out" / "hf_trainer"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        warmup_steps=WARMUP,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = CountingTrainer(model=peft_model, args=args, train_dataset=Rows(), data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = losses[-max(1, len(losses) // 10) :]
    final = sum(tail) / len(tail)
    return {"seconds": seconds, "final_loss": final, "answer_tokens_per_s": sum(answer_tokens) / seconds}


RUNNERS = {"lorlib": run_lorlib, "hf_trainer_peft": run_hf_trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="linguistic_mappings.plural_regular_json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.one:
        method, precision = args.one
        print(json.dumps(RUNNERS[method](args.task, args.steps, precision == "bf16")))
        return
    rows = []
    for precision in ("fp32", "bf16"):
        for method in RUNNERS:
            command = [sys.executable, __file__, "--task", args.task, "--steps", str(args.steps)]
            done = subprocess.run([*command, "--one", method, precision], capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{method} {precision} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"method": method, "precision": precision, **row})
            print(rows[-1], file=sys.stderr, flush=True)
    table = render(rows, args)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


def render(rows: list[dict], args) -> str:
    import torch
    import transformers

    head = (
        f"Run {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, "
        f"transformers {transformers.__version__}; task {args.task}, {args.steps} steps of batch {BATCH}, "
        f"rank {RANK} on q, k, v, o."
    )
    lines = [head, "", "| method | precision | s/step | answer tok/s | final loss |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['seconds'] / args.steps:.2f} | "
            f"{r['answer_tokens_per_s']:.0f} | {r['final_loss']:.3f} |"
        )
    lines.append("")
    by = {(r["method"], r["precision"]): r for r in rows}
    for precision in ("fp32", "bf16"):
        ours, peer = by[("lorlib", precision)], by[("hf_trainer_peft", precision)]
        speed = peer["seconds"] / ours["seconds"]
        lines.append(
            f"- {precision}: lorlib {speed:.2f}x the HF Trainer's speed (s/step); "
            f"final loss {ours['final_loss']:.3f} against {peer['final_loss']:.3f}"
        )
    best_ours = min((r for r in rows if r["method"] == "lorlib"), key=lambda r: r["seconds"])
    best_peer = min((r for r in rows if r["method"] != "lorlib"), key=lambda r: r["seconds"])
    lines.append(
        f"- fastest against fastest: lorlib {best_ours['precision']} "
        f"{best_peer['seconds'] / best_ours['seconds']:.2f}x "
        f"HF Trainer {best_peer['precision']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
