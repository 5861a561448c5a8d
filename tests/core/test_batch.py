"""Many prompts at once: the same answers and routing as one prompt at a time, bad rows reported
per row while the rest run."""

import csv
import io
import json

import numpy as np
import pytest

from lorlib_ui.core.batch import read_prompts, route_prompts, rows_to_csv
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate
from lorlib_ui.core.routers import make_router


def test_batched_rows_match_one_prompt_at_a_time(tiny_routed, tmp_path):
    rm = tiny_routed
    prompts = ["the quick brown", "a library of lora", "routing tokens to experts with arrow prototypes", "fox"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    router = make_router("arrow", rm.experts, top_k=2)
    rows = route_prompts(rm, read_prompts(path), router, max_new_tokens=4, batch_size=3)
    stops = {rm.tokenizer.eos_token_id, *np.atleast_1d(rm.model.generation_config.eos_token_id or [])}
    for row, prompt in zip(rows, prompts):
        alone = generate(rm, prompt, router, max_new_tokens=4)
        assert row.answer == alone.text and not row.error
        answer = alone.new_ids[:-1] if alone.new_ids and alone.new_ids[-1] in stops else alone.new_ids
        routed = len(alone.prompt_ids) + len(answer)  # teacher-forced: the prompt and the answer's tokens
        assert np.allclose(row.weights, alone.record.weights[:, :routed].mean(axis=(0, 1)), atol=1e-5)
        assert row.weights.sum() == pytest.approx(1.0, abs=1e-5)
        assert [e for e, _ in row.top] == [rm.experts[i] for i in np.argsort(-row.weights)[:3]]


def test_bad_rows_are_reported_and_the_rest_run(tiny_routed, tmp_path):
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "the quick"}', "not json", '{"prompt": ""}', '{"text": "x"}']
    lines += [json.dumps({"prompt": "fox " * 3000}), '{"prompt": "dog"}']
    path.write_text("\n".join(lines) + "\n")
    rows = route_prompts(tiny_routed, read_prompts(path), make_router("uniform", tiny_routed.experts), max_new_tokens=3)
    errors = {r.row: r.error for r in rows}
    assert errors[1] == "" and errors[6] == ""
    assert errors[2] == "not a JSON object" and errors[3] == "empty prompt" and errors[4] == "no 'prompt'"
    assert "overflows the context" in errors[5]
    table = list(csv.DictReader(io.StringIO(rows_to_csv(rows, tiny_routed.experts))))
    assert [int(r["row"]) for r in table] == [1, 2, 3, 4, 5, 6]
    assert table[0]["answer"] == rows[0].answer and table[0][f"weight:{tiny_routed.experts[0]}"]


def test_a_csv_file_names_its_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('question,id\n"the fox, quick",1\n,2\n')
    rows = read_prompts(path, "question")
    assert [r.prompt for r in rows] == ["the fox, quick", ""] and rows[1].error == "empty prompt"
    with pytest.raises(LorlibError, match="no 'prompt' column \\(columns: question, id\\)"):
        read_prompts(path)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(LorlibError, match="give a .jsonl or .csv file"):
        read_prompts(tmp_path / "p.txt")
