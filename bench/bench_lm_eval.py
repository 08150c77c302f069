"""lm-eval against `miaotui serve`, end to end: its `local-completions` model (echo + prompt
logprobs + max_tokens over /v1/completions, tokens from our /tokenize through its remote
tokenizer) scores a multiple-choice task from ../shared/data/tasks by log-likelihood; the same
items are scored by `miaotui eval`'s own multiple_choice (in this process, no server), and the
two accuracies and per-choice log-likelihoods are compared.

Both sides use the float build of the default model (`--weights float`), so any difference is in
the serving path (tokenization, the prompt-logprob pass), not in the weights.

    .venv/bin/python bench/bench_lm_eval.py
    .venv/bin/python bench/bench_lm_eval.py --task strategyqa --limit 50

Prints one JSON object (and writes it to bench/out/lm_eval.json). Needs `pip install "lm-eval[api]"`.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "tasks"
OUT = REPO / "bench" / "out" / "lm_eval.json"

from health import stop_process, wait_healthy  # noqa: E402

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def log(msg: str) -> None:
    print(f"[bench_lm_eval] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval(url: str, task: str, limit: int) -> tuple[float, list[list[float]]]:
    """(accuracy, per item the log-likelihood of each choice) from lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = f"miaotui_{task}"
    with tempfile.TemporaryDirectory() as tasks_dir:
        path = DATA / f"{task}_dev.jsonl"
        (Path(tasks_dir) / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=path))
        model_args = (
            f"base_url={url}/v1/completions,model=smollm2-135m,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=512"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=[name],
            task_manager=TaskManager(include_path=tasks_dir),
            limit=limit,
            log_samples=True,
        )
    accuracy = out["results"][name]["acc,none"]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    scores = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return accuracy, scores


def run_miaotui_eval(task: str, limit: int) -> tuple[float, list[list[float]]]:
    from miaotui.eval.tasks import choice_logprob, load_jsonl, multiple_choice
    from miaotui.llm import LLM

    llm = LLM(weights="float", max_model_len=512)
    model, tok = llm.engine.runner.model, llm.tokenizer
    path = DATA / f"{task}_dev.jsonl"
    result = multiple_choice(model, tok, path, limit)
    scores = [
        choice_logprob(model, tok, f"Question: {row['question']}\nAnswer:", row["choices"])
        for row in load_jsonl(path, limit)
    ]
    return result.accuracy, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="social_iqa", help="a *_dev.jsonl multiple-choice task")
    ap.add_argument("--limit", type=int, default=40, help="items")
    a = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    port = free_port()
    log_file = Path(tempfile.mkdtemp(prefix="miaotui-lm-eval-")) / "server.log"
    cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--port", str(port)]
    cmd += ["--weights", "float", "--max-model-len", "512"]
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log_file, timeout=300)
        log(f"lm-eval on {a.task} ({a.limit} items)")
        lm_acc, lm_scores = run_lm_eval(url, a.task, a.limit)
    finally:
        stop_process(proc)
    log("miaotui eval on the same items")
    our_acc, our_scores = run_miaotui_eval(a.task, a.limit)
    diffs = [abs(x - y) for xs, ys in zip(lm_scores, our_scores) for x, y in zip(xs, ys)]
    picks = [max(range(len(s)), key=s.__getitem__) for s in lm_scores]
    our_picks = [max(range(len(s)), key=s.__getitem__) for s in our_scores]
    out = {
        "task": a.task,
        "items": len(lm_scores),
        "lm_eval_acc": round(lm_acc, 4),
        "miaotui_eval_acc": round(our_acc, 4),
        "same_choice": f"{sum(p == q for p, q in zip(picks, our_picks))}/{len(picks)}",
        "max_abs_loglik_diff": round(max(diffs), 6),
        "mean_abs_loglik_diff": round(sum(diffs) / len(diffs), 6),
        "weights": "float (both sides)",
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
