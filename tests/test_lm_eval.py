"""lm-eval itself against a real server: a multiple-choice log-likelihood task and a generation task, defined
here over local JSON files, at two dtypes of the bundled model; the accuracies (and each log-likelihood) must
equal a direct computation with mlx-lm."""

import json

import mlx.core as mx
import pytest
from lm_eval import simple_evaluate  # in the `test` extra (scripts/install.sh installs it with CPU torch)
from mlx_lm import load
from mlx_lm.generate import generate

from tests.conftest import BUNDLED, start_server, stop_server

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# (a, b, distractors, gold index): some golds name a wrong sum on purpose, so that accuracy is not 1.0
# for every model and the comparison says something.
QUESTIONS = [(17, 25, (41, 43, 52), 0), (3, 4, (6, 8, 12), 0), (45, 45, (80, 90, 99), 2), (9, 9, (17, 19, 81), 0),
             (60, 7, (66, 76, 68), 1), (12, 34, (45, 47, 56), 0), (8, 80, (98, 78, 89), 0), (23, 11, (33, 35, 43), 3),
             (50, 49, (98, 100, 89), 0), (5, 61, (56, 67, 65), 0)]
GENERATION = [("17+25=", "42"), ("3+4=", "7"), ("45+45=", "90"), ("9+9=", "18"), ("60+7=", "67"),
              ("12+34=", "46"), ("8+80=", "88"), ("23+11=", "35"), ("50+49=", "99"), ("5+61=", "65")]


def mc_docs() -> list[dict]:
    docs = []
    for a, b, wrong, gold in QUESTIONS:
        choices = [str(a + b), *map(str, wrong)]
        gold_text = choices[gold]
        choices = sorted(choices)  # the right sum is not always first
        docs.append({"question": f"{a}+{b}=", "choices": choices, "answer": choices.index(gold_text)})
    return docs


def tasks(folder) -> list[dict]:
    (folder / "mc.json").write_text(json.dumps(mc_docs()))
    (folder / "gen.json").write_text(json.dumps([{"question": q, "answer": a} for q, a in GENERATION]))

    def data(name: str) -> dict:
        return {"dataset_path": "json", "test_split": "train",
                "dataset_kwargs": {"data_files": str(folder / name), "cache_dir": str(folder / "hf")}}

    return [
        {"task": "tiny_arith_mc", **data("mc.json"), "output_type": "multiple_choice",
         "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
         "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
        {"task": "tiny_arith_gen", **data("gen.json"), "output_type": "generate_until",
         "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
         "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
         "metric_list": [{"metric": "exact_match"}]},
    ]


def direct_results(dtype: str) -> tuple[list[list[float]], float, float]:
    """Per question the log-likelihood of each choice, the MC accuracy and the generation accuracy, from
    mlx-lm on the same tokens lm-eval sends (BOS, the question, the choice)."""
    model, tokenizer = load(str(BUNDLED))
    model.set_dtype(DTYPES[dtype])
    logliks, right = [], 0
    for doc in mc_docs():
        context = tokenizer.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            tokens = tokenizer.encode(doc["question"] + choice)
            logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            scores.append(sum(logprobs[i - 1, tokens[i]].item() for i in range(len(context), len(tokens))))
        logliks.append(scores)
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    generated = sum(generate(model, tokenizer, q, max_tokens=5).split("\n")[0].strip() == a for q, a in GENERATION)
    return logliks, right / len(QUESTIONS), generated / len(GENERATION)


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--no-warmup")  # the first requests compile what they need
    yield base
    stop_server(proc)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_lm_eval_accuracies_equal_mlx_lm(server, tmp_path, dtype, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    out = simple_evaluate(
        model="local-completions", tasks=tasks(tmp_path), log_samples=True, bootstrap_iters=0,
        model_args={"base_url": f"{server}/v1/completions", "model": f"tiny-arith:{dtype}",
                    "tokenizer": str(BUNDLED), "tokenizer_backend": "huggingface", "add_bos_token": True,
                    "tokenized_requests": True, "num_concurrent": 4, "max_retries": 1})
    logliks, mc_accuracy, gen_accuracy = direct_results(dtype)
    assert out["results"]["tiny_arith_mc"]["acc,none"] == pytest.approx(mc_accuracy)
    assert out["results"]["tiny_arith_gen"]["exact_match,none"] == pytest.approx(gen_accuracy)
    assert mc_accuracy < 1.0 and gen_accuracy > 0.5  # the wrong golds count; the model can add
    for sample in out["samples"]["tiny_arith_mc"]:
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(logliks[sample["doc_id"]], abs=1e-3 if dtype == "float32" else 5e-2)
