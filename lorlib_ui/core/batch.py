"""Many prompts at once: each one's answer, its top experts and its mean routing weight per expert.

Prompts come from a JSONL or CSV file (a `prompt` column, or another named one). They run in
batches: the answers by batched greedy decoding (`generation.generate_batch_ids`), then the
routing of each prompt with its answer in one batched, right-padded forward pass with the record
on (every router routes each token from its own hidden state, so a row's routing does not depend
on the others in its batch). A bad row (empty, undecodable, over the context) is reported in its
own `error` and the others still run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorlib_ui.core.adapters import read_regular
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate_batch_ids
from lorlib_ui.core.prompting import check_max_new_tokens, context_length, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import Router

MAX_FILE = 64 * 2**20  # a prompts file larger than this is refused
MAX_ROWS = 10_000
TOP = 3  # top experts listed per prompt


@dataclass
class BatchRow:
    row: int  # 1-based line (JSONL) or data row (CSV) of the file
    prompt: str | None
    answer: str = ""
    weights: np.ndarray | None = None  # (experts,): mean weight over layers and routed tokens
    error: str = ""
    top: list[tuple[str, float]] = field(default_factory=list)


def read_prompts(path: str | Path, column: str = "prompt") -> list[BatchRow]:
    """The prompts of a JSONL or CSV file, a row each; rows that cannot be read carry their error."""
    path = Path(path)
    try:
        text = read_regular(path, MAX_FILE).decode("utf-8", "replace")
    except OSError as exc:
        raise LorlibError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows: list[BatchRow] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                rows.append(BatchRow(i, None, error="not a JSON object"))
                continue
            value = record.get(column) if isinstance(record, dict) else None
            rows.append(BatchRow(i, value) if isinstance(value, str) else BatchRow(i, None, error=f"no {column!r}"))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if column not in (reader.fieldnames or []):
            raise LorlibError(f"{path}: no {column!r} column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        rows = [BatchRow(i, record.get(column)) for i, record in enumerate(reader, start=1)]
    else:
        raise LorlibError(f"{path}: give a .jsonl or .csv file of prompts")
    if len(rows) > MAX_ROWS:
        raise LorlibError(f"{path}: {len(rows)} rows, more than {MAX_ROWS}; split the file")
    for row in rows:
        if not row.error and (row.prompt is None or not row.prompt.strip()):
            row.error = "empty prompt"
    return rows


@torch.inference_mode()
def route_prompts(
    rm: RoutedModel,
    rows: list[BatchRow],
    router: Router,
    max_new_tokens: int = 64,
    chat: bool = True,
    batch_size: int = 8,
    done: Callable[[int, int], None] | None = None,
) -> list[BatchRow]:
    """Answer and route every readable row (see the module's docstring); fills the rows in."""
    check_max_new_tokens(max_new_tokens)
    room = context_length(rm.model) - max_new_tokens
    todo = []
    for row in rows:
        if row.error:
            continue
        ids = encode_prompt(rm.tokenizer, row.prompt.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), chat)
        if len(ids) > room:
            row.error = f"the prompt is {len(ids)} tokens; with {max_new_tokens} new ones it overflows the context"
        else:
            todo.append((row, ids))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        answers = generate_batch_ids(rm, [ids for _, ids in chunk], router, max_new_tokens, batch_size)
        weights = _mean_weights(rm, [ids + new for (_, ids), (_, new) in zip(chunk, answers)], router)
        for (row, _), (text, _), w in zip(chunk, answers, weights):
            row.answer, row.weights = text, w
            row.top = [(rm.experts[i], float(w[i])) for i in np.argsort(-w)[:TOP] if w[i] > 0]
        if done is not None:
            done(min(start + batch_size, len(todo)), len(todo))
    return rows


def _mean_weights(rm: RoutedModel, seqs: list[list[int]], router: Router) -> list[np.ndarray]:
    """Each sequence's routing weight per expert, averaged over layers and its own tokens: one
    right-padded forward pass with the record on."""
    pad = next(i for i in (rm.tokenizer.pad_token_id, rm.tokenizer.eos_token_id, 0) if i is not None)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, device=rm.device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=rm.device)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, device=rm.device)
        mask[row, : len(seq)] = 1
    with rm.routing(router, record=True) as builder:
        rm.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    record = builder.finish(router.describe(), rm.experts, [""] * ids.numel())
    weights = record.weights.reshape(len(rm.modules), len(seqs), width, len(rm.experts))
    return [weights[:, row, : len(seq)].mean(axis=(0, 1)) for row, seq in enumerate(seqs)]


def rows_to_csv(rows: list[BatchRow], experts: list[str]) -> str:
    """The results as CSV: row, prompt, answer, top experts, error, then one column per expert."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["row", "prompt", "answer", "top_experts", "error", *(f"weight:{e}" for e in experts)])
    for r in rows:
        top = "; ".join(f"{e} {w:.3f}" for e, w in r.top)
        weights = [] if r.weights is None else [f"{w:.6f}" for w in r.weights]
        writer.writerow([r.row, r.prompt or "", r.answer, top, r.error, *weights])
    return out.getvalue()
